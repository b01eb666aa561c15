"""Statements an account signs with its own key so that a session token alone cannot act.

A login session proves only that someone knows the login password. Everything that changes
state therefore carries a signature by the account's Ed25519 key, which lives only in the
sealed keystore: events (model/envelope.py), keystore writes and collab creation (here).
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
DOMAIN_CREATE_COLLAB: Final = b"cozylabs/v1/create-collab\x00"
# A collab-creation proof must be this fresh (ms) when it reaches the relay.
CREATE_COLLAB_MAX_SKEW_MS: Final = 10 * 60 * 1000


def keystore_write_bytes(account_id: str, version: int, blob: bytes) -> bytes:
    """What the account key signs to store `blob` as keystore `version` (empty blob = delete)."""
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
    return _crypto.verify(public_key, keystore_write_bytes(account_id, version, blob), sig)


def create_collab_bytes(collab_id: str, account_id: str, ts: int) -> bytes:
    return DOMAIN_CREATE_COLLAB + _crypto.domain_hash(
        b"", collab_id.encode(), account_id.encode(), struct.pack(">Q", ts)
    )


def sign_create_collab(
    key: nacl.signing.SigningKey, collab_id: str, account_id: str, ts: int
) -> bytes:
    return _crypto.sign(key, create_collab_bytes(collab_id, account_id, ts))


def verify_create_collab(
    public_key: bytes, collab_id: str, account_id: str, ts: int, sig: bytes
) -> bool:
    return _crypto.verify(public_key, create_collab_bytes(collab_id, account_id, ts), sig)
