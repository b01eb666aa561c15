"""Gathering witness cosignatures for every active collab's checkpoint (issue 16, docs/witness.md).

One task in the relay's accept nursery, apart from the sequencers: nothing here is awaited by a
commit. It wakes soon after a commit group grew a tree (`CollabTrees.on_grow`) or every
`witness_interval_ms`, and for each collab whose tree in memory is larger than what every
witness last cosigned — or, for a collab someone is reading, whose newest cosignature is older
than `refresh` seconds — signs one checkpoint of the tree as it is and submits it to each witness
at once (C2SP tlog-witness: `old` = the size that witness last cosigned for this origin, with
the consistency proof from it). A 409 names the witness's size: the relay proves again from it
(once per round), so a relay restart, a witness restored from a backup that is behind, or a lost
answer cost one extra request. Cosignature lines that verify under the witness's key are handed
to `CollabTrees`, which appends them to `caught_up` and heartbeat checkpoints of that tree.

Why an unchanged head is submitted again (issue 16, docs/ordering.md "The staleness bound"): in a
collab with a witness policy, members measure freshness by the dates of the witnesses'
cosignatures, not by the relay's own. An honest relay keeps them fresh by asking again while the
collab is read (a `caught_up` or heartbeat signed within twice `refresh`); a witness that cosigned
a larger tree refuses the old one (409), so a relay that keeps showing members an old head cannot
date it freshly, and every follower with the policy reports `StaleView` within its bound.

Bounds: one round at a time, collabs in turn, the witnesses of one collab in parallel, each
request within `SUBMIT_TIMEOUT` (witness/submit.py); a witness that did not answer is not asked
about the round's other collabs, so a dead one costs one timeout per round, not one per collab.
A witness that refuses or is down is logged (by status, never bytes) and asked again next round;
the relay keeps serving either way, and clients whose policy needs that witness refuse the
uncosigned heads (`QuorumNotMet`) until it answers again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import structlog
import trio

from model.note import NoteVerifier
from model.tlog import AddCheckpointRequest
from witness.errors import WitnessConflict, WitnessError, WitnessUnavailable
from witness.submit import submit_checkpoint

if TYPE_CHECKING:
    from collections.abc import Sequence

    from model.merkle import LeafTree
    from relay._checkpoints import CollabTrees
    from relay.config import WitnessTarget

log = structlog.get_logger("cozy.witnessing")

RETRIES: Final = 2  # a 409, then the proof from the size it named


class Witnessing:
    def __init__(
        self,
        trees: CollabTrees,
        targets: Sequence[WitnessTarget],
        interval: float,
        refresh: float | None = None,
    ) -> None:
        """`refresh`: how old a read collab's newest cosignature may get before its unchanged
        head is submitted again (default: `interval`); the relay passes a third of its heartbeat
        interval, so a heartbeat carries cosignatures at most that old."""
        self._trees = trees
        self._targets = [(t.url, NoteVerifier.from_vkey(t.vkey)) for t in targets]
        self._interval = interval
        self._refresh = interval if refresh is None else max(refresh, interval)
        self._wake = trio.Event()
        # (witness url, collab) -> the size that witness last cosigned, as far as the relay knows,
        # and when (trio's clock) it did.
        self._sizes: dict[tuple[str, str], int] = {}
        self._cosigned_at: dict[tuple[str, str], float] = {}
        self.rounds = 0
        self._down: set[str] = set()

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self._interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.round()
            # At most one round per interval even under a stream of commits.
            await trio.sleep(min(self._interval, 0.2))

    async def round(self) -> None:
        self._down = set()  # unreachable this round: not asked about its other collabs
        now = trio.current_time()
        for collab_id, tree in self._trees.held().items():
            size = tree.size
            read = self._trees.read_since(collab_id, 2 * self._refresh)
            due = [
                (url, witness)
                for url, witness in self._targets
                if url not in self._down
                and (
                    self._sizes.get((url, collab_id)) != size
                    or (
                        read and now - self._cosigned_at.get((url, collab_id), 0.0) >= self._refresh
                    )
                )
            ]
            if size == 0 or not due:
                continue
            root = tree.root(size)
            note = self._trees.signer.sign(collab_id, size, root, self._trees.now())
            async with trio.open_nursery() as nursery:
                for url, witness in due:
                    nursery.start_soon(
                        self._submit, url, witness, collab_id, tree, size, root, note
                    )
        self.rounds += 1

    async def _submit(
        self,
        url: str,
        witness: NoteVerifier,
        collab_id: str,
        tree: LeafTree,
        size: int,
        root: bytes,
        note: bytes,
    ) -> None:
        key = (url, collab_id)
        old = self._sizes.get(key, 0)
        for _ in range(RETRIES):
            if old > size:
                return  # the witness is ahead of this tree (a newer one comes next round)
            request = AddCheckpointRequest(old, tree.consistency_proof(old, size), note)
            try:
                lines = await submit_checkpoint(url, request, witness=witness)
            except WitnessConflict as exc:
                old = self._sizes[key] = exc.size
                continue
            except WitnessError as exc:
                if isinstance(exc, WitnessUnavailable):
                    self._down.add(url)
                log.warning(
                    "witness_refused",
                    witness=url,
                    collab_id=collab_id,
                    size=size,
                    status=exc.status,
                    kind=type(exc).__name__,
                )
                return
            self._sizes[key] = size
            self._cosigned_at[key] = trio.current_time()
            self._trees.add_cosignatures(collab_id, size, root, lines, note)
            return
