"""Collab key epochs (SO-7): wrapping each epoch's key for exactly the verified members.

When membership changes by removal (or an explicit rotation), the rotating human draws a fresh
32-byte collab key and seals it (X25519 sealed box) to every reader of the *verified*
membership — computed by the fold in model/membership.py, never from a list the relay supplies.
The set of wraps is signed by the rotating member together with the collab id and epoch, so
the relay can neither move a wrap to another collab or epoch nor add a recipient.

A client opens its wrap only after checking: the signer is a human owner or manager in the
membership it folded itself, the epoch is that membership's epoch, and the recipients are
exactly that membership's readers. A removed member has no wrap for the new epoch and cannot
derive the key — the property SO-7 asks for.

Not wired into the relay or the client kit yet (issue 4).
"""

from __future__ import annotations

from typing import Final

import msgspec
import nacl.exceptions
import nacl.public
import nacl.signing

from model import _crypto
from model.errors import ModelError
from model.membership import MemberKind, Membership, Role

DOMAIN_EPOCH_WRAPS: Final = b"cozylabs/v1/epoch-key-wraps\x00"
KEY_BYTES: Final = 32


class EpochKeyWraps(msgspec.Struct, frozen=True, array_like=True):
    collab_id: str
    epoch: int
    signer_id: str
    wraps: dict[str, bytes]  # account id → sealed box of the epoch key
    sig: bytes = b""

    def __repr__(self) -> str:
        return f"EpochKeyWraps({self.collab_id}, epoch={self.epoch}, to={sorted(self.wraps)})"


class WrapsRejected(ModelError):
    """The wraps are not acceptable for the membership this client verified."""


class NotARecipient(WrapsRejected):
    """This account has no wrap in this epoch: it is not (or no longer) a member."""


_encoder = msgspec.msgpack.Encoder()


def _signing_bytes(w: EpochKeyWraps) -> bytes:
    unsigned = msgspec.structs.replace(w, sig=b"")
    return DOMAIN_EPOCH_WRAPS + _encoder.encode(unsigned)


def new_epoch_key() -> bytes:
    return _crypto.random_bytes(KEY_BYTES)


def wrap_epoch_key(
    signing_key: nacl.signing.SigningKey, signer_id: str, state: Membership, epoch_key: bytes
) -> EpochKeyWraps:
    """Seal `epoch_key` for every reader of `state` and sign the result as `signer_id`."""
    if len(epoch_key) != KEY_BYTES:
        raise ValueError("an epoch key is 32 bytes")
    wraps = {
        m.account_id: bytes(
            nacl.public.SealedBox(nacl.public.PublicKey(m.box_pk)).encrypt(epoch_key)
        )
        for m in state.readers()
    }
    unsigned = EpochKeyWraps(state.collab_id, state.epoch, signer_id, wraps)
    return msgspec.structs.replace(
        unsigned, sig=_crypto.sign(signing_key, _signing_bytes(unsigned))
    )


def open_epoch_key(
    wraps: EpochKeyWraps, state: Membership, account_id: str, box_key: nacl.public.PrivateKey
) -> bytes:
    """This account's epoch key, after checking the wraps against the verified `state`.

    Raises `WrapsRejected` (wrong collab or epoch, a signer without the power to rotate, a bad
    signature, recipients other than exactly the members), `NotARecipient` when this account
    has no wrap, and `CryptoError` when its wrap does not open.
    """
    if (wraps.collab_id, wraps.epoch) != (state.collab_id, state.epoch):
        raise WrapsRejected("the wraps are for another collab or epoch")
    signer = state.members.get(wraps.signer_id)
    if signer is None:
        # A member who leaves cannot hand out the next key; an owner or manager rotates.
        raise WrapsRejected("the wraps are signed by someone who is not a member")
    if signer.kind is not MemberKind.HUMAN or signer.role not in (Role.OWNER, Role.MANAGER):
        raise WrapsRejected("the wraps are not signed by an owner or manager")
    if not _crypto.verify(signer.sign_pk, _signing_bytes(wraps), wraps.sig):
        raise WrapsRejected("the wraps' signature does not verify")
    expected = {m.account_id for m in state.readers()}
    if set(wraps.wraps) != expected:
        raise WrapsRejected("the wraps are not addressed to exactly the collab's members")
    mine = wraps.wraps.get(account_id)
    if mine is None:
        raise NotARecipient("this account is not a member in this epoch")
    try:
        key = nacl.public.SealedBox(box_key).decrypt(mine)
    except nacl.exceptions.CryptoError:
        raise _crypto.CryptoError("this account's wrap does not open") from None
    if len(key) != KEY_BYTES:
        raise WrapsRejected("the wrapped key has the wrong length")
    return bytes(key)
