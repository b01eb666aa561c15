"""One task for the relay's per-connection timers, instead of a sleeping task per connection.

An idle connection used to keep three tasks asleep just to be woken once: its session's expiry
watch, its unauthenticated deadline (30 s, and kept after the login), and each subscription's
checkpoint heartbeat. A Trio task with its coroutine frames, cancel scope and timer costs about
2.7 KiB, so at 10,000 idle subscribers those tasks were a third of the relay's memory per
connection (docs/performance.md, "Memory per idle subscriber"). Here they are entries in one
heap, and one task sleeps until the earliest.

Callbacks run in that task, synchronously: they must be quick and must not raise. One that needs
to wait (a heartbeat reads the ledger) starts a short task of its own in its connection's
nursery. One that raises is logged and dropped, so a bug costs its own timer, not every other
connection's. A timer cancelled before it fires is skipped; it keeps its heap slot until its
time comes or cancelled entries outnumber live ones (then the heap is rebuilt), so a session
renewed many times costs nothing lasting.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

import structlog
import trio

if TYPE_CHECKING:
    from collections.abc import Callable

log = structlog.get_logger("cozy.relay")


class Timer:
    """A scheduled callback; `cancel` stops it from running (idempotent)."""

    __slots__ = ("_fn", "_seq", "_timers", "when")

    def __init__(self, timers: Timers, when: float, seq: int, fn: Callable[[], None]) -> None:
        self.when = when
        self._seq = seq
        self._fn: Callable[[], None] | None = fn
        self._timers = timers

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self._seq) < (other.when, other._seq)

    @property
    def cancelled(self) -> bool:
        return self._fn is None

    def cancel(self) -> None:
        if self._fn is not None:
            self._fn = None  # let go of what the callback holds (a connection) at once
            self._timers._cancelled += 1


class Timers:
    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._seq = 0
        self._cancelled = 0  # cancelled timers still in the heap
        self._wake = trio.Event()  # set when a timer earlier than the one slept for arrives

    def __len__(self) -> int:
        """Timers scheduled and not cancelled (for the tests and metrics)."""
        return len(self._heap) - self._cancelled

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run `fn()` in the timers task `delay` seconds from now (Trio's clock)."""
        when = trio.current_time() + max(0.0, delay) if math.isfinite(delay) else math.inf
        self._seq += 1
        timer = Timer(self, when, self._seq, fn)
        if math.isinf(when):
            timer._fn = None  # never fires: nothing to keep
            return timer
        if not self._heap or timer < self._heap[0]:
            self._wake.set()
        heapq.heappush(self._heap, timer)
        return timer

    async def run(self) -> None:
        """Fire timers as they come due, until cancelled."""
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and (heap[0].cancelled or heap[0].when <= now):
                timer = heapq.heappop(heap)
                fn, timer._fn = timer._fn, None
                if fn is None:
                    self._cancelled -= 1
                    continue
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 — one timer's bug is its own
                    log.error("timer_failed", error=type(exc).__name__)
            if self._cancelled > 64 and self._cancelled * 2 > len(heap):
                heap[:] = [t for t in heap if not t.cancelled]
                heapq.heapify(heap)
                self._cancelled = 0
            self._wake = trio.Event()
            deadline = heap[0].when if heap else math.inf
            with trio.move_on_at(deadline):
                await self._wake.wait()
