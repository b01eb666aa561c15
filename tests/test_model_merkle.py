"""RFC 9162 Merkle trees (model/merkle.py) against a naive transcription of the RFC.

The reference below is the RFC's recursive definitions on Python lists, slicing and all, with no
sharing of code with the module under test. Roots, inclusion proofs and consistency proofs must
agree for every (m, n) up to a bound, and for random larger trees; every tampered proof, index,
size or root must be refused (SO-4: a checkpoint's proofs are what a lying relay would forge).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.merkle import (
    EMPTY_ROOT,
    CompactRange,
    ConsistencyProofInvalid,
    GroupTree,
    InclusionProofInvalid,
    LeafTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

# --- The naive reference (RFC 9162 section 2.1, verbatim recursion over lists) ------------------


def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def ref_mth(d: list[bytes]) -> bytes:
    """MTH over raw leaf DATA, exactly as the RFC writes it."""
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return ref_leaf(d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = ref_k(n)
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = ref_k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


def data(n: int) -> list[bytes]:
    return [f"event {i}".encode() for i in range(n)]


def hashes(d: list[bytes]) -> list[bytes]:
    return [leaf_hash(x) for x in d]


# --- Agreement with the reference ---------------------------------------------------------------


def test_hashes_are_the_rfc_ones() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert (
        node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    )
    assert tree_root([]) == EMPTY_ROOT


def test_every_proof_up_to_size_40_matches_the_reference_and_verifies() -> None:
    """Exhaustive: every leaf of every tree, every (m, n) pair, 0 <= m <= n <= 40."""
    for n in range(41):
        d = data(n)
        lh = hashes(d)
        root = tree_root(lh)
        assert root == ref_mth(d)
        for i in range(n):
            proof = inclusion_proof(lh, i)
            assert list(proof) == ref_path(i, d)
            verify_inclusion(lh[i], i, n, proof, root)
        for m in range(n + 1):
            proof = consistency_proof(lh, m)
            assert list(proof) == ([] if m in (0, n) else ref_proof(m, d))
            verify_consistency(m, n, ref_mth(d[:m]), root, proof)


def test_a_leaf_tree_answers_for_every_earlier_size_as_the_whole_list_does() -> None:
    """LeafTree (what the relay keeps per collab) gives the reference's roots and proofs for
    every size it has passed, every leaf and every (m, n) pair up to 40, grown one at a time."""
    d = data(40)
    lh = hashes(d)
    tree = LeafTree()
    for n in range(41):
        for size in range(n + 1):
            assert tree.root(size) == ref_mth(d[:size])
            for i in range(size):
                assert list(tree.inclusion_proof(i, size)) == ref_path(i, d[:size])
            for m in range(size + 1):
                expected = [] if m in (0, size) else ref_proof(m, d[:size])
                assert list(tree.consistency_proof(m, size)) == expected
        if n < 40:
            tree.append(lh[n])
    with pytest.raises(ValueError, match="not within"):
        tree.root(41)
    with pytest.raises(ValueError, match="32 bytes"):
        tree.append(b"short")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(41, 300), data_=st.data())
def test_large_trees_match_the_reference(n: int, data_: st.DataObject) -> None:
    d = data(n)
    lh = hashes(d)
    root = tree_root(lh)
    assert root == ref_mth(d)
    i = data_.draw(st.integers(0, n - 1), label="index")
    assert list(inclusion_proof(lh, i)) == ref_path(i, d)
    verify_inclusion(lh[i], i, n, inclusion_proof(lh, i), root)
    m = data_.draw(st.integers(1, n - 1), label="old size")
    assert list(consistency_proof(lh, m)) == ref_proof(m, d)
    verify_consistency(m, n, ref_mth(d[:m]), root, consistency_proof(lh, m))


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8))
def test_compact_range_and_commit_groups_match_the_whole_list(sizes: list[int]) -> None:
    """Groups appended one after another: each group's root, inclusion proofs and consistency
    proof from the previous size equal the whole-list ones, using only the compact range."""
    rng = CompactRange()
    all_leaves: list[bytes] = []
    for k in sizes:
        group = [leaf_hash(f"e{len(all_leaves) + j}".encode()) for j in range(k)]
        tree = GroupTree(rng, group)
        assert rng.size == len(all_leaves)  # the range passed in is not changed
        all_leaves += group
        assert tree.size == len(all_leaves)
        assert tree.root() == tree_root(all_leaves) == ref_mth_hashed(all_leaves)
        expected = tuple(inclusion_proof(all_leaves, i) for i in range(tree.old_size, tree.size))
        assert tuple(tree.inclusion_proof(i) for i in range(tree.old_size, tree.size)) == expected
        assert tree.inclusion_proofs() == expected
        assert tree.consistency_proof() == consistency_proof(all_leaves, tree.old_size)
        rng = tree.after
        assert rng.root() == tree.root()
        assert len(rng.nodes) == rng.size.bit_count()
        restored = CompactRange.from_nodes(rng.size, rng.nodes)
        assert restored.root() == rng.root()


def ref_mth_hashed(lh: list[bytes]) -> bytes:
    if not lh:
        return hashlib.sha256(b"").digest()
    if len(lh) == 1:
        return lh[0]
    k = ref_k(len(lh))
    return hashlib.sha256(b"\x01" + ref_mth_hashed(lh[:k]) + ref_mth_hashed(lh[k:])).digest()


def test_a_group_costs_two_node_hashes_per_leaf(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-event cost the ADR quotes: appending k leaves to a compact range and deriving the
    root, every inclusion proof and the consistency proof hashes each node once."""
    import model.merkle as merkle

    calls = 0
    real = merkle.node_hash

    def counting(left: bytes, right: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return real(left, right)

    rng = CompactRange()
    rng.extend(hashes(data(100_003)))
    monkeypatch.setattr(merkle, "node_hash", counting)
    group = hashes(data(64))
    tree = GroupTree(rng, group)
    tree.root()
    tree.inclusion_proofs()
    tree.consistency_proof()
    # 64 to extend the range, 64 + 1 for the memoised proof nodes, popcount(n) - 1 for the root.
    assert calls <= 2 * 64 + (100_003).bit_count() + 2, calls


def test_from_nodes_refuses_a_border_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="border nodes"):
        CompactRange.from_nodes(5, [b"\x00" * 32])
    with pytest.raises(ValueError, match="border nodes"):
        CompactRange.from_nodes(1, [b"\x00" * 31])
    with pytest.raises(ValueError, match="2\\^63"):
        CompactRange.from_nodes(-1, [])


def test_proof_generation_refuses_positions_outside_the_tree() -> None:
    lh = hashes(data(5))
    with pytest.raises(ValueError, match="not in a tree"):
        inclusion_proof(lh, 5)
    with pytest.raises(ValueError, match="not within"):
        consistency_proof(lh, 6)
    tree = GroupTree(CompactRange(), lh)
    with pytest.raises(ValueError, match="not in this group"):
        GroupTree(tree.after, hashes(data(2))).inclusion_proof(4)


# --- Tampering ----------------------------------------------------------------------------------


def flip(proof: tuple[bytes, ...], at: int, bit: int) -> tuple[bytes, ...]:
    item = bytearray(proof[at])
    item[bit // 8] ^= 1 << (bit % 8)
    return (*proof[:at], bytes(item), *proof[at + 1 :])


@pytest.mark.objective("SO-4")
@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 200), data_=st.data())
def test_any_tampered_inclusion_proof_is_refused(n: int, data_: st.DataObject) -> None:
    """Flip any bit of any proof hash, claim another index or size, cut or pad the proof, or
    swap the leaf or root: the verifier refuses every one."""
    lh = hashes(data(n))
    root = tree_root(lh)
    i = data_.draw(st.integers(0, n - 1), label="index")
    proof = inclusion_proof(lh, i)
    verify_inclusion(lh[i], i, n, proof, root)
    if proof:
        at = data_.draw(st.integers(0, len(proof) - 1), label="at")
        bit = data_.draw(st.integers(0, 255), label="bit")
        with pytest.raises(InclusionProofInvalid):
            verify_inclusion(lh[i], i, n, flip(proof, at, bit), root)
        with pytest.raises(InclusionProofInvalid):
            verify_inclusion(lh[i], i, n, proof[:-1], root)
    other = data_.draw(st.integers(0, n - 1).filter(lambda j: j != i), label="other index")
    with pytest.raises(InclusionProofInvalid):
        verify_inclusion(lh[i], other, n, proof, root)
    with pytest.raises(InclusionProofInvalid):
        verify_inclusion(lh[other], i, n, proof, root)
    # Another checkpoint (size, root) than the one the proof was made for. (A size alone can
    # be wrong without the path changing shape: the signed checkpoint binds size to root.)
    bigger = data_.draw(st.integers(n + 1, 2 * n + 2), label="other size")
    longer = lh + hashes(data(bigger))[n:]
    with pytest.raises(InclusionProofInvalid):
        verify_inclusion(lh[i], i, bigger, proof, tree_root(longer))
    with pytest.raises(InclusionProofInvalid):
        verify_inclusion(lh[i], i, n - 1, proof, tree_root(lh[:-1]))
    with pytest.raises(InclusionProofInvalid):
        verify_inclusion(lh[i], i, n, (*proof, root), root)
    with pytest.raises(InclusionProofInvalid):
        verify_inclusion(lh[i], i, n, proof, tree_root(lh[:-1]))
    with pytest.raises(InclusionProofInvalid):
        verify_inclusion(lh[i], n, n, proof, root)


@pytest.mark.objective("SO-4")
@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 200), data_=st.data())
def test_any_tampered_consistency_proof_is_refused(n: int, data_: st.DataObject) -> None:
    """A fork (another leaf anywhere in the old part), a flipped proof bit, a wrong old or new
    size, a cut or padded proof: refused. This is the witness's whole job."""
    lh = hashes(data(n))
    m = data_.draw(st.integers(1, n - 1), label="old size")
    old_root, new_root = tree_root(lh[:m]), tree_root(lh)
    proof = consistency_proof(lh, m)
    verify_consistency(m, n, old_root, new_root, proof)
    at = data_.draw(st.integers(0, len(proof) - 1), label="at")
    bit = data_.draw(st.integers(0, 255), label="bit")
    with pytest.raises(ConsistencyProofInvalid):
        verify_consistency(m, n, old_root, new_root, flip(proof, at, bit))
    with pytest.raises(ConsistencyProofInvalid):
        verify_consistency(m, n, old_root, new_root, proof[:-1])
    with pytest.raises(ConsistencyProofInvalid):
        verify_consistency(m, n, old_root, new_root, (*proof, new_root))
    forked_at = data_.draw(st.integers(0, m - 1), label="forked leaf")
    forked = list(lh)
    forked[forked_at] = leaf_hash(b"something else")
    with pytest.raises(ConsistencyProofInvalid):  # the new tree rewrote an old leaf
        verify_consistency(m, n, old_root, tree_root(forked), proof)
    with pytest.raises(ConsistencyProofInvalid):
        verify_consistency(m, n, tree_root(forked[:m]), new_root, proof)
    other_m = data_.draw(st.integers(1, n - 1).filter(lambda x: x != m), label="other old size")
    with pytest.raises(ConsistencyProofInvalid):
        verify_consistency(other_m, n, old_root, new_root, proof)
    # A proof checks (size, root) pairs as signed checkpoints state them; the size alone can
    # change without changing the path's shape, so the other new tree is a real one.
    with pytest.raises(ConsistencyProofInvalid):
        verify_consistency(m, n + 1, old_root, tree_root(hashes(data(n + 1))), proof)
    with pytest.raises(ConsistencyProofInvalid):
        verify_consistency(n, m, new_root, old_root, proof)


@pytest.mark.objective("SO-4")
def test_the_edge_sizes_accept_only_the_trivial_proof() -> None:
    lh = hashes(data(4))
    root = tree_root(lh)
    verify_consistency(0, 4, EMPTY_ROOT, root, ())
    verify_consistency(4, 4, root, root, ())
    with pytest.raises(ConsistencyProofInvalid):  # size 0 has one root
        verify_consistency(0, 4, root, root, ())
    with pytest.raises(ConsistencyProofInvalid):  # from 0 the proof is empty
        verify_consistency(0, 4, EMPTY_ROOT, root, (root,))
    with pytest.raises(ConsistencyProofInvalid):  # same size, another root: a fork
        verify_consistency(4, 4, root, tree_root(lh[:3]), ())
    with pytest.raises(ConsistencyProofInvalid):  # growth needs a proof
        verify_consistency(2, 4, tree_root(lh[:2]), root, ())
    with pytest.raises(InclusionProofInvalid):  # an empty tree includes nothing
        verify_inclusion(lh[0], 0, 0, (), EMPTY_ROOT)
    with pytest.raises(InclusionProofInvalid):  # hashes are 32 bytes
        verify_inclusion(lh[0][:31], 0, 1, (), lh[0][:31])
