"""Each collab's Merkle tree over its event ids, and the relay's signed checkpoints of it (ADR-0020).

One `LeafTree` per collab that was used since the relay started, built from the ledger's event
ids on first use (one indexed read and 2n SHA-256; see ADR-0020 for why nothing is persisted)
and extended by the collab's sequencer with every commit group, synchronously and before the
group is published. So at any point where the Trio loop is not inside an await, the tree's size
is the collab's newest published seq: a `caught_up` or a heartbeat signed then names exactly
the head its subscriber has been sent, and is never smaller than a checkpoint given to an ack
before it. A group's checkpoint is dated when the group is added (not when the crypto pool gets
to signing it), so no honest checkpoint is dated after a larger one (model/checkpoints.py).

Witness cosignatures (relay/_witnessing.py) are kept per collab for the newest size a witness
cosigned, and appended to every `caught_up` and heartbeat checkpoint of exactly that tree (a
cosignature is over the checkpoint text, so it fits every note of that size and root, whatever
the relay's own date line says).

A group that does not follow the tree (the actor that would have added the previous group
failed between its commit and here) drops the tree; the next use reads it again from the ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from model import wire
from model.merkle import LeafTree, leaf_hash
from model.tlog import add_signatures

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ledger import Ledger
    from model.checkpoints import CheckpointSigner
    from model.note import NoteSignature


class ReceiptsNotReady(Exception):
    """A stored seq the collab's tree does not reach yet (its group is being added)."""


@dataclass(frozen=True, slots=True)
class GroupHead:
    """The tree after one commit group: what its acks' checkpoint says, dated when added."""

    collab_id: str
    size: int
    root: bytes
    timestamp: int


Cosigned = tuple[int, bytes, dict[str, "NoteSignature"], bytes]
"""(size, root, each witness's cosignature line, the note the relay submitted for that tree)."""


class CollabTrees:
    def __init__(
        self,
        ledger: Ledger,
        signer: CheckpointSigner,
        db_limiter: trio.CapacityLimiter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self.signer = signer
        self._db_limiter = db_limiter
        self.clock = clock  # injectable: tests date checkpoints as a frozen relay would
        self._trees: dict[str, LeafTree] = {}
        self._locks: dict[str, trio.Lock] = {}
        # The newest checkpoint signed for a caught_up or a heartbeat, per collab: reused by
        # every subscriber within the same second at the same size (one signature, not one each).
        self._signed: dict[str, tuple[int, int, bytes]] = {}
        # Per collab: the newest (size, root) any witness cosigned, each witness's line, and the
        # note the relay submitted for it (dated while the tree had that size).
        self._cosigned: dict[str, Cosigned] = {}
        # Per collab: the newest of those every witness asked had cosigned (what a heartbeat
        # carries as `witnessed` when commits outran them: a quorum's lines on one tree).
        self._complete: dict[str, Cosigned] = {}
        # Called (synchronously) after a commit group grew a tree: wakes the witnessing task.
        self.on_grow: Callable[[], None] | None = None
        # How long a heartbeat waits for the witnesses to cosign the current tree (set by the
        # relay when it has witnesses): a heartbeat right after a commit would otherwise carry
        # no quorum, members would skip it, and a follower could miss the staleness bound.
        self.cosign_wait = 0.0
        self.witnesses = 0  # how many witnesses the relay asks (a heartbeat waits for each)
        self._cosigned_changed = trio.Event()
        # Per collab: when (trio's clock) a `caught_up` or heartbeat checkpoint was last made,
        # i.e. someone reads it: the witnessing task keeps those collabs' cosignatures fresh.
        self._read_at: dict[str, float] = {}

    def read_since(self, collab_id: str, seconds: float) -> bool:
        """Whether a `caught_up` or heartbeat checkpoint of the collab was made in the last
        `seconds`."""
        at = self._read_at.get(collab_id)
        return at is not None and trio.current_time() - at <= seconds

    def held(self) -> dict[str, LeafTree]:
        """The trees in memory now (the collabs used since start): what witnesses are shown."""
        return dict(self._trees)

    def add_cosignatures(
        self, collab_id: str, size: int, root: bytes, lines: Sequence[NoteSignature], note: bytes
    ) -> None:
        """Keep a witness's verified cosignature lines for the tree (`size`, `root`), which
        it gave for `note`."""
        held = self._cosigned.get(collab_id)
        if held is not None and held[0] > size:
            return  # a late answer for a smaller tree: the newer lines are what clients need
        same = held is not None and (held[0], held[1]) == (size, root)
        held = (size, root, held[2] if same and held is not None else {}, note)
        self._cosigned[collab_id] = held
        for line in lines:
            held[2][line.name] = line
        if len(held[2]) >= self.witnesses:
            self._complete[collab_id] = held
        self._cosigned_changed.set()
        self._cosigned_changed = trio.Event()

    def cosignatures(self, collab_id: str, size: int, root: bytes) -> list[NoteSignature]:
        held = self._cosigned.get(collab_id)
        if held is None or (held[0], held[1]) != (size, root):
            return []
        return list(held[2].values())

    def now(self) -> int:
        return int(self.clock())

    def loaded(self, collab_id: str) -> LeafTree | None:
        return self._trees.get(collab_id)

    async def load(self, collab_id: str) -> LeafTree:
        """The collab's tree, read from the ledger (in a worker thread) if not held yet."""
        tree = self._trees.get(collab_id)
        if tree is not None:
            return tree
        lock = self._locks.setdefault(collab_id, trio.Lock())
        async with lock:
            tree = self._trees.get(collab_id)
            if tree is None:
                tree = await trio.to_thread.run_sync(
                    self._read, collab_id, limiter=self._db_limiter
                )
                # A group added while this read ran is in it or follows it: keep the larger.
                held = self._trees.get(collab_id)
                if held is None or held.size < tree.size:
                    self._trees[collab_id] = tree
                tree = self._trees[collab_id]
        return tree

    def _read(self, collab_id: str) -> LeafTree:
        return LeafTree(leaf_hash(i) for i in self._ledger.event_ids(collab_id))

    def add_group(self, collab_id: str, first_seq: int, ids: Sequence[bytes]) -> GroupHead | None:
        """Extend the tree with a committed group (ids of seqs first_seq…, in order). None when
        the tree is not held or does not reach first_seq - 1 (then it is dropped and re-read)."""
        tree = self._trees.get(collab_id)
        if tree is None:
            return None
        end = first_seq - 1 + len(ids)
        if tree.size < first_seq - 1:
            del self._trees[collab_id]
            return None
        if tree.size > end:
            # A read from the ledger already holds later groups, and a checkpoint of them may
            # be out: one of this smaller size dated now could contradict it. No checkpoint.
            return None
        for seq in range(tree.size + 1, end + 1):
            tree.append(leaf_hash(ids[seq - first_seq]))
        if self.on_grow is not None:
            self.on_grow()
        return GroupHead(collab_id, end, tree.root(end), self.now())

    def group_receipts(
        self, jobs: Sequence[tuple[GroupHead, Sequence[int]]]
    ) -> list[tuple[bytes, list[tuple[bytes, ...]]]]:
        """Thread-safe, element-wise (a crypto-pool job): for each committed group, its
        checkpoint note and the inclusion proof under it of each of `seqs` (the receipts of its
        acks: one signature for the whole group). The tree only grows, so every node under the
        group's size is final."""
        out: list[tuple[bytes, list[tuple[bytes, ...]]]] = []
        for g, seqs in jobs:
            tree = self._trees.get(g.collab_id)
            if tree is None or tree.size < g.size:  # dropped meanwhile: no proof to give
                out.append((b"", [() for _ in seqs]))
                continue
            note = self.signer.sign(g.collab_id, g.size, g.root, g.timestamp)
            out.append((note, [tree.inclusion_proof(seq - 1, g.size) for seq in seqs]))
        return out

    async def latest_receipts(
        self, collab_id: str, seqs: Sequence[int]
    ) -> tuple[bytes, list[tuple[bytes, ...]]]:
        """Receipts for stored positions outside a commit group (a duplicate's stored seq, a
        group whose tree was dropped): the inclusion proof of each seq under the collab's
        current checkpoint (the one `caught_up` gets, reused within the second).

        Raises `ReceiptsNotReady` when the tree does not reach a seq yet: its group committed
        and its sequencer has not added it (a moment; the author retries)."""
        tree = await self.load(collab_id)
        size = tree.size
        if any(not 1 <= seq <= size for seq in seqs):
            raise ReceiptsNotReady(collab_id)
        return self._head_note(collab_id, tree, size), [
            tree.inclusion_proof(seq - 1, size) for seq in seqs
        ]

    def _head_note(self, collab_id: str, tree: LeafTree, size: int) -> bytes:
        self._read_at[collab_id] = trio.current_time()
        now = self.now()
        root = tree.root(size)
        held = self._signed.get(collab_id)
        if held is not None and held[0] == size and held[1] == now:
            note = held[2]
        else:
            note = self.signer.sign(collab_id, size, root, now)
            self._signed[collab_id] = (size, now, note)
        lines = self.cosignatures(collab_id, size, root)
        return add_signatures(note, lines) if lines else note

    def caught_up(self, collab_id: str, seq: int, known_size: int) -> wire.CaughtUp:
        """`caught_up` at `seq` with the checkpoint of size `seq` and the consistency proof from
        the subscriber's `known_size` (none when that is above `seq`: the client will see a
        smaller tree than it holds). Without a checkpoint when the tree is not held or has not
        reached `seq` yet (the catch-up read a group its sequencer is still adding), or
        is past it."""
        tree = self._trees.get(collab_id)
        if tree is None or tree.size != seq:
            return wire.CaughtUp(collab_id=collab_id, seq=seq)
        start = known_size if 0 <= known_size <= seq else 0
        return wire.CaughtUp(
            collab_id=collab_id,
            seq=seq,
            checkpoint=self._head_note(collab_id, tree, seq),
            proof_from=start,
            consistency=list(tree.consistency_proof(start, seq)),
        )

    async def heartbeat(self, collab_id: str, sent_size: int) -> tuple[wire.TreeHead, int]:
        """The collab's current checkpoint, with the proof from `sent_size` (the last size sent
        on this subscription), and its size."""
        tree = await self.load(collab_id)
        with trio.move_on_after(self.cosign_wait):
            while self.cosign_wait > 0:
                changed = self._cosigned_changed
                if self._fully_cosigned(collab_id, tree.size):
                    break
                await changed.wait()
        size = tree.size
        start = sent_size if 0 <= sent_size <= size else 0
        witnessed, witnessed_proof = self._witnessed(collab_id, tree, size)
        frame = wire.TreeHead(
            collab_id=collab_id,
            checkpoint=self._head_note(collab_id, tree, size),
            proof_from=start,
            consistency=list(tree.consistency_proof(start, size)),
            witnessed=witnessed,
            witnessed_proof=witnessed_proof,
        )
        return frame, size

    def _fully_cosigned(self, collab_id: str, size: int) -> bool:
        """Whether every witness the relay asks has cosigned the tree of `size` (or a later)."""
        complete = self._complete.get(collab_id)
        return complete is not None and complete[0] >= size

    def _witnessed(self, collab_id: str, tree: LeafTree, size: int) -> tuple[bytes, list[bytes]]:
        """When the tree outran its witnesses (commits faster than a round), the newest smaller
        head they all cosigned (else the newest any did), as submitted, and the proof that the
        tree of `size` extends it: a follower can still renew its freshness from their dates
        (docs/ordering.md)."""
        if self._fully_cosigned(collab_id, size):
            return b"", []  # the checkpoint itself carries every witness's line
        held = self._complete.get(collab_id) or self._cosigned.get(collab_id)
        if held is None or held[0] >= size:
            return b"", []
        note = add_signatures(held[3], list(held[2].values()))
        return note, list(tree.consistency_proof(held[0], size))
