"""Fuzzing every decoder of untrusted bytes in `model/` (SPEC §9).

Each decoder may fail only with its documented, typed error; any other exception (KeyError,
TypeError, RecursionError, struct.error, …) escaping is a bug. Inputs: random bytes, valid
encodings truncated or mutated, oversized inputs, msgpack/JSON nested 10 000 deep, and huge refs
lists. Runs are derandomized (the same examples every run) with fixed example counts; run with
``--hypothesis-show-statistics`` to see how many inputs each test tried.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import TYPE_CHECKING, Final

import hypothesis.strategies as st
import msgspec
import nacl.public
import nacl.secret
import pytest
from hypothesis import event, given, settings

from model import (
    artifacts,
    content,
    dm,
    epochs,
    equivocation,
    keystore,
    membership,
    proofs,
    recovery,
    wire,
)
from model._crypto import CryptoError
from model.envelope import EventBody, decode_body, sign_body, verify_event
from model.errors import InvalidEvent
from tests.helpers import genesis_of, make_event, new_actor, new_collab_key

if TYPE_CHECKING:
    from collections.abc import Callable

FUZZ: Final = settings(max_examples=1000, deadline=None, derandomize=True)
DEEP: Final = 10_000

# --- valid encodings to start from --------------------------------------------------------------

_actor = new_actor("fuzzer")
_genesis, _key = genesis_of(_actor)
_collab = _genesis.body.collab_id
_event = make_event(_actor, _collab, _key, refs=("r1", "r2"))
_sealed_ks, _ks_key = keystore.seal_new(
    keystore.KeystoreContent(sign_seed=secrets.token_bytes(32), box_sk=secrets.token_bytes(32)),
    "a passphrase nobody will guess",
    keystore.KdfProfile.INSECURE_TEST,
)
_receipt = equivocation.SignedReceipt(_collab, 2, b"e" * 32, b"c" * 32, b"s" * 64)
VALID: Final[dict[str, bytes]] = {
    "request": wire.encode(wire.Append(rid=7, event=_event)),
    "batch": wire.batch(
        [wire.encode(wire.Ping(rid=1)), wire.encode(wire.Append(rid=2, event=_event))]
    ),
    "reply": wire.encode(wire.Event(collab_id=_collab, seq=3, event=_event, chain=b"c" * 32)),
    "error": wire.encode(wire.Error(rid=1, code=wire.ErrorCode.STALE, message="m", head_seq=4)),
    "body": _event.body,
    "proof": _genesis.body.ciphertext,
    "content": content.encode_content(
        content.Message("hi"), content.Evidence("d", 1, b"", 1, b"c" * 32, 5)
    ),
    "keystore": keystore.encode_sealed(_sealed_ks),
    "equivocation": equivocation.encode(
        equivocation.EquivocationProof(equivocation.PROOF_KIND, b"k" * 32, _receipt, _receipt)
    ),
}


def _check_proof(data: bytes) -> None:
    equivocation.check(equivocation.decode(data))


def _unbatch(data: bytes) -> None:
    wire.unbatch_replies(data)


# decoder name -> (decoder, the errors it documents)
DECODERS: Final[dict[str, tuple[Callable[[bytes], object], tuple[type[Exception], ...]]]] = {
    "decode_request": (wire.decode_request, (wire.MalformedFrame,)),
    "decode_reply": (wire.decode_reply, (wire.MalformedFrame,)),
    "unbatch_replies": (_unbatch, (wire.MalformedFrame,)),
    "decode_body": (decode_body, (InvalidEvent,)),
    "decode_proof": (membership.decode_proof, (membership.ProofRejected,)),
    "decode_content": (content.decode_content, (InvalidEvent,)),
    "decode_sealed": (keystore.decode_sealed, (CryptoError,)),
    "equivocation.decode+check": (_check_proof, (equivocation.NotAProof,)),
}


def only_typed_errors(name: str, data: bytes) -> None:
    decode, allowed = DECODERS[name]
    try:
        decode(data)
    except allowed:
        event(f"{name}: refused")
    else:
        event(f"{name}: decoded")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid encoding (of any decoder's format), truncated, bit-flipped, cut or grown."""
    base = bytearray(draw(st.sampled_from([VALID[k] for k in sorted(VALID)])))
    action = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]))
    pos = draw(st.integers(0, len(base) - 1))
    if action == "truncate":
        del base[pos:]
    elif action == "flip":
        base[pos] ^= draw(st.integers(1, 255))
    elif action == "insert":
        base[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif action == "delete":
        del base[pos : pos + draw(st.integers(1, 16))]
    else:
        other = draw(st.sampled_from([VALID[k] for k in sorted(VALID)]))
        base[pos:] = other[draw(st.integers(0, len(other) - 1)) :]
    event(f"mutation: {action}")
    return bytes(base)


def _nested(depth: int, leaf: bytes = b"\xc0") -> bytes:
    return b"\x91" * depth + leaf  # msgpack: [[[...[nil]...]]]


HOSTILE: Final[dict[str, bytes]] = {
    "arrays-10k-deep": _nested(DEEP),
    "maps-10k-deep": b"\x81\xa1k" * DEEP + b"\xc0",
    "deep-field": b"\x83\xa1t\xa9subscribe\xa3rid\x03\xa9collab_id" + _nested(DEEP),
    "deep-batch": b"\x82\xa1t\xa5batch\xa6frames" + _nested(DEEP),
    "deep-body-refs": b"\x99\x01\xa1c\xa1a\xa3msg\x00" + _nested(DEEP),
    "json-10k-deep": b"[" * DEEP + b"]" * DEEP,
    "json-deep-object": b'{"kind":' * DEEP + b"1" + b"}" * DEEP,
    "huge-refs": msgspec.msgpack.encode(
        [1, _collab, _actor.account_id, "msg", 1, ["r"] * 200_000, b"n" * 24, b"", 0]
    ),
    "huge-batch": wire.encode(
        wire.Batch(frames=[msgspec.Raw(wire.encode(wire.Ping(rid=1)))] * 100_000)
    ),
    "huge-str-len": b"\xdb\xff\xff\xff\xff",  # a 4 GiB string header and no string
    "huge-array-len": b"\xdd\xff\xff\xff\xff",
    "huge-map-len": b"\xdf\xff\xff\xff\xff",
    "oversized-random": secrets.token_bytes(2 * 1024 * 1024),
    "oversized-valid-prefix": VALID["request"] + b"\x00" * (1024 * 1024),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_only_raise_typed_errors(name: str, data: bytes) -> None:
    only_typed_errors(name, data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=mutated())
def test_truncated_and_mutated_encodings_only_raise_typed_errors(name: str, data: bytes) -> None:
    only_typed_errors(name, data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=9) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(obj=msgpack_values)
def test_structured_garbage_only_raises_typed_errors(name: str, obj: object) -> None:
    # Well-formed msgpack and JSON of the wrong shape reach deeper into the typed decoders.
    only_typed_errors(name, msgspec.msgpack.encode(obj))
    only_typed_errors(name, msgspec.json.encode(obj))


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_deep_nesting_huge_lists_and_oversized_inputs_only_raise_typed_errors(
    name: str, hostile: str
) -> None:
    decode, allowed = DECODERS[name]
    with contextlib.suppress(allowed):
        decode(HOSTILE[hostile])


def test_valid_encodings_still_decode() -> None:
    """The fuzz starts from real encodings: each decodes with its own decoder."""
    assert isinstance(wire.decode_request(VALID["request"]), wire.Append)
    assert isinstance(wire.decode_request(VALID["batch"]), wire.Batch)
    assert isinstance(wire.decode_reply(VALID["reply"]), wire.Event)
    assert isinstance(decode_body(VALID["body"]), EventBody)
    assert membership.decode_proof(VALID["proof"]).collab_id == _collab
    assert content.decode_content(VALID["content"])[0] == content.Message("hi")
    assert keystore.decode_sealed(VALID["keystore"]) == _sealed_ks
    with pytest.raises(equivocation.NotAProof):  # bogus signatures: decodes, then refused
        _check_proof(VALID["equivocation"])


# --- decoders behind a key: the bytes inside authenticate but are hostile -----------------------

_box_a, _box_b = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()


@FUZZ
@given(
    inner=st.binary(max_size=256) | msgpack_values.map(msgspec.msgpack.encode), whole=st.booleans()
)
def test_hostile_plaintext_under_a_valid_key_only_raises_crypto_errors(
    inner: bytes, whole: bool
) -> None:
    """A member (not the relay) could seal garbage that authenticates: a keystore whose sealed
    content, or a keystore/epoch wrap, is not what it should be still fails as `CryptoError`."""
    box = nacl.secret.SecretBox(_ks_key)
    sealed = msgspec.structs.replace(_sealed_ks, sealed=bytes(box.encrypt(inner)))
    try:
        keystore.open_content(sealed, _ks_key)
    except CryptoError:
        event("keystore content: refused")
    wrap = bytes(nacl.public.SealedBox(_box_a.public_key).encrypt(inner))
    try:
        epochs.open_wrap({"a": wrap if whole else inner}, "a", _box_a)
    except CryptoError:
        event("epoch wrap: refused")


@FUZZ
@given(chunks=st.lists(st.binary(max_size=80), max_size=5), header_ok=st.booleans())
def test_random_artifact_streams_only_raise_crypto_errors(
    chunks: list[bytes], header_ok: bool
) -> None:
    key = new_collab_key()
    header = next(artifacts.seal_stream(key, _collab, [b""])) if header_ok else b"h" * 24
    try:
        for _ in artifacts.open_stream(key, _collab, [header, *chunks]):
            pass
    except CryptoError:
        event("artifact: refused")


@FUZZ
@given(
    text=st.text(max_size=80)
    | st.text(alphabet="0123456789ABCDEFGHJKMNPQRSTVWXYZ-oil ", max_size=60)
)
def test_random_recovery_codes_only_raise_invalid_recovery_code(text: str) -> None:
    try:
        recovery.parse_code(text)
    except recovery.InvalidRecoveryCode:
        event("recovery code: refused")


@FUZZ
@given(
    version=st.integers(-(2**70), 2**70),
    blob=st.binary(max_size=64),
    key=st.binary(max_size=40),
    sig=st.binary(max_size=70),
)
def test_keystore_write_proofs_of_any_version_verify_or_not_without_crashing(
    version: int, blob: bytes, key: bytes, sig: bytes
) -> None:
    """The relay checks these on `put_keystore` with a client-chosen version (any msgpack int)."""
    assert proofs.verify_keystore_write(key, _actor.account_id, version, blob, sig) is False


_dm = dm.seal_dm(
    signing_key=_actor.signing_key,
    sender_box_key=_box_a,
    recipient_box_pk=bytes(_box_b.public_key),
    collab_id=_collab,
    sender_id=_actor.account_id,
    recipient_id=new_actor().account_id,
    ts=1,
    epoch=0,
    content=b"hello",
)


@FUZZ
@given(
    inner=st.binary(max_size=256) | msgpack_values.map(msgspec.msgpack.encode), boxed=st.booleans()
)
def test_hostile_direct_messages_only_raise_crypto_errors(inner: bytes, boxed: bool) -> None:
    """A DM whose sealed part is random, or authenticates but holds garbage, fails as
    `CryptoError` for its recipient."""
    body = decode_body(_dm.body)
    nonce = secrets.token_bytes(nacl.public.Box.NONCE_SIZE)
    ciphertext = inner
    if boxed:
        ciphertext = nacl.public.Box(_box_a, _box_b.public_key).encrypt(inner, nonce).ciphertext
    signed = sign_body(
        _actor.signing_key, msgspec.structs.replace(body, nonce=nonce, ciphertext=ciphertext)
    )
    verified = verify_event(signed, bytes(_actor.signing_key.verify_key))
    try:
        dm.open_dm(verified, _box_b, bytes(_box_a.public_key))
    except CryptoError:
        event("dm: refused")
