"""A device's own verified fold, sealed to keep: what `CollabView.seal` writes and
`CollabView.resume` reads (model/view.py).

A read that resumes from a kept fold skips verifying what this device verified before, so the
kept bytes must be this device's work and nobody else's: they are sealed (XChaCha20-Poly1305)
under a key derived from the account's box key — only the unlocked account opens them, and
they hold epoch keys, which stay as private as the keystore — with the collab, the account and
the head they were made at as associated data. A kept fold that does not open for exactly that
head raises `SnapshotRejected`, and the reader starts at the genesis instead. Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from model._crypto import AEAD_NONCE_BYTES, CryptoError, aead_decrypt, aead_encrypt, domain_hash
from model._crypto import random_bytes as _random_bytes
from model.errors import ModelError
from model.membership import Membership
from model.merkle import CompactRange

if TYPE_CHECKING:
    import nacl.public

    from model.chain import Head

_KEY_DOMAIN = b"cozy/view-snapshot-key/v1"
_AD_DOMAIN = b"cozy/view-snapshot/v1"


class SnapshotRejected(ModelError):
    """A kept fold does not open as this device's own for the saved head."""


class Snapshot(msgspec.Struct, frozen=True, array_like=True):
    """A fold's state at its head (everything `CollabView` keeps but its keys' owner)."""

    collab_id: str
    account_id: str
    seq: int
    chain: bytes
    membership: Membership | None
    keys: dict[int, bytes]
    bad_wraps: list[int]
    joined: bool
    chains: list[bytes]  # the chain hash after each seq, from 0
    ids: list[bytes]
    streams: list[tuple[str, str, int, bytes]]  # (author, device, counter, last event id)
    whole: bool
    # The border of the Merkle tree over `ids` in seq order (model.merkle.CompactRange.nodes).
    # None in a fold kept before views carried it: such a fold is not resumed (read again).
    tree: list[bytes] | None = None


def _key(box_key: nacl.public.PrivateKey) -> bytes:
    return domain_hash(_KEY_DOMAIN, bytes(box_key))


def _ad(collab_id: str, account_id: str, seq: int, chain: bytes) -> bytes:
    return domain_hash(
        _AD_DOMAIN, collab_id.encode(), account_id.encode(), str(seq).encode(), chain
    )


def seal_snapshot(snap: Snapshot, box_key: nacl.public.PrivateKey) -> bytes:
    nonce = _random_bytes(AEAD_NONCE_BYTES)
    ad = _ad(snap.collab_id, snap.account_id, snap.seq, snap.chain)
    return nonce + aead_encrypt(_key(box_key), nonce, msgspec.msgpack.encode(snap), ad)


def open_snapshot(
    sealed: bytes, head: Head, collab_id: str, account_id: str, box_key: nacl.public.PrivateKey
) -> tuple[Snapshot, CompactRange]:
    """The kept fold of `collab_id` by `account_id` at exactly `head`, and its tree. Raises
    `SnapshotRejected` for anything else (damaged, edited, another head, another key, kept by
    an older client without a tree)."""
    nonce, box = sealed[:AEAD_NONCE_BYTES], sealed[AEAD_NONCE_BYTES:]
    try:
        plain = aead_decrypt(
            _key(box_key), nonce, box, _ad(collab_id, account_id, head.seq, head.chain)
        )
        snap = msgspec.msgpack.decode(plain, type=Snapshot)
    except (CryptoError, msgspec.DecodeError, msgspec.ValidationError):
        raise SnapshotRejected("the kept view does not open for this head") from None
    if (
        (snap.collab_id, snap.account_id, snap.seq, snap.chain)
        != (collab_id, account_id, head.seq, head.chain)
        or len(snap.chains) != head.seq + 1
        or snap.chains[-1] != head.chain
    ):
        raise SnapshotRejected("the kept view is not of this head")
    return snap, _tree(snap)


def _tree(snap: Snapshot) -> CompactRange:
    """The kept fold's tree border, which must be of the head's size (none at all: kept by an
    older client, so the reader reads again from the genesis)."""
    try:
        return CompactRange.from_nodes(snap.seq, () if snap.tree is None else snap.tree)
    except ValueError:
        raise SnapshotRejected("the kept view carries no tree of its head's size") from None
