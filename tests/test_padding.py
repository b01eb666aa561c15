"""Content is padded to size buckets inside the AEAD (ADR-0016; issue 13, item 10).

A database thief — or the relay — reads every ciphertext's length. Before padding, an event's
ciphertext was exactly its plaintext plus 16 bytes, so `len()` gave away the length of every
message and DM. These are the attacker's checks: two different messages in one bucket must be
indistinguishable by size, and a member who crafts a malformed padding (with the real key, so
the AEAD holds) must not get it opened.
"""

from __future__ import annotations

import msgspec
import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import _crypto, padding
from model import content as contentmod
from model._crypto import CryptoError
from model.dm import open_dm, seal_dm
from model.envelope import (
    MAX_BODY_BYTES,
    EventBody,
    SignedEvent,
    content_associated_data,
    decode_body,
    open_content,
    sign_body,
    verify_event,
)
from model.ids import new_id
from tests.helpers import TS0, make_event, new_actor, new_collab_key

ALICE = new_actor("alice")
BOB = new_actor("bob")
COLLAB = new_id("c")
CK = new_collab_key()
EVIDENCE = contentmod.Evidence("dev-1", 7, b"\x01" * 32, 41, b"\x02" * 32, TS0)


def _message(text: str) -> bytes:
    return contentmod.encode_content(contentmod.Message(text), EVIDENCE)


def _dm(text: str) -> bytes:
    return seal_dm(
        signing_key=ALICE.signing_key,
        sender_box_key=ALICE.box_key,
        recipient_box_pk=BOB.row.box_pk,
        collab_id=COLLAB,
        sender_id=ALICE.account_id,
        recipient_id=BOB.account_id,
        ts=TS0,
        epoch=0,
        content=contentmod.encode_content(contentmod.Message(text)),
    ).body


@pytest.mark.objective("SO-1")
def test_two_messages_of_different_lengths_in_one_bucket_seal_to_the_same_size() -> None:
    short, longer = _message("ok"), _message("see you at the usual place at nine, bring the key")
    assert len(short) != len(longer)
    assert padding.bucket_size(len(short) + 2) == padding.bucket_size(len(longer) + 2)
    a = make_event(ALICE, COLLAB, CK, content=short)
    b = make_event(ALICE, COLLAB, CK, content=longer)
    assert len(decode_body(a.body).ciphertext) == len(decode_body(b.body).ciphertext)
    assert len(a.body) == len(b.body)  # what the ledger stores and the wire carries
    # Both still open to exactly what was sealed.
    assert open_content(verify_event(a, ALICE.sign_pk), CK) == short
    assert open_content(verify_event(b, ALICE.sign_pk), CK) == longer
    # A message in the next bucket up is bigger: the buckets are real.
    c = make_event(ALICE, COLLAB, CK, content=_message("x" * 400))
    assert len(c.body) > len(a.body)
    # Direct messages are padded the same way.
    assert len(_dm("ok")) == len(_dm("see you at the usual place at nine, bring the key"))


def _forged_event(padded: bytes) -> SignedEvent:
    """An event whose sealed plaintext is exactly `padded`, made with the real collab key (a
    member crafting it, or a buggy client): the AEAD holds, only the padding is wrong."""
    header = EventBody(1, COLLAB, ALICE.account_id, "msg", TS0, (), b"", b"", 0)
    nonce = _crypto.random_bytes(_crypto.AEAD_NONCE_BYTES)
    sealed = _crypto.aead_encrypt(CK, nonce, padded, content_associated_data(header))
    body = msgspec.structs.replace(header, nonce=nonce, ciphertext=sealed)
    return sign_body(ALICE.signing_key, body)


MALFORMED = {
    "byte-after-end": b"\x00" + b"hello" + b"\x80" + b"\x00" * 10 + b"\x01" + b"\x00" * 239,
    "no-end-byte": b"\x00" + b"hello" + b"\x00" * 250,
    "all-zeros": b"\x00" * 256,
    "marker-only": b"\x00",
    "end-byte-not-0x80": b"\x00" + b"hello" + b"\x81" + b"\x00" * 249,
}


@pytest.mark.objective("SO-1")
@pytest.mark.parametrize("how", sorted(MALFORMED))
def test_a_tampered_pad_fails_to_open(how: str) -> None:
    verified = verify_event(_forged_event(MALFORMED[how]), ALICE.sign_pk)
    with pytest.raises(CryptoError):
        open_content(verified, CK)
    # A direct message with a malformed padding does not open either.
    header = EventBody(1, COLLAB, ALICE.account_id, "dm", TS0, (BOB.account_id,), b"", b"", 0)
    box = nacl.public.Box(ALICE.box_key, nacl.public.PublicKey(BOB.row.box_pk))
    nonce = _crypto.random_bytes(nacl.public.Box.NONCE_SIZE)
    dm_body = msgspec.structs.replace(
        header, nonce=nonce, ciphertext=box.encrypt(MALFORMED[how], nonce).ciphertext
    )
    dm = verify_event(sign_body(ALICE.signing_key, dm_body), ALICE.sign_pk)
    with pytest.raises(CryptoError):
        open_dm(dm, BOB.box_key, ALICE.row.box_pk)


@pytest.mark.objective("SO-1")
def test_a_flipped_byte_in_the_padding_fails_the_aead() -> None:
    signed = make_event(ALICE, COLLAB, CK, content=_message("hi"))
    body = decode_body(signed.body)
    ct = bytearray(body.ciphertext)
    ct[len(ct) - 20] ^= 0x01  # inside the zero padding, before the tag
    tampered = msgspec.structs.replace(body, ciphertext=bytes(ct))
    verified = verify_event(sign_body(ALICE.signing_key, tampered), ALICE.sign_pk)
    with pytest.raises(CryptoError):
        open_content(verified, CK)


def test_content_sealed_before_padding_still_opens() -> None:
    legacy = _message("written by an older client")
    assert legacy[0] != padding.MARKER  # a msgpack map: never the marker byte
    verified = verify_event(_forged_event(legacy), ALICE.sign_pk)
    assert open_content(verified, CK) == legacy


def test_the_buckets_are_the_documented_ones() -> None:
    sizes = sorted({padding.bucket_size(n) for n in range(1, 40_000)})
    assert sizes[:7] == [256, 512, 1024, 2048, 4096, 8192, 16384]
    assert sizes[7:] == [24576, 32768, 40960]  # then every 8 KiB
    # The largest content an event can hold still fits: the last bucket is cut to the limit.
    signed = make_event(ALICE, COLLAB, CK, content=b"\x07" * 63_000)
    assert len(signed.body) == MAX_BODY_BYTES


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=20_000))
def test_pad_and_unpad_round_trip_to_a_bucket(data: bytes) -> None:
    padded = padding.pad(data, limit=MAX_BODY_BYTES)
    assert len(padded) == padding.bucket_size(len(data) + 2)
    assert len(padded) >= len(data) + 2
    assert len(padded) < max(2 * (len(data) + 2), padding.MIN_BUCKET + 1) + padding.STEP_FROM
    assert padding.unpad(padded) == data
