"""The event envelope: sealing, signing, strict decoding and the AEAD's binding of routing fields.

Tamper tests follow PyNaCl's `tests/test_aead.py`: start from an honest event that verifies,
change one thing, expect the typed failure.
"""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import _crypto, content
from model._crypto import CryptoError
from model.envelope import (
    DOMAIN_EVENT,
    EVENT_VERSION,
    MAX_BODY_BYTES,
    MAX_REF_CHARS,
    MAX_REFS,
    EventBody,
    SignedEvent,
    VerifiedEvent,
    content_associated_data,
    decode_body,
    event_id,
    open_content,
    seal_event,
    signature_check,
    verify_event,
)
from model.errors import BadSignature, InvalidEvent
from model.ids import new_id
from tests.helpers import TS0, Actor, make_event, new_actor, new_collab_key

# Module-level fixtures for @given tests (hypothesis forbids function-scoped pytest fixtures).
ALICE = new_actor("alice")
MALLORY = new_actor("mallory")
COLLAB = new_id("c")
OTHER_COLLAB = new_id("c")
CK = new_collab_key()
HONEST = make_event(ALICE, COLLAB, CK, content=b"the launch code is 0000", refs=("ref-1", "r2"))

kinds = st.from_regex(r"\A[a-z][a-z0-9._-]{0,31}\Z")
timestamps = st.integers(min_value=0, max_value=2**63 - 1)
refs_st = st.lists(
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=MAX_REF_CHARS),
    max_size=MAX_REFS,
).map(tuple)


def sign_body(actor: Actor, body: bytes) -> SignedEvent:
    """Sign arbitrary body bytes the way an author would (used to get past the signature check
    and reach the decoder with malformed or spliced bodies)."""
    return SignedEvent(body=body, sig=_crypto.sign(actor.signing_key, DOMAIN_EVENT + body))


def encode_body(body: EventBody) -> bytes:
    return msgspec.msgpack.encode(body)


# --- round trip -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=2048),
    kind=kinds,
    ts=timestamps,
    refs=refs_st,
)
def test_seal_verify_open_round_trip(
    data: bytes, kind: str, ts: int, refs: tuple[str, ...]
) -> None:
    signed = make_event(ALICE, COLLAB, CK, kind=kind, ts=ts, content=data, refs=refs)
    verified = verify_event(signed, ALICE.sign_pk)
    assert isinstance(verified, VerifiedEvent)
    body = verified.body
    assert (body.v, body.collab_id, body.actor_id, body.kind, body.ts, body.refs) == (
        EVENT_VERSION,
        COLLAB,
        ALICE.account_id,
        kind,
        ts,
        refs,
    )
    assert verified.signed is signed
    assert verified.event_id == event_id(signed)
    assert open_content(verified, CK) == data


def test_event_id_is_stable_and_unique_per_seal() -> None:
    again = SignedEvent(body=bytes(HONEST.body), sig=bytes(HONEST.sig))
    assert event_id(again) == event_id(HONEST)
    assert len(event_id(HONEST)) == 32
    # Same content, fresh nonce: a different event with a different identity.
    twin = make_event(ALICE, COLLAB, CK, content=b"the launch code is 0000", refs=("ref-1", "r2"))
    assert twin.body != HONEST.body
    assert event_id(twin) != event_id(HONEST)


def test_signed_event_survives_msgpack_transit() -> None:
    wire_bytes = msgspec.msgpack.encode(HONEST)
    back = msgspec.msgpack.decode(wire_bytes, type=SignedEvent)
    assert back == HONEST
    assert verify_event(back, ALICE.sign_pk).event_id == event_id(HONEST)


def test_verified_event_is_only_made_by_the_verifier() -> None:
    body = decode_body(HONEST.body)
    with pytest.raises(TypeError):
        VerifiedEvent(HONEST, body, event_id(HONEST), _token=object())


def test_reprs_do_not_show_ciphertext_or_content() -> None:
    verified = verify_event(HONEST, ALICE.sign_pk)
    for text in (repr(HONEST), repr(verified), repr(verified.body)):
        assert verified.body.ciphertext.hex() not in text
        assert "launch" not in text


# --- SO-3: signatures and tampering ----------------------------------------------------------


@pytest.mark.objective("SO-3")
@settings(max_examples=150, deadline=None)
@given(data=st.data(), mask=st.integers(min_value=1, max_value=255))
def test_flipping_any_body_byte_fails_verification(data: st.DataObject, mask: int) -> None:
    pos = data.draw(st.integers(min_value=0, max_value=len(HONEST.body) - 1), label="pos")
    body = bytearray(HONEST.body)
    body[pos] ^= mask
    with pytest.raises((BadSignature, InvalidEvent)):
        verify_event(SignedEvent(body=bytes(body), sig=HONEST.sig), ALICE.sign_pk)


@pytest.mark.objective("SO-3")
@settings(max_examples=150, deadline=None)
@given(pos=st.integers(min_value=0, max_value=63), mask=st.integers(min_value=1, max_value=255))
def test_flipping_any_signature_byte_fails_verification(pos: int, mask: int) -> None:
    sig = bytearray(HONEST.sig)
    sig[pos] ^= mask
    with pytest.raises(BadSignature):
        verify_event(SignedEvent(body=HONEST.body, sig=bytes(sig)), ALICE.sign_pk)


@pytest.mark.objective("SO-3")
@pytest.mark.parametrize(
    "tampered",
    [
        SignedEvent(body=HONEST.body[:-1], sig=HONEST.sig),
        SignedEvent(body=HONEST.body + b"\x00", sig=HONEST.sig),
        SignedEvent(body=HONEST.body, sig=HONEST.sig[:-1]),
        SignedEvent(body=HONEST.body, sig=HONEST.sig + b"\x00"),
        SignedEvent(body=HONEST.body, sig=b""),
        SignedEvent(body=HONEST.body, sig=bytes(64)),
        SignedEvent(body=b"", sig=HONEST.sig),
    ],
    ids=["body-truncated", "body-extended", "sig-truncated", "sig-extended", "sig-empty",
         "sig-zero", "body-empty"],
)  # fmt: skip
def test_truncated_or_extended_events_fail_verification(tampered: SignedEvent) -> None:
    with pytest.raises((BadSignature, InvalidEvent)):
        verify_event(tampered, ALICE.sign_pk)


@pytest.mark.objective("SO-3")
def test_event_does_not_verify_under_another_key() -> None:
    assert verify_event(HONEST, ALICE.sign_pk)
    with pytest.raises(BadSignature):
        verify_event(HONEST, MALLORY.sign_pk)
    for bad_key in (b"", bytes(31), bytes(32), bytes(33)):
        with pytest.raises(BadSignature):
            verify_event(HONEST, bad_key)


@pytest.mark.objective("SO-3")
def test_author_cannot_be_impersonated() -> None:
    # Mallory seals an event that claims Alice as its author. Verifiers look the key up by the
    # claimed actor_id, so it fails under Alice's key.
    forged = seal_event(
        signing_key=MALLORY.signing_key,
        collab_key=CK,
        collab_id=COLLAB,
        actor_id=ALICE.account_id,
        kind="msg",
        ts=TS0,
        content=b"I, Alice, resign",
    )
    with pytest.raises(BadSignature):
        verify_event(forged, ALICE.sign_pk)


@pytest.mark.objective("SO-3")
def test_signature_is_domain_separated() -> None:
    # A signature over the bare body (no domain label) — e.g. one made for another purpose over
    # the same bytes — is not an event signature.
    bare = SignedEvent(body=HONEST.body, sig=_crypto.sign(ALICE.signing_key, HONEST.body))
    with pytest.raises(BadSignature):
        verify_event(bare, ALICE.sign_pk)


# --- SO-1: content confidentiality and the AEAD's associated data ----------------------------


@pytest.mark.objective("SO-1")
def test_content_is_not_visible_in_the_signed_event() -> None:
    canary = b"CANARY-7f3a9c-plaintext-must-never-leak"
    signed = make_event(ALICE, COLLAB, CK, content=canary + b" " + canary)
    on_the_wire = msgspec.msgpack.encode(signed)
    for blob in (signed.body, signed.sig, on_the_wire):
        assert canary not in blob
        assert canary[:12] not in blob
    assert open_content(verify_event(signed, ALICE.sign_pk), CK) == canary + b" " + canary


@pytest.mark.objective("SO-1")
def test_content_does_not_open_under_another_collab_key() -> None:
    verified = verify_event(HONEST, ALICE.sign_pk)
    with pytest.raises(CryptoError):
        open_content(verified, new_collab_key())
    for bad_key in (b"", CK[:-1], CK + b"\x00"):
        with pytest.raises(CryptoError):
            open_content(verified, bad_key)


_ROUTING_CHANGES = {
    "collab_id": OTHER_COLLAB,
    "actor_id": MALLORY.account_id,
    "kind": "msg2",
    "ts": TS0 + 1,
    "refs": ("ref-1",),
    "epoch": 1,
}


@pytest.mark.objective("SO-1")
@pytest.mark.parametrize("field", sorted(_ROUTING_CHANGES))
def test_ciphertext_is_bound_to_every_routing_field(field: str) -> None:
    body = decode_body(HONEST.body)
    assert _crypto.aead_decrypt(CK, body.nonce, body.ciphertext, content_associated_data(body))
    moved = msgspec.structs.replace(body, **{field: _ROUTING_CHANGES[field]})
    with pytest.raises(CryptoError):
        _crypto.aead_decrypt(CK, body.nonce, body.ciphertext, content_associated_data(moved))


@pytest.mark.objective("SO-1")
@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(sorted(_ROUTING_CHANGES)),
    ts=timestamps,
    kind=kinds,
    refs=refs_st,
)
def test_spliced_ciphertext_never_opens(
    field: str, ts: int, kind: str, refs: tuple[str, ...]
) -> None:
    # Mallory (a member who can sign) lifts Alice's nonce+ciphertext into a body with different
    # routing fields and signs it herself. The signature holds, but the content does not open:
    # the AEAD's associated data no longer matches.
    original = decode_body(HONEST.body)
    replacement: object = {
        "collab_id": OTHER_COLLAB,
        "actor_id": MALLORY.account_id,
        "kind": kind if kind != original.kind else "other",
        "ts": ts if ts != original.ts else ts + 1,
        "refs": refs if refs != original.refs else (*refs, "x"),
        "epoch": original.epoch + 1,
    }[field]
    spliced = msgspec.structs.replace(original, **{field: replacement})
    signed = sign_body(MALLORY, encode_body(spliced))
    verified = verify_event(signed, MALLORY.sign_pk)
    with pytest.raises(CryptoError):
        open_content(verified, CK)


@pytest.mark.objective("SO-1")
def test_swapped_nonce_or_ciphertext_fails_to_open() -> None:
    a = decode_body(HONEST.body)
    b = decode_body(make_event(ALICE, COLLAB, CK, content=b"other", refs=a.refs).body)
    for spliced in (
        msgspec.structs.replace(a, nonce=b.nonce),
        msgspec.structs.replace(a, ciphertext=b.ciphertext),
        msgspec.structs.replace(a, ciphertext=a.ciphertext[:-1]),
    ):
        verified = verify_event(sign_body(ALICE, encode_body(spliced)), ALICE.sign_pk)
        with pytest.raises(CryptoError):
            open_content(verified, CK)


# --- strict, canonical decoding --------------------------------------------------------------


def _mp_int(n: int, wide: bool) -> bytes:
    assert 0 <= n < 2**32
    if not wide:
        return msgspec.msgpack.encode(n)
    return b"\xcf" + struct.pack(">Q", n)  # uint64 where a shorter form exists


def _mp_str(s: str, wide: bool) -> bytes:
    raw = s.encode()
    if not wide:
        return msgspec.msgpack.encode(s)
    return b"\xda" + struct.pack(">H", len(raw)) + raw  # str16


def _mp_bin(b: bytes, wide: bool) -> bytes:
    if not wide:
        return msgspec.msgpack.encode(b)
    return b"\xc6" + struct.pack(">I", len(b)) + b  # bin32


def _mp_array_header(n: int, wide: bool) -> bytes:
    assert n < 16
    return b"\xdc" + struct.pack(">H", n) if wide else bytes([0x90 | n])


_BODY_PARTS = ("array", "v", "collab_id", "actor_id", "kind", "ts", "refs", "ref0", "nonce",
               "ciphertext", "epoch")  # fmt: skip


def hand_encode(body: EventBody, widen: str | None = None) -> bytes:
    """A msgpack encoding of `body` that is canonical except for the part named `widen`."""

    def w(name: str) -> bool:
        return widen == name

    out = _mp_array_header(9, w("array"))
    out += _mp_int(body.v, w("v"))
    out += _mp_str(body.collab_id, w("collab_id"))
    out += _mp_str(body.actor_id, w("actor_id"))
    out += _mp_str(body.kind, w("kind"))
    out += _mp_int(body.ts, w("ts"))
    out += _mp_array_header(len(body.refs), w("refs"))
    for i, ref in enumerate(body.refs):
        out += _mp_str(ref, w(f"ref{i}"))
    out += _mp_bin(body.nonce, w("nonce"))
    out += _mp_bin(body.ciphertext, w("ciphertext"))
    out += _mp_int(body.epoch, w("epoch"))
    return out


@pytest.mark.objective("SO-3")
@settings(max_examples=40, deadline=None)
@given(part=st.sampled_from(_BODY_PARTS), ts=st.integers(0, 2**32 - 1), data=st.binary())
def test_non_canonical_encodings_are_rejected(part: str, ts: int, data: bytes) -> None:
    # One body, one meaning, one byte string: otherwise a relay could re-encode a signed body
    # into a second valid form with a different event id and defeat deduplication.
    signed = make_event(ALICE, COLLAB, CK, ts=ts, content=data, refs=("only-ref",))
    body = decode_body(signed.body)
    assert hand_encode(body) == signed.body  # our encoder agrees with the canonical form
    variant = hand_encode(body, widen=part)
    assert variant != signed.body
    assert msgspec.msgpack.decode(variant, type=EventBody) == body  # same meaning...
    with pytest.raises(InvalidEvent, match="canonical"):
        decode_body(variant)  # ...but not the one accepted encoding
    with pytest.raises(InvalidEvent, match="canonical"):
        verify_event(sign_body(ALICE, variant), ALICE.sign_pk)


def _valid_body(**changes: object) -> EventBody:
    return msgspec.structs.replace(decode_body(HONEST.body), **changes)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(msgspec.msgpack.encode({"v": 1}), id="map-not-array"),
        pytest.param(msgspec.msgpack.encode([1, "c", "a"]), id="too-few-fields"),
        pytest.param(HONEST.body[:1].replace(b"\x98", b"\x99") + HONEST.body[1:] + b"\xc0",
                     id="extra-field"),
        pytest.param(HONEST.body + b"\x00", id="trailing-bytes"),
        pytest.param(encode_body(_valid_body(v=2)), id="future-version"),
        pytest.param(encode_body(_valid_body(v=0)), id="version-0"),
        pytest.param(encode_body(_valid_body(nonce=b"\x00" * 23)), id="short-nonce"),
        pytest.param(encode_body(_valid_body(nonce=b"\x00" * 25)), id="long-nonce"),
        pytest.param(encode_body(_valid_body(collab_id="c_short")), id="bad-collab-id"),
        pytest.param(encode_body(_valid_body(collab_id=ALICE.account_id)), id="collab-id-is-account"),
        pytest.param(encode_body(_valid_body(actor_id="alice")), id="bad-actor-id"),
        pytest.param(encode_body(_valid_body(kind="Msg")), id="bad-kind"),
        pytest.param(encode_body(_valid_body(ts=-1)), id="negative-ts"),
        pytest.param(encode_body(_valid_body(refs=("",))), id="empty-ref"),
        pytest.param(encode_body(_valid_body(refs=("r",) * (MAX_REFS + 1))), id="too-many-refs"),
        pytest.param(msgspec.msgpack.encode([1, COLLAB, ALICE.account_id, "msg", 1.5, [], bytes(24), b""]),
                     id="float-ts"),
        pytest.param(msgspec.msgpack.encode([True, COLLAB, ALICE.account_id, "msg", 1, [], bytes(24), b""]),
                     id="bool-version"),
    ],
)  # fmt: skip
def test_malformed_signed_bodies_are_invalid(body: bytes) -> None:
    # Signed by the real author, so only the decoder stands between this and the ledger.
    with pytest.raises(InvalidEvent):
        decode_body(body)
    with pytest.raises(InvalidEvent):
        verify_event(sign_body(ALICE, body), ALICE.sign_pk)


# --- routing field validation and size limits ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("collab_id", "c_" + "a" * 25),
        ("collab_id", "c_" + "A" * 26),
        # Random ids get fixed test ids: every xdist worker must collect the same names.
        pytest.param("collab_id", new_id("a"), id="collab_id-an account id"),
        pytest.param("collab_id", new_id("c") + "\n", id="collab_id-trailing newline"),
        pytest.param("actor_id", new_id("c"), id="actor_id-a collab id"),
        ("actor_id", ""),
        ("kind", ""),
        ("kind", "1msg"),
        ("kind", "m" * 33),
        ("kind", "msg\n"),
        ("kind", "msg/x"),
        ("ts", -1),
        ("ts", 2**63),
        ("refs", ("",)),
        ("refs", ("r" * (MAX_REF_CHARS + 1),)),
        ("refs", ("r",) * (MAX_REFS + 1)),
    ],
)
def test_seal_refuses_invalid_routing_fields(field: str, value: object) -> None:
    kwargs: dict[str, object] = {
        "collab_id": COLLAB,
        "actor_id": ALICE.account_id,
        "kind": "msg",
        "ts": TS0,
        "refs": (),
    }
    kwargs[field] = value
    with pytest.raises(InvalidEvent):
        seal_event(signing_key=ALICE.signing_key, collab_key=CK, content=b"x", **kwargs)


def test_routing_field_limits_are_inclusive() -> None:
    signed = make_event(
        ALICE,
        COLLAB,
        CK,
        kind="k" + "9" * 31,
        ts=2**63 - 1,
        refs=("r" * MAX_REF_CHARS,) * MAX_REFS,
    )
    assert verify_event(signed, ALICE.sign_pk).body.ts == 2**63 - 1


def _max_content() -> int:
    """The most content bytes an event holds: padding cuts its last bucket to the body limit
    (model/padding.py), which then holds the content, the padding's two framing bytes and the
    AEAD tag."""
    probe = make_event(ALICE, COLLAB, CK, content=b"\x00" * 63_000)
    assert len(probe.body) == MAX_BODY_BYTES
    return len(decode_body(probe.body).ciphertext) - 16 - 2


def test_largest_content_that_fits_is_accepted_and_one_more_byte_is_not() -> None:
    fits = _max_content()
    signed = make_event(ALICE, COLLAB, CK, content=b"\x01" * fits)
    assert len(signed.body) == MAX_BODY_BYTES
    assert open_content(verify_event(signed, ALICE.sign_pk), CK) == b"\x01" * fits
    with pytest.raises(InvalidEvent, match="Attach large content as an artifact"):
        make_event(ALICE, COLLAB, CK, content=b"\x01" * (fits + 1))


def test_oversized_bodies_are_refused_before_any_crypto() -> None:
    big = make_event(ALICE, COLLAB, CK, content=b"\x00" * _max_content())
    oversized = big.body + b"\x00"
    with pytest.raises(InvalidEvent, match="limit"):
        decode_body(oversized)
    # Even correctly signed, an oversized body is not an event.
    with pytest.raises(InvalidEvent, match="limit"):
        verify_event(sign_body(ALICE, oversized), ALICE.sign_pk)


# --- plaintext content types (inside the AEAD) -----------------------------------------------


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=200))
def test_message_content_round_trips_through_an_event(text: str) -> None:
    message = content.Message(text=text)
    signed = make_event(
        ALICE, COLLAB, CK, kind=content.kind_of(message), content=content.encode_content(message)
    )
    opened = open_content(verify_event(signed, ALICE.sign_pk), CK)
    assert content.decode_content(opened) == (message, None)


def test_content_kinds_and_limits() -> None:
    assert content.kind_of(content.Message(text="hi")) == content.KIND_MESSAGE
    assert content.kind_of(content.CollabMeta(name="n")) == content.KIND_COLLAB_META
    meta = content.CollabMeta(name="secret project")
    assert content.decode_content(content.encode_content(meta)) == (meta, None)
    assert "secret" not in repr(meta)
    content.encode_content(content.Message(text="x" * content.MAX_TEXT_CHARS))
    with pytest.raises(InvalidEvent):
        content.encode_content(content.Message(text="x" * (content.MAX_TEXT_CHARS + 1)))
    for garbage in (b"", b"\xc1", msgspec.msgpack.encode({"type": "nope"}), b"\x90"):
        with pytest.raises(InvalidEvent):
            content.decode_content(garbage)


# msgspec raises UnicodeDecodeError for invalid UTF-8 and RecursionError for deep nesting, which
# are not msgspec.DecodeError (msgspec issue #714): the decoders must turn them into InvalidEvent.


def test_signed_body_with_invalid_utf8_is_invalid_not_a_crash() -> None:
    bad = HONEST.body.replace(b"\xa3msg", b"\xa3ms\xff")
    assert bad != HONEST.body
    with pytest.raises(InvalidEvent):
        verify_event(sign_body(ALICE, bad), ALICE.sign_pk)


@pytest.mark.parametrize(
    "data",
    [
        # An unknown field whose value nests 5000 arrays deep: msgspec recurses skipping it.
        pytest.param(b"\x82\xa4type\xa3msg\xa1z" + b"\x91" * 5000 + b"\xc0", id="nested"),
        pytest.param(b"\x82\xa4type\xa3msg\xa4text\xa1\xff", id="bad-utf8"),
    ],
)
def test_hostile_content_is_invalid_not_a_crash(data: bytes) -> None:
    with pytest.raises(InvalidEvent):
        content.decode_content(data)


@pytest.mark.objective("SO-3")
def test_a_body_decoded_ahead_of_time_saves_work_but_not_the_signature_check() -> None:
    decoded = decode_body(HONEST.body)
    fast = verify_event(HONEST, ALICE.sign_pk, decoded=decoded)
    slow = verify_event(HONEST, ALICE.sign_pk)
    assert (fast.body, fast.event_id) == (slow.body, slow.event_id)
    forged = msgspec.structs.replace(HONEST, sig=bytes(64))
    with pytest.raises(BadSignature):
        verify_event(forged, ALICE.sign_pk, decoded=decoded)


def test_a_signature_checked_elsewhere_is_judged_by_its_verdict_on_exactly_the_same_bytes() -> None:
    """The relay's worker processes check `signature_check`'s triple and hand back `held`:
    the triple is what `verify_event` itself would check, and the verdict is final both ways
    (a refused signature is not checked again; the length check still comes first)."""
    assert _crypto.verify(*signature_check(HONEST, ALICE.sign_pk))
    forged = msgspec.structs.replace(HONEST, sig=bytes(64))
    assert not _crypto.verify(*signature_check(forged, ALICE.sign_pk))
    trusted = verify_event(HONEST, ALICE.sign_pk, held=True)
    assert trusted.event_id == verify_event(HONEST, ALICE.sign_pk).event_id
    with pytest.raises(BadSignature):
        verify_event(HONEST, ALICE.sign_pk, held=False)
    huge = msgspec.structs.replace(HONEST, body=bytes(MAX_BODY_BYTES + 1))
    with pytest.raises(InvalidEvent):
        verify_event(huge, ALICE.sign_pk, held=True)
