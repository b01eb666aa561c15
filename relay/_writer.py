"""The ledger writer: group commit across collabs.

Every sequencer hands its verified batch here and waits; the writer takes everything queued —
batches of many collabs — and commits them in one transaction. One commit (and one fsync) then
covers many collabs, which is what lets a relay with many active collabs approach the rate of
one busy collab. Receipts are signed by the sequencers after `write` returns (so after the
commit), in their own worker threads, while this writer already runs the next transaction. Each sequencer has at most one batch in
flight, so per-collab order is untouched; the writer never reorders within a collab.

If the transaction fails because some collab's head was stale, those requests fail alone and
the rest are written in a second transaction; any other ledger error fails the whole group and
nothing of it is acked (authors retry; appends are idempotent). A group is never acked on a
guess: when the connection drops while COMMIT is in flight, `Ledger.append_batches` asks
Postgres whether that transaction committed and reads the rows back before returning, and
raises when it cannot tell; the sequencers then re-read their heads from the ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from ledger import AppendRequest, LedgerError, SequencingConflict
from model.chain import Receipt, sign_receipt

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import nacl.signing

    from ledger import Ledger
    from model.chain import Head
    from model.sequencer import Assignment

MAX_GROUP_EVENTS: Final = 4096

Written = tuple["Head", list["Assignment"]]


@dataclass(eq=False)
class _Job:
    request: AppendRequest
    done: trio.Event = field(default_factory=trio.Event)
    result: Written | LedgerError | None = None


class WriterStats(msgspec.Struct):
    """Counts since start. `events` includes `duplicates` (retried appends answered with their
    original seq); `failed_transactions` rolled back (nothing of their group was written)."""

    transactions: int
    batches: int
    events: int
    duplicates: int = 0
    failed_transactions: int = 0


class LedgerWriter:
    def __init__(
        self,
        ledger: Ledger,
        relay_key: nacl.signing.SigningKey,
        *,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        """`on_commit(events_written, seconds)` runs in the writer thread after each committed
        transaction (for metrics): it must be quick and thread-safe."""
        self._ledger = ledger
        self._relay_key = relay_key
        self._on_commit = on_commit
        self._send, self._recv = trio.open_memory_channel[_Job](1024)
        self._transactions = self._batches = self._events = 0
        self._duplicates = self._failed = 0

    def statistics(self) -> WriterStats:
        return WriterStats(
            self._transactions, self._batches, self._events, self._duplicates, self._failed
        )

    async def write(self, request: AppendRequest) -> Written:
        """Persist one collab's batch (with others) and return its new head and assignments.

        Raises `LedgerError` if it was not written. Not abandoned on cancellation: once queued,
        the caller waits for the outcome so an ack is never lost for a committed event.
        """
        job = _Job(request)
        await self._send.send(job)
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if isinstance(job.result, LedgerError):
            raise job.result
        assert job.result is not None
        return job.result

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        async with self._recv:
            async for first in self._recv:
                group = [first]
                size = len(first.request.events)
                while size < MAX_GROUP_EVENTS:
                    try:
                        job = self._recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    group.append(job)
                    size += len(job.request.events)
                try:
                    await trio.to_thread.run_sync(self._write_group, group)
                finally:
                    for job in group:
                        if job.result is None:
                            job.result = LedgerError("the relay stopped before writing this batch")
                        job.done.set()

    def sign_receipts(self, collab_id: str, assignments: Sequence[Assignment]) -> list[bytes]:
        """The relay's receipt for each committed assignment (ADR-0007). Pure and thread-safe:
        sequencers call it in their own worker threads after `write` returned, so the single
        writer thread goes straight on to the next commit instead of signing (ADR-0004)."""
        return [
            sign_receipt(self._relay_key, Receipt(collab_id, a.seq, a.event_id, a.chain))
            for a in assignments
        ]

    def _write_group(self, group: list[_Job]) -> None:
        """Worker thread: one transaction for the group."""
        pending = group
        for _attempt in range(2):
            started = time.perf_counter()
            try:
                results = self._ledger.append_batches([j.request for j in pending])
            except SequencingConflict as exc:
                self._failed += 1
                stale = set(exc.collab_ids)
                for job in pending:
                    if job.request.collab_id in stale or not stale:
                        job.result = exc
                pending = [j for j in pending if j.result is None]
                if not pending:
                    return
                continue
            except LedgerError as exc:
                self._failed += 1
                for job in pending:
                    job.result = exc
                return
            elapsed = time.perf_counter() - started
            self._transactions += 1
            written = 0
            for job, (head, assignments) in zip(pending, results, strict=True):
                self._batches += 1
                self._events += len(assignments)
                duplicates = sum(a.duplicate for a in assignments)
                self._duplicates += duplicates
                written += len(assignments) - duplicates
                job.result = (head, assignments)
            if self._on_commit is not None:
                self._on_commit(written, elapsed)
            return
        for job in pending:
            job.result = LedgerError("the ledger kept refusing this batch; retry it")
