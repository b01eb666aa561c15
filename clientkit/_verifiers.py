"""Event signatures checked on every core while a history streams in.

A catch-up is bound by Ed25519 verification, one signature per event: so frames are taken off
a subscription in batches, and each batch's content events are checked ahead of the fold
(`model.envelope.plan_precheck`, with the members' keys as the reader's fold has them) while
the fold takes in the batch before it. The fold stays the only judge: it skips its own check
only for an event whose signature held under exactly the key it pins there (`Prechecked`),
and checks every other event itself, in order, as before.

The checks run in worker processes (clientkit/_sigprocs.py, ADR-0023), each share driven by
one thread of a process-wide pool (`concurrent.futures`): the threads never touch Trio and
wait on a pipe without the GIL, and a batch's result is awaited through a Trio worker thread.
Decryption stays on the fold's thread: collab keys never leave the reader's process.
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

import trio

from clientkit import _sigprocs
from model import wire
from model.envelope import Prechecked, PrecheckPlan, plan_precheck

if TYPE_CHECKING:
    from collections.abc import Mapping

    from model.envelope import SignedEvent

BATCH: Final = 512  # frames taken off a subscription at a time, at most
# Below this many events a batch is checked by the fold itself: a worker round trip costs more.
MIN_BATCH: Final = 32

_pool: tuple[ThreadPoolExecutor, int] | None = None
_pool_lock = threading.Lock()


def _executor() -> tuple[ThreadPoolExecutor, int]:
    """The process's threads, one per worker process (one per core when checks run in the
    threads themselves), and how many there are."""
    global _pool  # one pool per process, made on first use
    with _pool_lock:
        if _pool is None:
            threads = _sigprocs.checkers().count or max(2, os.cpu_count() or 2)
            _pool = (ThreadPoolExecutor(threads, thread_name_prefix="cozy-verify"), threads)
        return _pool


class Batch:
    """Frames taken off a subscription, in order, with their signatures being checked."""

    def __init__(self, frames: list[wire.Reply]) -> None:
        self.frames = collections.deque(frames)
        self.started = False
        self._plan: PrecheckPlan | None = None
        self._futures: list[Future[list[bool]]] = []

    def start(self, keys: Mapping[str, bytes]) -> None:
        """Check the content events still in the batch under `keys` (the members' keys as the
        fold has them), in the workers, unless started already. Without keys (the fold has not
        taken in the genesis yet) nothing starts: the caller starts it again once it has some."""
        if self.started or not keys:
            return
        self.started = True
        events: list[SignedEvent] = [f.event for f in self.frames if isinstance(f, wire.Event)]
        if len(events) < MIN_BATCH:
            return
        plan = plan_precheck(events, keys)
        checks = plan.checks
        if checks:
            pool, shares = _executor()
            check = _sigprocs.checkers().check
            step = -(-len(checks) // shares)
            self._plan = plan
            self._futures = [
                pool.submit(check, checks[i : i + step]) for i in range(0, len(checks), step)
            ]

    async def checked(self) -> Prechecked | None:
        """What the workers found held (None when nothing was sent to them)."""
        if self._plan is None:
            return None
        verdicts: list[bool] = []
        for future in self._futures:
            verdicts += (
                future.result() if future.done() else await trio.to_thread.run_sync(future.result)
            )
        return self._plan.result(verdicts)
