"""The sequencers' CPU-bound crypto, coalesced into few worker-thread calls on every core.

Each sequencer verifies its batch's signatures and signs its receipts. Done per sequencer,
a relay with a hundred busy collabs made a hundred small thread calls per round (~75 µs of
hand-off each, and small batches), and one busy collab used one core for its verification.
The pool takes every job queued since its last round — from any number of sequencers — cuts
their items into one contiguous share per thread and runs the shares in parallel (PyNaCl
releases the GIL), then hands each job its results in order.

Jobs must be pure, element-wise functions (`fn(items)` returns one result per item, and
`fn(a + b) == fn(a) + fn(b)`): the pool may split one job's items across threads. Nothing is
written here, so a caller that is cancelled may stop waiting; its results are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

T = TypeVar("T")
R = TypeVar("R")

# Below this many items per thread, splitting costs more (an extra thread hand-off) than it
# saves: a round that small runs on one thread.
MIN_SHARE: Final = 32
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


class CryptoPool:
    """Runs element-wise crypto jobs of many callers on `threads` worker threads at once."""

    def __init__(self, threads: int = 2) -> None:
        self._threads = max(1, threads)
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
        if not items:
            return []
        if small and self.idle and self._inline + len(items) <= INLINE_BUDGET:
            self._inline += len(items)
            return fn(items)
        job = _Job(fn, items)
        self._send.send_nowait(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        out: list[R] = []
        for start in sorted(job.parts):
            out.extend(job.parts[start])
        return out

    @property
    def idle(self) -> bool:
        """Open, and no round is running or queued."""
        return not (self._closed or self._in_round or self._send.statistics().current_buffer_used)

    def close(self) -> None:
        """No more jobs; `run` returns once the queued ones are done."""
        self._closed = True
        self._send.close()

    async def run(self) -> None:
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
                    async with trio.open_nursery() as nursery:
                        for share in _shares(jobs, self._threads):
                            nursery.start_soon(_run_share, share)
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


def _shares(jobs: list[_Job], threads: int) -> list[list[tuple[_Job, int, int]]]:
    """Cut the jobs' items, in order, into at most `threads` runs of about equal length."""
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
