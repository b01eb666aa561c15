"""Direct messages (ADR-0023 in the source threat model): sealed per pair, not under the CK.

A DM between two members is encrypted with the X25519 key pair of sender and recipient
(libsodium `crypto_box`: XSalsa20-Poly1305 under their shared key), so the two of them — and
nobody else in the collab — can open it; the outer event is still Ed25519-signed by the sender
like any event. The routing context (collab, sender, recipient, time) is sealed inside and
checked on open, so the relay cannot re-address a DM to another pair or collab.

Not wired into the relay or the client kit yet (issue 4).
"""

from __future__ import annotations

import msgspec
import nacl.exceptions
import nacl.public

from model._crypto import CryptoError
from model.errors import DECODE_ERRORS


class _Sealed(msgspec.Struct, frozen=True, array_like=True):
    collab_id: str
    sender_id: str
    recipient_id: str
    ts: int
    content: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Sealed)


def seal_dm(
    sender_box_key: nacl.public.PrivateKey,
    recipient_box_pk: bytes,
    *,
    collab_id: str,
    sender_id: str,
    recipient_id: str,
    ts: int,
    content: bytes,
) -> bytes:
    box = nacl.public.Box(sender_box_key, nacl.public.PublicKey(recipient_box_pk))
    inner = _Sealed(collab_id, sender_id, recipient_id, ts, content)
    return bytes(box.encrypt(_encoder.encode(inner)))


def open_dm(
    my_box_key: nacl.public.PrivateKey,
    other_box_pk: bytes,
    sealed: bytes,
    *,
    collab_id: str,
    sender_id: str,
    recipient_id: str,
    ts: int,
) -> bytes:
    """The DM's content, for either participant. Raises `CryptoError` for anyone else, for
    tampering, and for a DM re-addressed to another collab, pair or time."""
    try:
        raw = nacl.public.Box(my_box_key, nacl.public.PublicKey(other_box_pk)).decrypt(sealed)
        inner = _decoder.decode(raw)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, *DECODE_ERRORS):
        raise CryptoError("the direct message does not open") from None
    if (inner.collab_id, inner.sender_id, inner.recipient_id, inner.ts) != (
        collab_id,
        sender_id,
        recipient_id,
        ts,
    ):
        raise CryptoError("the direct message does not open")
    return inner.content
