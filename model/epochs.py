"""Collab key epochs (SO-7): wrapping each epoch's key for exactly the verified members.

When membership changes by removal (or an explicit rotation), the rotating human draws a fresh
32-byte collab key and seals it (X25519 sealed box) to every reader of the *verified*
membership — computed by the fold in model/membership.py, never from a list the relay supplies.
The wraps travel inside the signed management event, and the fold checks their recipient set,
so the relay can neither add a recipient nor move a wrap to another collab or epoch.

A removed member has no wrap for the new epoch and cannot derive its key — the property SO-7
asks for. A wrap opens only with its recipient's box key, so a wrap handed to someone else is
useless to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import nacl.exceptions
import nacl.public

from model import _crypto
from model.errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from model.membership import Member

KEY_BYTES: Final = 32


class NotARecipient(ModelError):
    """This account has no wrap for that epoch: it is not (or was not yet) a member then."""


def new_epoch_key() -> bytes:
    return _crypto.random_bytes(KEY_BYTES)


def wrap_for(members: Iterable[Member], epoch_key: bytes) -> dict[str, bytes]:
    """Seal `epoch_key` to each member's pinned X25519 key."""
    if len(epoch_key) != KEY_BYTES:
        raise ValueError("an epoch key is 32 bytes")
    return {
        m.account_id: bytes(
            nacl.public.SealedBox(nacl.public.PublicKey(m.box_pk)).encrypt(epoch_key)
        )
        for m in members
    }


def open_wrap(wraps: dict[str, bytes], account_id: str, box_key: nacl.public.PrivateKey) -> bytes:
    """This account's epoch key. Raises `NotARecipient` when it has no wrap, and `CryptoError`
    when its wrap does not open (a member sealed garbage for it)."""
    mine = wraps.get(account_id)
    if mine is None:
        raise NotARecipient("this account is not a recipient of that epoch key")
    try:
        key = nacl.public.SealedBox(box_key).decrypt(mine)
    except nacl.exceptions.CryptoError:
        raise _crypto.CryptoError("this account's wrap does not open") from None
    if len(key) != KEY_BYTES:
        raise _crypto.CryptoError("the wrapped key has the wrong length")
    return bytes(key)
