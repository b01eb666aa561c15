"""RFC 9162 Merkle trees (the hashing of Certificate Transparency 2.0, section 2.1): the pure half.

What lives here: the leaf and node hashes, the Merkle Tree Hash (MTH) of a list of leaf hashes,
inclusion and consistency proofs (generation and verification, written from the RFC's own
recursive definitions and verification algorithms), and two incremental shapes for an
append-only log. What does not: where leaves come from (the ledger), checkpoints and signatures
(`model/tlog.py`), and any I/O.

Hashing is SHA-256 throughout, as RFC 9162 and C2SP `tlog-checkpoint` require (the rest of the
pure core uses BLAKE2b through `model/_crypto.py`; a checkpoint must be checkable by any
implementation of the specs, so this tree cannot)::

    leaf hash = SHA-256(0x00 || leaf data)
    node hash = SHA-256(0x01 || left || right)
    MTH({})   = SHA-256("")

Incremental shapes, and what each costs per appended leaf (one "hash" is one SHA-256 over at
most 65 bytes, measured against an Ed25519 signature in docs/adr/0020-signed-checkpoints.md):

- `CompactRange` keeps only the roots of the perfect subtrees the log decomposes into (one per
  set bit of its size, so at most 64 hashes for any size that fits a checkpoint). Appending a
  leaf costs one hash per trailing one-bit of the old size: one on average, ⌊log2 n⌋ at worst.
  The root costs popcount(n) - 1 more hashes, paid once per checkpoint, not per leaf. It is what
  a relay keeps in memory per tree, and what it persists to resume after a restart.
- `GroupTree` is one commit group appended to a `CompactRange`: from the range before the group
  and the group's leaf hashes alone it derives the new root, an inclusion proof for every leaf
  of the group, and the consistency proof from the size before the group. Each node it needs is
  hashed once (memoised), so a group of k leaves on a tree of n costs about 2k + popcount(n)
  node hashes in total (k to extend the range, k for the proofs' nodes, the rest for the root;
  counted in tests/test_model_merkle.py), plus the caller's k leaf hashes. That is what lets a
  relay sign one checkpoint per commit group and hand every event an inclusion proof under it,
  and hand a witness the consistency proof from the last checkpoint, without reading old leaves.

Proofs for other positions (an event from an older group, a client whose last checkpoint is
older than the previous group) need old subtree hashes: the list-based functions
(`inclusion_proof`, `consistency_proof`) take every leaf hash of the tree and cost O(n) hashes
per call. A relay that serves many of those keeps perfect-subtree hashes on disk (C2SP
`tlog-tiles` is one layout); that store is not built here.

Failures of verification raise `InclusionProofInvalid` or `ConsistencyProofInvalid` (both
`ProofInvalid`); the message says which proof failed, never which byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from .errors import ModelError

HASH_BYTES: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""MTH of the empty tree: SHA-256 of the empty string (RFC 9162 section 2.1.1)."""

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
MAX_TREE_SIZE: Final = 2**63 - 1
"""Largest size a checkpoint may carry (tlog-checkpoint sizes travel as signed 64-bit values)."""


class ProofInvalid(ModelError):
    """A Merkle proof does not prove what it claims. Treat the party that sent it as lying."""


class InclusionProofInvalid(ProofInvalid):
    """The inclusion proof does not place this leaf at this index under this root."""


class ConsistencyProofInvalid(ProofInvalid):
    """The consistency proof does not show the old tree is a prefix of the new one."""


def leaf_hash(data: bytes) -> bytes:
    """The RFC 9162 hash of one leaf's data: SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 hash of an interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


# --- Proof generation over any source of subtree hashes ------------------------------------------
#
# Both algorithms below are RFC 9162 section 2.1.3.1 (PATH) and 2.1.4.1 (SUBPROOF), written over
# absolute ranges [lo, hi) of the tree and a callable that returns MTH(D[lo:hi]). Every range they
# ask for is a node of the RFC's recursive split, which is what lets `GroupTree` answer from a
# compact range plus new leaves.

RangeHash = Callable[[int, int], bytes]


def _path(index: int, lo: int, hi: int, mth: RangeHash) -> list[bytes]:
    """PATH(m, D[lo:hi]): the audit path from leaf `index` up to MTH(D[lo:hi]), leaf end first."""
    out: list[bytes] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            out.append(mth(lo + k, hi))
            hi = lo + k
        else:
            out.append(mth(lo, lo + k))
            lo = lo + k
    out.reverse()
    return out


def _subproof(m: int, lo: int, hi: int, complete: bool, mth: RangeHash) -> list[bytes]:
    """SUBPROOF(m, D[lo:hi], b), m counted from lo. Returns the proof in the RFC's order."""
    tail: list[bytes] = []
    while True:
        n = hi - lo
        if m == n:
            if not complete:
                tail.append(mth(lo, hi))
            break
        k = _split(n)
        if m <= k:
            tail.append(mth(lo + k, hi))
            hi = lo + k
        else:
            tail.append(mth(lo, lo + k))
            m -= k
            lo += k
            complete = False
    tail.reverse()
    return tail


def _check_size(size: int) -> None:
    if not 0 <= size <= MAX_TREE_SIZE:
        raise ValueError(f"tree size {size} is outside 0..2^63-1")


# --- Whole-list helpers (every leaf hash in hand) ------------------------------------------------


def _list_source(leaves: Sequence[bytes]) -> RangeHash:
    memo: dict[tuple[int, int], bytes] = {}

    def mth(lo: int, hi: int) -> bytes:
        key = (lo, hi)
        found = memo.get(key)
        if found is not None:
            return found
        if hi - lo == 1:
            h = leaves[lo]
        else:
            k = _split(hi - lo)
            h = node_hash(mth(lo, lo + k), mth(lo + k, hi))
        memo[key] = h
        return h

    return mth


def tree_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over the given leaf hashes (already `leaf_hash`ed). O(n) hashes, O(log n) memory."""
    rng = CompactRange()
    rng.extend(leaf_hashes)
    return rng.root()


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> tuple[bytes, ...]:
    """The RFC 9162 inclusion proof of leaf `index` in the tree of all `leaf_hashes`.

    Raises `ValueError` when `index` is not a leaf of that tree.
    """
    if not 0 <= index < len(leaf_hashes):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaf_hashes)} leaves")
    return tuple(_path(index, 0, len(leaf_hashes), _list_source(leaf_hashes)))


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> tuple[bytes, ...]:
    """The RFC 9162 consistency proof from the first `old_size` leaves to all of `leaf_hashes`.

    Empty when `old_size` is 0 or equal to the new size (C2SP tlog-witness sends an empty proof
    from size 0). Raises `ValueError` when `old_size` exceeds the tree.
    """
    n = len(leaf_hashes)
    if not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} is not within a tree of {n} leaves")
    if old_size in (0, n):
        return ()
    return tuple(_subproof(old_size, 0, n, True, _list_source(leaf_hashes)))


# --- Verification (RFC 9162 sections 2.1.3.2 and 2.1.4.2) ---------------------------------------


def _is_hash(value: bytes) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_BYTES


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Return only when `proof` places the leaf hash `leaf` at `index` in the tree (`size`, `root`).

    Raises `InclusionProofInvalid` for every failure alike: wrong index, size, root, proof
    length or any proof byte.
    """
    bad = InclusionProofInvalid(
        f"inclusion proof for leaf {index} under the tree of size {size} does not verify"
    )
    if not (0 <= index < size <= MAX_TREE_SIZE) or not _is_hash(leaf) or not _is_hash(root):
        raise bad
    if len(proof) > 64 or not all(_is_hash(p) for p in proof):
        raise bad
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise bad
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise bad


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Return only when `proof` shows the tree (`old_size`, `old_root`) is a prefix of the new one.

    Size 0 is consistent with anything given an empty proof and the empty root; equal sizes need
    an empty proof and equal roots. Raises `ConsistencyProofInvalid` for every failure alike.
    """
    bad = ConsistencyProofInvalid(
        f"consistency proof from size {old_size} to size {new_size} does not verify"
    )
    if not (0 <= old_size <= new_size <= MAX_TREE_SIZE):
        raise bad
    if not _is_hash(old_root) or not _is_hash(new_root):
        raise bad
    if len(proof) > 128 or not all(_is_hash(p) for p in proof):
        raise bad
    if old_size == 0:
        if proof or old_root != EMPTY_ROOT:
            raise bad
        return
    if old_size == new_size:
        if proof or old_root != new_root:
            raise bad
        return
    if not proof:
        raise bad
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two: the old root is a node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise bad
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise bad


# --- Incremental shapes --------------------------------------------------------------------------


class CompactRange:
    """The right border of an append-only Merkle tree: one perfect-subtree root per set bit.

    `nodes[i]` is the root of the i-th perfect subtree from the left, largest first; their sizes
    are the set bits of `size` from the highest down. That is all a log needs in memory to keep
    appending and to compute its root. Mutable: a relay owns one per tree; `copy()` snapshots it.
    """

    __slots__ = ("_nodes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._nodes: list[bytes] = []

    @classmethod
    def from_nodes(cls, size: int, nodes: Iterable[bytes]) -> CompactRange:
        """Restore a persisted range. Raises `ValueError` if the nodes cannot be of that size."""
        _check_size(size)
        listed = list(nodes)
        if len(listed) != size.bit_count() or not all(_is_hash(n) for n in listed):
            raise ValueError(f"a tree of size {size} has {size.bit_count()} 32-byte border nodes")
        rng = cls()
        rng._size = size
        rng._nodes = listed
        return rng

    @property
    def size(self) -> int:
        return self._size

    @property
    def nodes(self) -> tuple[bytes, ...]:
        return tuple(self._nodes)

    def copy(self) -> CompactRange:
        return CompactRange.from_nodes(self._size, self._nodes)

    def append(self, leaf: bytes) -> None:
        """Append one leaf hash. One node hash per trailing one-bit of the old size (1 on average)."""
        if not _is_hash(leaf):
            raise ValueError("a leaf hash is 32 bytes")
        if self._size >= MAX_TREE_SIZE:
            raise ValueError("the tree is full")
        carry, s = leaf, self._size
        while s & 1:
            carry = node_hash(self._nodes.pop(), carry)
            s >>= 1
        self._nodes.append(carry)
        self._size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        """MTH of the whole tree: popcount(size) - 1 node hashes (RFC 9162's right fold)."""
        if not self._nodes:
            return EMPTY_ROOT
        r = self._nodes[-1]
        for left in reversed(self._nodes[:-1]):
            r = node_hash(left, r)
        return r

    def spans(self) -> tuple[tuple[int, int], ...]:
        """The leaf range [lo, hi) each node covers, in the order of `nodes`."""
        out: list[tuple[int, int]] = []
        lo = 0
        for bit in reversed(range(self._size.bit_length())):
            if self._size >> bit & 1:
                out.append((lo, lo + (1 << bit)))
                lo += 1 << bit
        return tuple(out)


class GroupTree:
    """One commit group appended to a compact range: its root and all its proofs, no old leaves.

    `before` is the range as it stood before the group (it is copied, not changed). Every node
    hash is computed once and remembered: the root, every leaf's inclusion proof and the
    consistency proof cost about 2k + popcount(n) node hashes for a group of k on a tree of n.
    """

    __slots__ = ("_after", "_before_size", "_leaves", "_memo")

    def __init__(self, before: CompactRange, leaves: Sequence[bytes]) -> None:
        self._before_size = before.size
        self._leaves = tuple(leaves)
        self._memo: dict[tuple[int, int], bytes] = dict(
            zip(before.spans(), before.nodes, strict=True)
        )
        after = before.copy()
        after.extend(self._leaves)  # also validates every leaf hash
        self._after = after

    @property
    def old_size(self) -> int:
        return self._before_size

    @property
    def size(self) -> int:
        return self._after.size

    @property
    def after(self) -> CompactRange:
        """The compact range after the group (a copy: the caller may keep appending to it)."""
        return self._after.copy()

    def root(self) -> bytes:
        return self._after.root()

    def _mth(self, lo: int, hi: int) -> bytes:
        key = (lo, hi)
        found = self._memo.get(key)
        if found is not None:
            return found
        if hi - lo == 1:
            if lo < self._before_size:  # pragma: no cover - the proofs below never ask for it
                raise AssertionError(f"old leaf {lo} is not derivable from the compact range")
            h = self._leaves[lo - self._before_size]
        else:
            k = _split(hi - lo)
            h = node_hash(self._mth(lo, lo + k), self._mth(lo + k, hi))
        self._memo[key] = h
        return h

    def inclusion_proof(self, index: int) -> tuple[bytes, ...]:
        """Inclusion proof of leaf `index` (absolute, within this group) in the tree after it."""
        if not self._before_size <= index < self.size:
            raise ValueError(
                f"leaf {index} is not in this group ({self._before_size}..{self.size - 1})"
            )
        return tuple(_path(index, 0, self.size, self._mth))

    def inclusion_proofs(self) -> tuple[tuple[bytes, ...], ...]:
        """Every leaf's inclusion proof, in order: one walk down the new part of the tree.

        Same proofs as `inclusion_proof` for each index, several times cheaper for a whole group:
        each node is visited once and the paths share their upper parts.
        """
        out: list[tuple[bytes, ...]] = []
        m = self._before_size

        def walk(lo: int, hi: int, above: tuple[bytes, ...]) -> None:
            if hi - lo == 1:
                out.append(above)
                return
            mid = lo + _split(hi - lo)
            if mid > m:  # the left half holds new leaves
                walk(lo, mid, (self._mth(mid, hi), *above))
            walk(mid, hi, (self._mth(lo, mid), *above))

        if self.size > m:
            walk(0, self.size, ())
        return tuple(out)

    def consistency_proof(self) -> tuple[bytes, ...]:
        """Consistency proof from the size before the group to the size after it."""
        if self._before_size in (0, self.size):
            return ()
        return tuple(_subproof(self._before_size, 0, self.size, True, self._mth))


class LeafTree:
    """Every leaf and every perfect subtree hash of a growing tree, kept in memory.

    Unlike `CompactRange` it answers for any size up to its own: the root of the first m
    leaves, the inclusion proof of any leaf under any later size, and the consistency proof
    between any two sizes, each in O(log² n) node hashes (every range the RFC's recursion asks
    for splits into at most log n perfect subtrees, which are looked up, not recomputed). It
    costs about 2n stored hashes: the relay keeps one per active collab (ADR-0020), so that a
    reconnecting client or a heartbeat gets its proof from the size it last saw without
    reading the ledger.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        # _levels[j][i] is the hash of the perfect subtree of 2^j leaves starting at i * 2^j.
        self._levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        if not _is_hash(leaf):
            raise ValueError("a leaf hash is 32 bytes")
        _check_size(self.size + 1)
        level = 0
        node = leaf
        while True:
            row = self._levels[level]
            row.append(node)
            if len(row) % 2:
                return
            node = node_hash(row[-2], row[-1])
            level += 1
            if level == len(self._levels):
                self._levels.append([])

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def leaf(self, index: int) -> bytes:
        return self._levels[0][index]

    def _mth(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            level = n.bit_length() - 1
            return self._levels[level][lo >> level]
        k = _split(n)
        return node_hash(self._mth(lo, lo + k), self._mth(lo + k, hi))

    def _within(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} is not within a tree of {self.size} leaves")

    def root(self, size: int | None = None) -> bytes:
        """The root of the tree of the first `size` leaves (default: all)."""
        size = self.size if size is None else size
        self._within(size)
        return EMPTY_ROOT if size == 0 else self._mth(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> tuple[bytes, ...]:
        """Inclusion proof of leaf `index` in the tree of the first `size` leaves."""
        size = self.size if size is None else size
        self._within(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
        return tuple(_path(index, 0, size, self._mth))

    def consistency_proof(self, old_size: int, size: int | None = None) -> tuple[bytes, ...]:
        """Consistency proof from the first `old_size` leaves to the first `size`."""
        size = self.size if size is None else size
        self._within(size)
        if not 0 <= old_size <= size:
            raise ValueError(f"old size {old_size} is not within a tree of {size} leaves")
        if old_size in (0, size):
            return ()
        return tuple(_subproof(old_size, 0, size, True, self._mth))
