"""Artifacts: large encrypted blobs, sealed and checked chunk by chunk, named by a content hash.

A member seals a file with libsodium's secretstream (XChaCha20-Poly1305, one authenticated
chunk at a time, the last one tagged FINAL) under the collab key, with the collab id as
associated data on every chunk. The relay stores only the ciphertext and names it by its ref:
``b2:`` + the BLAKE2b-256 of the whole ciphertext stream (header and chunks), so anyone can
check a download against the ref without the key, and an event can point at it opaquely.

Nothing here holds a whole file: sealing and opening take and give one chunk at a time, so
clients and relay can stream. Truncation (no FINAL chunk), reordering, splicing from another
artifact or collab, and any flipped byte all fail.

Not wired into the relay or the client kit yet (issue 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import nacl.bindings as sodium
import nacl.exceptions
import nacl.hashlib

from model._crypto import AEAD_KEY_BYTES, CryptoError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

CHUNK_BYTES: Final = 64 * 1024
HEADER_BYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
SEALED_CHUNK_OVERHEAD: Final = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
DOMAIN_ARTIFACT_AD: Final = b"cozylabs/v1/artifact\x00"
REF_PREFIX: Final = "b2:"
_TAG_MESSAGE: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL


class RefMismatch(CryptoError):
    """The bytes do not hash to the ref they were fetched under."""


class RefHasher:
    """Incremental ref of a ciphertext stream; anyone can check a download with it."""

    def __init__(self) -> None:
        self._h = nacl.hashlib.blake2b(digest_size=32)

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def ref(self) -> str:
        return REF_PREFIX + self._h.hexdigest()


def seal_stream(collab_key: bytes, collab_id: str, plaintext: Iterable[bytes]) -> Iterator[bytes]:
    """Yield the header, then one sealed chunk per CHUNK_BYTES of plaintext (the last FINAL).

    Input pieces of any size are re-cut into CHUNK_BYTES chunks, holding at most one chunk.
    """
    if len(collab_key) != AEAD_KEY_BYTES:
        raise ValueError("the collab key is 32 bytes")
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    yield bytes(sodium.crypto_secretstream_xchacha20poly1305_init_push(state, collab_key))
    ad = DOMAIN_ARTIFACT_AD + collab_id.encode()
    pending = bytearray()
    for piece in plaintext:
        pending += piece
        while len(pending) > CHUNK_BYTES:
            chunk = bytes(pending[:CHUNK_BYTES])
            del pending[:CHUNK_BYTES]
            yield sodium.crypto_secretstream_xchacha20poly1305_push(state, chunk, ad, _TAG_MESSAGE)
    yield sodium.crypto_secretstream_xchacha20poly1305_push(state, bytes(pending), ad, _TAG_FINAL)


def open_stream(collab_key: bytes, collab_id: str, sealed: Iterable[bytes]) -> Iterator[bytes]:
    """Yield the plaintext chunk by chunk from the header and sealed chunks `seal_stream` made.

    `sealed` must yield the header first, then each sealed chunk as one item (the relay stores
    and serves them that way). Raises `CryptoError` on any tampering, on a missing FINAL chunk,
    and on data after it.
    """
    chunks = iter(sealed)
    header = next(chunks, b"")
    if len(header) != HEADER_BYTES:
        raise CryptoError("the artifact does not open")
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    try:
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, collab_key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError):
        raise CryptoError("the artifact does not open") from None
    ad = DOMAIN_ARTIFACT_AD + collab_id.encode()
    finished = False
    for chunk in chunks:
        if finished:
            raise CryptoError("the artifact has data after its final chunk")
        try:
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(state, chunk, ad)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError):
            raise CryptoError("the artifact does not open") from None
        finished = tag == _TAG_FINAL
        yield plain
    if not finished:
        raise CryptoError("the artifact is truncated")


def check_ref(ref: str, sealed: Iterable[bytes]) -> Iterator[bytes]:
    """Pass `sealed` through unchanged; at the end raise `RefMismatch` unless it hashes to `ref`."""
    hasher = RefHasher()
    for piece in sealed:
        hasher.update(piece)
        yield piece
    if hasher.ref() != ref:
        raise RefMismatch("the artifact does not match its ref")
