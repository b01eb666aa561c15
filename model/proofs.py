"""Statements an account signs with its own key so that a session token alone cannot act.

A login session proves only that someone knows the login password. Everything that changes
state therefore carries a signature by the account's Ed25519 key, which lives only in the
sealed keystore: events (model/envelope.py; management proofs travel as events,
model/membership.py), keystore writes and key rotations (here).
Each statement has its own domain label and binds who, what and which version/time, so a
signature made for one purpose or one account cannot be replayed for another.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final, NamedTuple

from model import _crypto

if TYPE_CHECKING:
    import nacl.signing

DOMAIN_KEYSTORE_WRITE: Final = b"cozylabs/v1/keystore-write\x00"
DOMAIN_ACCOUNT_REKEY: Final = b"cozylabs/v1/account-rekey\x00"
DOMAIN_COLLAB_REKEY: Final = b"cozylabs/v1/collab-rekey\x00"


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


# --- key rotation (`cozy account rotate-keys`, ADR-0017) ---------------------------------------
#
# A rotation replaces an account's two public keys, first in the relay's directory, then in
# every collab's fold. Each step carries two signatures over one statement: by the OLD signing
# key (the authority: it is the key registered or pinned so far) and by the NEW one (proof of
# possession, so nobody re-pins a key they cannot sign with, such as someone else's). The
# statement binds both key pairs and, for a collab, the collab; the directory's also binds the
# keystore written with it.


class KeyPair(NamedTuple):
    """An account's two public keys: Ed25519 for signing, X25519 for sealed boxes."""

    sign_pk: bytes
    box_pk: bytes


def account_rekey_bytes(
    account_id: str, old: KeyPair, new: KeyPair, keystore_version: int, keystore_blob: bytes
) -> bytes:
    """What the old and the new account key both sign to replace `old` by `new` in the
    relay's directory, storing `keystore_blob` as `keystore_version` with it."""
    if not 0 <= keystore_version < 2**64:
        raise ValueError("a keystore version is an unsigned 64-bit number")
    return DOMAIN_ACCOUNT_REKEY + _crypto.domain_hash(
        b"", account_id.encode(), *old, *new, struct.pack(">Q", keystore_version), keystore_blob
    )


def collab_rekey_bytes(collab_id: str, account_id: str, old: KeyPair, new: KeyPair) -> bytes:
    """What the NEW signing key signs inside a collab's `rekey` proof (its possession proof);
    the event carrying the proof is signed by the old, pinned key."""
    return DOMAIN_COLLAB_REKEY + _crypto.domain_hash(
        b"", collab_id.encode(), account_id.encode(), *old, *new
    )


def sign_collab_rekey(
    new_key: nacl.signing.SigningKey, collab_id: str, account_id: str, old: KeyPair, new: KeyPair
) -> bytes:
    return _crypto.sign(new_key, collab_rekey_bytes(collab_id, account_id, old, new))


def verify_collab_rekey(
    collab_id: str, account_id: str, old: KeyPair, new: KeyPair, possession: bytes
) -> bool:
    """True only when the holder of `new.sign_pk` signed this very re-pinning."""
    return _crypto.verify(
        new.sign_pk, collab_rekey_bytes(collab_id, account_id, old, new), possession
    )
