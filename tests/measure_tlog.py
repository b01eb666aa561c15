"""Measure the Merkle hashing a signed checkpoint costs per event (ADR-0020).

Run ``.venv/bin/python -m tests.measure_tlog``. Not a test: it prints figures and asserts
nothing. Every figure is a ratio to one Ed25519 signature of a checkpoint body measured in the
same run, because absolute speeds differ between runs on this machine (SETUP-NOTES).

Per-event cost = appending the event's leaf to the tree's compact range, plus (shared over the
group) the new root, every event's inclusion proof and the consistency proof from the size
before the group: what a relay does for one commit group before signing one checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import nacl.signing

from model.merkle import CompactRange, GroupTree, leaf_hash
from model.note import NoteSigner
from model.tlog import Checkpoint, sign_checkpoint


def per_call(fn: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    key = nacl.signing.SigningKey(bytes(32))
    signer = NoteSigner("relay.example/collab/c_0123456789abcdef", bytes(32))
    body = Checkpoint(signer.name, 1_000_000, bytes(32)).body().encode()
    sign = min(per_call(lambda: key.sign(body), 2000) for _ in range(3))
    note = min(
        per_call(lambda: sign_checkpoint(Checkpoint(signer.name, 1, bytes(32)), signer), 2000)
        for _ in range(3)
    )
    print(f"Ed25519 sign of a checkpoint body: {sign * 1e6:.1f} us (= 1.00)")
    print(f"whole signed checkpoint note:      {note * 1e6:.1f} us ({note / sign:.2f})")
    event_id = os.urandom(32)
    leaf = min(per_call(lambda: leaf_hash(event_id), 20000) for _ in range(3))
    print(f"one leaf hash (SHA-256, 33 bytes): {leaf * 1e6:.2f} us ({leaf / sign:.3f})")

    for tree_size in (1_000, 1_000_000, 1_000_000_000):
        # A border of the right shape: the hashes' values do not change the cost.
        base = CompactRange.from_nodes(
            tree_size, [os.urandom(32) for _ in range(tree_size.bit_count())]
        )
        for group in (1, 16, 256, 4096):
            leaves = [leaf_hash(os.urandom(32)) for _ in range(group)]

            def one_group(base: CompactRange = base, leaves: list[bytes] = leaves) -> None:
                tree = GroupTree(base, leaves)
                tree.root()
                tree.inclusion_proofs()
                tree.consistency_proof()

            def root_only(base: CompactRange = base, leaves: list[bytes] = leaves) -> None:
                tree = base.copy()
                tree.extend(leaves)
                tree.root()

            repeat = max(3, 4096 // group)
            cost = min(per_call(one_group, repeat) for _ in range(3)) / group
            bare = min(per_call(root_only, repeat) for _ in range(3)) / group
            print(
                f"tree of {tree_size:>13,}, group of {group:>4}: root and all proofs"
                f" {cost * 1e6:6.2f} us/event ({cost / sign:.3f} sig);"
                f" root only {bare * 1e6:5.2f} us/event ({bare / sign:.3f} sig)"
            )


if __name__ == "__main__":
    main()
