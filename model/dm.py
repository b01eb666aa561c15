"""Direct messages (ADR-0023 in the source threat model): sealed per pair, not under the CK.

A DM between two members is an event of kind ``dm`` whose content is encrypted with the X25519
key pair of sender and recipient (libsodium `crypto_box`: XSalsa20-Poly1305 under their shared
key) instead of the collab key, so the two of them — and nobody else in the collab — can open
it. The recipient is the event's single ref, so the relay can route the body to the two
participants only; the outer event is Ed25519-signed by the sender like any event. `crypto_box`
has no associated data, so the routing fields are sealed inside and checked on open: the DM
cannot be re-addressed to another collab, pair, time or epoch. What is sealed is padded to a
size bucket first, like every event's content (model/padding.py, ADR-0016).
"""

from __future__ import annotations

from typing import Final

import msgspec
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from model import _crypto, padding
from model.envelope import (
    DM_VERSION,
    KIND_DM,
    EventBody,
    SignedEvent,
    VerifiedEvent,
    content_associated_data,
    pad_for_body,
    sign_body,
)
from model.errors import DECODE_ERRORS

# crypto_box is XSalsa20-Poly1305 like secretbox: the same 16-byte tag.
_BOX_MAC_BYTES: Final = nacl.bindings.crypto_secretbox_MACBYTES
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(tuple[bytes, bytes])


def seal_dm(
    *,
    signing_key: nacl.signing.SigningKey,
    sender_box_key: nacl.public.PrivateKey,
    recipient_box_pk: bytes,
    collab_id: str,
    sender_id: str,
    recipient_id: str,
    ts: int,
    epoch: int,
    content: bytes,
) -> SignedEvent:
    header = EventBody(
        DM_VERSION, collab_id, sender_id, KIND_DM, ts, (recipient_id,), b"", b"", epoch
    )
    nonce = _crypto.random_bytes(nacl.public.Box.NONCE_SIZE)
    inner = _encoder.encode((content_associated_data(header), content))
    padded = pad_for_body(header, inner, nonce_bytes=len(nonce), tag_bytes=_BOX_MAC_BYTES)
    box = nacl.public.Box(sender_box_key, nacl.public.PublicKey(recipient_box_pk))
    sealed = box.encrypt(padded, nonce).ciphertext
    return sign_body(signing_key, msgspec.structs.replace(header, nonce=nonce, ciphertext=sealed))


def open_dm(event: VerifiedEvent, my_box_key: nacl.public.PrivateKey, other_box_pk: bytes) -> bytes:
    """The DM's content, for either participant (`other_box_pk` is the other one's pinned key).

    Raises `CryptoError` for anyone else, for tampering, and for a re-addressed DM.
    """
    b = event.body
    try:
        raw = nacl.public.Box(my_box_key, nacl.public.PublicKey(other_box_pk)).decrypt(
            b.ciphertext, b.nonce
        )
        ad, content = _decoder.decode(padding.unpad(raw))
    except (
        nacl.exceptions.CryptoError,
        nacl.exceptions.ValueError,
        padding.BadPadding,
        *DECODE_ERRORS,
    ):
        raise _crypto.CryptoError("the direct message does not open") from None
    if not _crypto.constant_time_equal(ad, content_associated_data(b)):
        raise _crypto.CryptoError("the direct message does not open")
    return content
