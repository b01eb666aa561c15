"""The ledger writer: group commit across collabs.

Every sequencer hands its verified batch here and waits; the writer takes everything queued —
batches of many collabs — and commits them in one transaction. One commit (and one fsync) then
covers many collabs, which is what lets a relay with many active collabs approach the rate of
one busy collab. Receipts (one signed checkpoint per collab's group, ADR-0020) are made by the
sequencers after `write` returns (so after the commit), in the crypto pool, while this writer
already runs the next transaction. Each sequencer has at most one batch in flight, so
per-collab order is untouched; the writer never reorders within a collab.

If the transaction fails because some collab's head was stale, those requests fail alone and
the rest are written in a second transaction; any other ledger error fails the whole group and
nothing of it is acked (authors retry; appends are idempotent). A group is never acked on a
guess: when the connection drops while COMMIT is in flight, `Ledger.append_batches` asks
Postgres whether that transaction committed and reads the rows back before returning, and
raises when it cannot tell; the sequencers then re-read their heads from the ledger.

Liveness: settling a commit in doubt can take seconds (`ledger.SETTLE_SECONDS`), and a COMMIT
whose reply never comes (a silent network) blocks its thread until TCP gives up. So the writer
waits for a group only `stall_after` seconds; a group still running then is left to finish on
its own thread and the next group starts beside it (at most `MAX_GROUPS` at once). That is
safe because a collab is in at most one group at a time (its sequencer waits for its batch),
so groups running side by side never touch the same collab's rows. Another collab's append
therefore waits at most `stall_after` for a commit in doubt, plus its own write, while fewer
than `MAX_GROUPS` commits are in doubt at once. An unexpected exception while writing a group
fails that group's batches (their authors retry), never the writer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import msgspec
import structlog
import trio

from ledger import AppendRequest, LedgerError, SequencingConflict

if TYPE_CHECKING:
    from collections.abc import Callable

    from ledger import Ledger
    from model.chain import Head
    from model.sequencer import Assignment

log = structlog.get_logger("cozy.writer")

MAX_GROUP_EVENTS: Final = 4096
# Groups written at once: the normal one and those left behind in doubt. Each holds a pooled
# connection (and settling takes a second one), so this stays well below the pool's size.
MAX_GROUPS: Final = 3

Written = tuple["Head", list["Assignment"]]


@dataclass(eq=False)
class _Job:
    request: AppendRequest
    done: trio.Event = field(default_factory=trio.Event)
    result: Written | LedgerError | None = None
    # time.monotonic() when its group's transaction began and committed (relay/_stages.py).
    started: float = 0.0
    committed: float = 0.0


class WriterStats(msgspec.Struct):
    """Counts since start. `events` includes `duplicates` (retried appends answered with their
    original seq); `failed_transactions` rolled back (nothing of their group was written)."""

    transactions: int
    batches: int
    events: int
    duplicates: int = 0
    failed_transactions: int = 0
    stalled_groups: int = 0  # groups the writer stopped waiting for after `stall_after`


class LedgerWriter:
    def __init__(
        self,
        ledger: Ledger,
        *,
        on_commit: Callable[[int, float], None] | None = None,
        stall_after: float = 1.0,
    ) -> None:
        """`on_commit(events_written, seconds)` runs in the writer thread after each committed
        transaction (for metrics): it must be quick and thread-safe. `stall_after`: seconds
        the writer waits for one group before starting the next beside it."""
        self._ledger = ledger
        self._on_commit = on_commit
        self._send, self._recv = trio.open_memory_channel[_Job](1024)
        self._stall_after = stall_after
        self._slots = trio.Semaphore(MAX_GROUPS)
        self._lock = threading.Lock()  # the counters, updated from concurrent group threads
        self._transactions = self._batches = self._events = 0
        self._duplicates = self._failed = self._stalled = 0

    def statistics(self) -> WriterStats:
        with self._lock:
            return WriterStats(
                self._transactions,
                self._batches,
                self._events,
                self._duplicates,
                self._failed,
                self._stalled,
            )

    async def write(self, request: AppendRequest, timing: list[float] | None = None) -> Written:
        """Persist one collab's batch (with others) and return its new head and assignments.

        Raises `LedgerError` if it was not written. Not abandoned on cancellation: once queued,
        the caller waits for the outcome so an ack is never lost for a committed event. Given
        `timing` (stage times, relay/_stages.py), a written batch appends to it when its
        group's transaction began and when it committed, on the machine-wide monotonic clock.
        """
        job = _Job(request)
        try:
            await self._send.send(job)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LedgerError("the relay is stopping; this batch was not written") from None
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if isinstance(job.result, LedgerError):
            raise job.result
        assert job.result is not None
        if timing is not None:
            timing += (job.started, job.committed)
        return job.result

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            # Stopped (closed, or cancelled with the relay): a job still queued would leave
            # its sequencer waiting (shielded) forever; answer it instead.
            # Drained before closing (closing drops what is buffered), with no await between.
            while True:
                try:
                    job = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                job.result = LedgerError("the relay stopped before writing this batch")
                job.done.set()
            self._recv.close()

    async def _run(self) -> None:
        async with trio.open_nursery() as groups:
            while True:
                # A slot first, then the job: a job taken is always handed to a group.
                await self._slots.acquire()
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return
                group = [first]
                size = len(first.request.events)
                while size < MAX_GROUP_EVENTS:
                    try:
                        job = self._recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    group.append(job)
                    size += len(job.request.events)
                finished = trio.Event()
                groups.start_soon(self._run_group, group, finished)
                # Group commit: the next group gathers while this one is written. A group
                # still running after `stall_after` (a commit in doubt) is left to finish on
                # its thread; the next one starts beside it, so other collabs go on.
                with trio.move_on_after(self._stall_after):
                    await finished.wait()
                if not finished.is_set():
                    with self._lock:
                        self._stalled += 1
                    log.warning(
                        "writer_group_stalled", batches=len(group), seconds=self._stall_after
                    )

    async def _run_group(self, group: list[_Job], finished: trio.Event) -> None:
        try:
            await trio.to_thread.run_sync(self._write_group, group)
        except Exception as exc:  # noqa: BLE001 — a bug fails this group's batches, not the writer
            log.error("writer_group_failed", error=type(exc).__name__, batches=len(group))
            for job in group:
                if job.result is None:
                    job.result = LedgerError(
                        "the relay could not write this batch (an internal error); retry it:"
                        " appends are idempotent"
                    )
        finally:
            for job in group:
                if job.result is None:
                    job.result = LedgerError("the relay stopped before writing this batch")
                job.done.set()
            finished.set()
            self._slots.release()

    def _write_group(self, group: list[_Job]) -> None:
        """Worker thread: one transaction for the group."""
        pending = group
        for _attempt in range(2):
            began = time.monotonic()
            started = time.perf_counter()
            try:
                results = self._ledger.append_batches([j.request for j in pending])
            except SequencingConflict as exc:
                with self._lock:
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
                with self._lock:
                    self._failed += 1
                for job in pending:
                    job.result = exc
                return
            elapsed = time.perf_counter() - started
            committed = time.monotonic()
            written = 0
            with self._lock:
                self._transactions += 1
                for job, (head, assignments) in zip(pending, results, strict=True):
                    self._batches += 1
                    self._events += len(assignments)
                    duplicates = sum(a.duplicate for a in assignments)
                    self._duplicates += duplicates
                    written += len(assignments) - duplicates
                    job.started, job.committed = began, committed
                    job.result = (head, assignments)
            if self._on_commit is not None:
                self._on_commit(written, elapsed)
            return
        for job in pending:
            job.result = LedgerError("the ledger kept refusing this batch; retry it")
