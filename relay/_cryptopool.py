"""The sequencers' CPU-bound crypto, coalesced into few worker-thread calls on every core.

Each sequencer verifies its batch's signatures and signs its receipts. Done per sequencer,
a relay with a hundred busy collabs made a hundred small thread calls per round (~75 µs of
hand-off each, and small batches), and one busy collab used one core for its verification.
The pool takes every job queued since its last round — from any number of sequencers — cuts
their items into one contiguous share per thread and runs the shares in parallel (PyNaCl
releases the GIL), then hands each job its results in order.

Signature checks go to worker processes instead of threads when the relay has them
(relay/_sigprocs.py): in a thread, each check hands the GIL back and forth with the loop. They
share the round with the thread jobs, so a hundred collabs' batches still reach the writer
together.

Jobs must be pure, element-wise functions (`fn(items)` returns one result per item, and
`fn(a + b) == fn(a) + fn(b)`): the pool may split one job's items across threads. Nothing is
written here, so a caller that is cancelled may stop waiting; its results are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from sigworker import Check, WorkerLost, check_signatures

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from relay._sigprocs import SignatureWorkers

T = TypeVar("T")
R = TypeVar("R")

# Below this many items per thread, splitting costs more (an extra thread hand-off) than it
# saves: a round that small runs on one thread.
MIN_SHARE: Final = 32
# Below this many signature checks in a round, the threads take them: a worker process's wakeup
# costs as much as a thread's, and the GIL hand-offs it saves are few (docs/performance.md,
# "Fourth pass": at a trickle of appends, p50 latency rose ~15 % when every round used them).
MIN_REMOTE: Final = 64
# Items of `small` jobs run on the loop between two rounds, at most. Inline work never makes the
# pool busy, so without a bound a flood of small jobs (many collabs, an event each) would all
# be verified on the loop while the threads sat idle: past this, the next small job takes a
# round, and the jobs queued meanwhile join the one after it (~2 ms of signature checks).
INLINE_BUDGET: Final = 32


@dataclass(eq=False)
class _Job:
    fn: Callable[[Sequence[Any]], list[Any]]
    items: Sequence[Any]
    done: trio.Event = field(default_factory=trio.Event)
    parts: dict[int, list[Any]] = field(default_factory=dict)  # start index -> results
    error: BaseException | None = None
    remote: bool = False  # signature checks, for the worker processes when there are any


class CryptoPool:
    """Runs element-wise crypto jobs of many callers on `threads` worker threads at once."""

    def __init__(self, threads: int = 2, workers: SignatureWorkers | None = None) -> None:
        self._threads = max(1, threads)
        self._workers = workers if workers is not None and workers.count else None
        self._send, self._recv = trio.open_memory_channel[_Job](math.inf)
        self.rounds = 0  # thread rounds run, for statistics
        self._in_round = False
        self._closed = False
        self._inline = 0  # items of small jobs run on the loop since the last round began

    async def map(
        self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], *, small: bool = False
    ) -> list[R]:
        """`fn(items)`, computed in the pool's threads alongside other callers' jobs.

        A `small` job (the caller's word: well under the ~130 µs of loop time that a round's
        two thread hand-offs cost on this kind of machine) runs on the Trio loop instead while
        the pool is `idle`: at a trickle of appends, each commit group's receipts would
        otherwise take a round of their own, and the next group's signature checks wait behind
        it. A busy pool still gets it, so a hundred collabs committing together sign on every
        core in one round instead of one after another on the loop, and so does any small job
        past INLINE_BUDGET items run on the loop since the last round.

        Raises what `fn` raised. Raises `trio.ClosedResourceError` once the pool is closed.
        """
        return await self._submit(fn, items, small=small, remote=False)

    async def check_signatures(self, checks: Sequence[Check], *, small: bool = False) -> list[bool]:
        """Whether each (public key, message, signature) holds, like `map` with
        `sigworker.check_signatures`, but in the worker processes when there are any."""
        return await self._submit(check_signatures, checks, small=small, remote=True)

    async def _submit(
        self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], *, small: bool, remote: bool
    ) -> list[R]:
        if not items:
            return []
        if small and self.idle and self._inline + len(items) <= INLINE_BUDGET:
            self._inline += len(items)
            return fn(items)
        job = _Job(fn, items, remote=remote and self._workers is not None)
        self._send.send_nowait(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        out: list[R] = []
        for start in sorted(job.parts):
            out.extend(job.parts[start])
        return out

    @property
    def workers(self) -> SignatureWorkers | None:
        return self._workers

    @property
    def idle(self) -> bool:
        """Open, and no round is running or queued."""
        return not (self._closed or self._in_round or self._send.statistics().current_buffer_used)

    def close(self) -> None:
        """No more jobs; `run` returns once the queued ones are done."""
        self._closed = True
        self._send.close()

    async def run(self) -> None:
        """Run rounds until the pool is closed and its queue drained; the pool's worker
        processes, if any, run beside them and are stopped on the way out."""
        async with trio.open_nursery() as nursery:
            if self._workers is not None:
                nursery.start_soon(self._workers.run, name="signature-workers")
            await self._rounds()
            nursery.cancel_scope.cancel()

    async def _rounds(self) -> None:
        async with self._recv:
            async for first in self._recv:
                jobs = [first]
                while True:
                    try:
                        jobs.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                self._in_round = True
                self._inline = 0
                try:
                    workers = self._workers
                    remote = [job for job in jobs if job.remote] if workers else []
                    if sum(len(job.items) for job in remote) < MIN_REMOTE:
                        remote = []
                    elif workers is not None:
                        # The first round the workers would take starts them (this one runs
                        # in the threads if none is ready yet): a relay that never sees a
                        # burst never spawns a process.
                        workers.want()
                    local = [job for job in jobs if not job.remote] if remote else jobs
                    async with trio.open_nursery() as nursery:
                        for share in _shares(local, self._threads):
                            nursery.start_soon(_run_share, share)
                        if workers is not None:
                            for index, share in enumerate(_shares(remote, workers.count)):
                                nursery.start_soon(_run_remote, workers, index, share)
                    self.rounds += 1
                finally:
                    self._in_round = False
                    for job in jobs:
                        # Cancelled mid-round (the relay's nurseries are being torn down), a
                        # job can miss parts: fail it rather than hand back a short list.
                        done = sum(len(part) for part in job.parts.values())
                        if job.error is None and done != len(job.items):
                            job.error = RuntimeError("the crypto pool stopped before this job ran")
                        job.done.set()


async def _run_share(share: list[tuple[_Job, int, int]]) -> None:
    await trio.to_thread.run_sync(_work, share)


async def _run_remote(
    workers: SignatureWorkers, index: int, share: list[tuple[_Job, int, int]]
) -> None:
    """One worker process checks the share; if it is not running or fails, a thread runs it
    as any other share."""
    checks: list[Check] = []
    for job, start, end in share:
        checks.extend(job.items[start:end])
    try:
        verdicts = await workers.check(index, checks)
    except WorkerLost:
        await _run_share(share)
        return
    at = 0
    for job, start, end in share:
        job.parts[start] = verdicts[at : at + end - start]
        at += end - start


def _shares(jobs: list[_Job], threads: int) -> list[list[tuple[_Job, int, int]]]:
    """Cut the jobs' items, in order, into at most `threads` runs of about equal length."""
    if not jobs:
        return []
    total = sum(len(j.items) for j in jobs)
    size = max(MIN_SHARE, math.ceil(total / threads))
    shares: list[list[tuple[_Job, int, int]]] = [[]]
    filled = 0
    for job in jobs:
        start = 0
        while start < len(job.items):
            if filled >= size:
                shares.append([])
                filled = 0
            end = min(len(job.items), start + size - filled)
            shares[-1].append((job, start, end))
            filled += end - start
            start = end
    return shares


def _work(share: list[tuple[_Job, int, int]]) -> None:
    """Worker thread: run each slice; results go to distinct keys, so shares never clash."""
    for job, start, end in share:
        try:
            job.parts[start] = job.fn(job.items[start:end])
        except Exception as exc:  # noqa: BLE001 — handed to the job's caller, who re-raises
            job.error = exc
