"""The registry of sequencer actors: one per collab, started on first use inside the relay's
sequencer nursery, retired when it drains, and contained when it fails (a bug in one collab's
actor answers its waiters with a retryable refusal and never takes the relay down).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import trio

from model.excgroups import leaves
from relay._cryptopool import CryptoPool
from relay._sequencer import InboxFull, Sequencer, ShuttingDown
from relay._sigprocs import SignatureWorkers

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fanout import Fanout
    from ledger import Ledger
    from relay._checkpoints import CollabTrees
    from relay._sequencer import OnChanged, SequencerStats, Submission
    from relay._writer import LedgerWriter

log = structlog.get_logger("cozy.sequencer")


def _describe(exc: BaseException) -> str:
    """The exception's type names only (an event's fields never reach the log)."""
    return ", ".join(type(e).__name__ for e in leaves(exc))


class SequencerRegistry:
    """Starts one actor per collab on first use, inside the relay's sequencer nursery."""

    def __init__(
        self,
        nursery: trio.Nursery,
        ledger: Ledger,
        writer: LedgerWriter,
        fanout: Fanout,
        *,
        on_changed: OnChanged,
        db_threads: int = 6,
        cpu_threads: int = 2,
        signature_workers: int = 2,
        trees: CollabTrees,
    ) -> None:
        self._nursery = nursery
        self._trees = trees
        self._on_changed = on_changed
        self._ledger = ledger
        self._writer = writer
        self._fanout = fanout
        self._db_limiter = trio.CapacityLimiter(db_threads)
        # Verification and receipts (checkpoints) of every actor, coalesced (relay/_cryptopool.py).
        # It runs in the sequencer nursery and is closed once the last actor has exited.
        self._crypto = CryptoPool(cpu_threads, SignatureWorkers(signature_workers))
        nursery.start_soon(self._crypto.run, name="crypto-pool")
        self._actors: dict[str, Sequencer] = {}
        self._running = 0  # actors started and not yet exited (retired ones included)
        self.failures = 0  # actors that ended with an exception (each one contained)
        self._closed = False

    @property
    def signature_workers(self) -> SignatureWorkers | None:
        """The crypto pool's worker processes (None when `signature_workers` is 0)."""
        return self._crypto.workers

    def statistics(self) -> list[SequencerStats]:
        return [a.statistics() for a in self._actors.values()]

    async def receipts(
        self, collab_id: str, seqs: Sequence[int]
    ) -> tuple[bytes, list[tuple[bytes, ...]]]:
        """Receipts for stored positions: the collab's current checkpoint and each seq's
        inclusion proof under it (`CollabTrees.latest_receipts`)."""
        return await self._trees.latest_receipts(collab_id, seqs)

    def submit_nowait(self, collab_id: str, submission: Submission) -> None:
        """Queue an append for its collab's actor without waiting.

        Raises `InboxFull` when that inbox is full and `ShuttingDown` once the relay has begun
        draining.
        """
        while True:
            if self._closed:
                raise ShuttingDown
            actor = self._actors.get(collab_id)
            if actor is None:
                actor = Sequencer(
                    collab_id,
                    self._ledger,
                    self._writer,
                    self._fanout,
                    self._db_limiter,
                    self._crypto,
                    self._retire,
                    self._on_changed,
                    self._trees,
                )
                self._actors[collab_id] = actor
                self._running += 1
                self._nursery.start_soon(self._run_actor, actor, name=f"sequencer:{collab_id}")
            try:
                actor.inbox.send_nowait(submission)
            except trio.WouldBlock:
                raise InboxFull from None
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                continue  # that actor retired (or the relay is closing: checked above)
            return

    async def _run_actor(self, actor: Sequencer) -> None:
        try:
            await actor.run()
        except Exception as exc:  # noqa: BLE001 — contained: one collab's fault, not the relay's
            # A bug or an unexpected fault in any stage of this actor. Its nursery has already
            # waited for a write in flight (writes are shielded), so nothing of this collab is
            # being written now: forget the actor (the next append starts a fresh one, which
            # re-reads head and membership from the ledger) and tell everyone it held to retry.
            self._retire(actor)
            failed = actor.fail_all()
            self.failures += 1
            log.error(
                "sequencer_failed",
                collab_id=actor.collab_id,
                error=_describe(exc),
                answered=failed,
            )
        else:
            actor.fail_all()  # normally empty: a drained actor's inbox is closed and empty
        finally:
            self._running -= 1
            if self._closed and self._running == 0:
                self._crypto.close()

    def _retire(self, actor: Sequencer) -> None:
        if self._actors.get(actor.collab_id) is actor:
            del self._actors[actor.collab_id]
        actor.inbox.close()

    def close(self) -> None:
        """Stop accepting appends; every actor drains its inbox and exits."""
        self._closed = True
        for actor in self._actors.values():
            actor.inbox.close()
        if self._running == 0:
            self._crypto.close()
