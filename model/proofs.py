"""Statements an account signs with its own key so that a session token alone cannot act.

A login session proves only that someone knows the login password. Everything that changes
state therefore carries a signature by the account's Ed25519 key, which lives only in the
sealed keystore: events (model/envelope.py; management proofs travel as events,
model/membership.py) and keystore writes (here).
Each statement has its own domain label and binds who, what and which version/time, so a
signature made for one purpose or one account cannot be replayed for another.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from model import _crypto

if TYPE_CHECKING:
    import nacl.signing

DOMAIN_KEYSTORE_WRITE: Final = b"cozylabs/v1/keystore-write\x00"


def keystore_write_bytes(account_id: str, version: int, blob: bytes) -> bytes:
    """What the account key signs to store `blob` as keystore `version` (empty blob = delete).

    Raises `ValueError` for a version outside 0..2**64-1 (it is signed as 8 bytes).
    """
    if not 0 <= version < 2**64:
        raise ValueError("a keystore version is an unsigned 64-bit number")
    return DOMAIN_KEYSTORE_WRITE + _crypto.domain_hash(
        b"", account_id.encode(), struct.pack(">Q", version), blob
    )


def sign_keystore_write(
    key: nacl.signing.SigningKey, account_id: str, version: int, blob: bytes
) -> bytes:
    return _crypto.sign(key, keystore_write_bytes(account_id, version, blob))


def verify_keystore_write(
    public_key: bytes, account_id: str, version: int, blob: bytes, sig: bytes
) -> bool:
    """True only for the account key's signature; False also for an impossible version (the
    relay calls this with whatever integer a client sent)."""
    if not 0 <= version < 2**64:
        return False
    return _crypto.verify(public_key, keystore_write_bytes(account_id, version, blob), sig)
