"""Statements an account signs with its own key so that a session token alone cannot act.

A login session proves only that someone knows the login password. Everything that changes
state therefore carries a signature by the account's Ed25519 key, which lives only in the
sealed keystore: events (model/envelope.py; management proofs travel as events,
model/membership.py), keystore writes, key rotations, and the other changing requests (here).
Each statement has its own domain label and binds who, what and which version/time, so a
signature made for one purpose or one account cannot be replayed for another.

Signed requests (ADR-0019). A request that changes state without carrying a signed statement
of its own — creating or revoking an agent, a tool call, each artifact piece, a password
change, ending sessions — carries `sig` over `request_signing_bytes`: the connection's
`challenge` (random, from `Welcome`), the signer's account id, the request's wire tag and its
fields in a canonical form. The challenge makes a signature good on one connection only: a
session thief cannot replay what the owner's client signed elsewhere, and nothing signed needs
a clock or a nonce store. The canonical form is the msgpack encoding of the request's fields
other than `sig`, sorted by name, leaving out those at their default: a field added later with
a default keeps every older client's signatures valid (model/wire.py's evolution rule).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final, NamedTuple

import msgspec

from model import _crypto

if TYPE_CHECKING:
    import nacl.signing

    from model import wire

DOMAIN_KEYSTORE_WRITE: Final = b"cozylabs/v1/keystore-write\x00"
DOMAIN_ACCOUNT_REKEY: Final = b"cozylabs/v1/account-rekey\x00"
DOMAIN_COLLAB_REKEY: Final = b"cozylabs/v1/collab-rekey\x00"
DOMAIN_REQUEST: Final = b"cozylabs/v1/signed-request\x00"
CHALLENGE_BYTES: Final = 32

_canonical = msgspec.msgpack.Encoder(order="sorted")


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


# --- signed requests (ADR-0019) -------------------------------------------------------------


def request_signing_bytes(challenge: bytes, account_id: str, request: wire.Request) -> bytes:
    """What the account key signs to send `request` on the connection that sent `challenge`.

    `request` must be a request type with a `sig` field (its value is ignored here). Raises
    `TypeError` for one without: only the signed request types are ever signed.
    """
    fields = msgspec.structs.fields(request)
    if not any(f.name == "sig" for f in fields):
        raise TypeError(f"{type(request).__name__} is not a signed request type")
    canonical: dict[str, object] = {}
    for f in fields:
        if f.name == "sig":
            continue
        value = getattr(request, f.name)
        if f.default is not msgspec.NODEFAULT and value == f.default:
            continue
        if f.default_factory is not msgspec.NODEFAULT and value == f.default_factory():
            continue
        canonical[f.name] = value
    tag = request.__struct_config__.tag
    assert isinstance(tag, str), "request types are tagged"
    return DOMAIN_REQUEST + _crypto.domain_hash(
        b"", challenge, account_id.encode(), tag.encode(), _canonical.encode(canonical)
    )


def sign_request(
    key: nacl.signing.SigningKey, challenge: bytes, account_id: str, request: wire.Request
) -> bytes:
    return _crypto.sign(key, request_signing_bytes(challenge, account_id, request))


def verify_request(
    public_key: bytes, challenge: bytes, account_id: str, request: wire.Request
) -> bool:
    """True only when the request's `sig` is `public_key`'s signature over it as sent on the
    connection with `challenge`. False for a missing challenge or a request without `sig`."""
    sig = getattr(request, "sig", None)
    if len(challenge) != CHALLENGE_BYTES or not isinstance(sig, bytes):
        return False
    return _crypto.verify(public_key, request_signing_bytes(challenge, account_id, request), sig)
