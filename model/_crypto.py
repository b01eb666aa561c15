"""The raw primitives, in one clearly marked place (our "hazmat" layer).

Everything above this module speaks in recipes (sealed events, receipts, chains); only this
module touches libsodium directly. Every failure of a recipe surfaces as one opaque error type so
that callers cannot build oracles out of *why* a check failed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

HASH_BYTES = 32
AEAD_KEY_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
AEAD_NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
AEAD_TAG_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
SIGN_PK_BYTES = 32
SIGN_SEED_BYTES = 32
SIGNATURE_BYTES = 64
_LENGTH = struct.Struct(">Q")


class CryptoError(Exception):
    """A cryptographic check failed. Deliberately says nothing about which check or why."""


def domain_hash(domain: bytes, *parts: bytes) -> bytes:
    """BLAKE2b-256 over a domain label and length-prefixed parts.

    Length prefixes make the encoding injective, so two different part lists can never hash
    alike by shifting bytes between neighbours.
    """
    # hashlib's BLAKE2b is the same function as libsodium's generichash (unkeyed, 32-byte
    # digest), fed incrementally: no copy of a 4 KiB body into a buffer, and no per-call
    # binding overhead (~5x cheaper per event id; tests/test_model_hash.py pins the two equal).
    h = hashlib.blake2b(domain, digest_size=HASH_BYTES)
    for part in parts:
        h.update(_LENGTH.pack(len(part)))
        h.update(part)
    return h.digest()


def random_bytes(n: int) -> bytes:
    return sodium.randombytes(n)


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    _check_len("AEAD key", key, AEAD_KEY_BYTES)
    _check_len("AEAD nonce", nonce, AEAD_NONCE_BYTES)
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, associated, nonce, key)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Authenticate, then decrypt. Raises `CryptoError` for every failure alike."""
    if len(key) != AEAD_KEY_BYTES or len(nonce) != AEAD_NONCE_BYTES:
        raise CryptoError("decryption failed")
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, associated, nonce, key)
    except nacl.exceptions.CryptoError:
        raise CryptoError("decryption failed") from None


def signing_key_from_seed(seed: bytes) -> nacl.signing.SigningKey:
    _check_len("signing seed", seed, SIGN_SEED_BYTES)
    return nacl.signing.SigningKey(seed)


def sign(key: nacl.signing.SigningKey, message: bytes) -> bytes:
    return key.sign(message).signature


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True only when `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    if len(public_key) != SIGN_PK_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _check_len(what: str, value: bytes, expected: int) -> None:
    if len(value) != expected:
        raise ValueError(f"{what} must be {expected} bytes, got {len(value)}")
