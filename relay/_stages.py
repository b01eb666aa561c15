"""Where an append's time goes inside the relay: per-event stage times for `cozy bench latency`.

A diagnostic, off unless `COZY_STAGE_TIMES=1` (`stage_times = true`): then `RECORDER` is set
and the relay stamps each append with `time.monotonic()` as it moves along its path, and each
write of a live fan-out message to a subscriber's socket. Off, every hook is one `is None`
check, so production pays nothing for it. The stamps are CLOCK_MONOTONIC, one clock for every
process on a Linux machine, so the bench subtracts them from times its own processes took (the
publisher's schedule, each subscriber's receipt) to get the stages at both ends.

The event stamps, in order (`EVENT_STAMPS`):

- `received`: the append was decoded and queued to its collab's inbox (relay/_collabs.py);
- `taken`: the verify stage took it from the inbox, in a batch;
- `verified`: its batch's signatures were checked (crypto pool, worker threads);
- `writing`: the write stage handed its run to the ledger writer;
- `started`: the writer's thread began the group's transaction;
- `committed`: that transaction committed;
- `published`: fan-out was handed the committed run, back on the Trio loop.

A delivery is `(peer port, last seq of the message, events in it, when it was written)`, kept
for one message in `DELIVERY_SAMPLE` (`sampled`): the port is the subscriber's own local port, which the bench's subscribers know, so each delivery
is matched with its receipt. What the recorder holds is bounded (`MAX_EVENTS`, `MAX_DELIVERIES`;
the excess is counted, not kept) and is taken, and cleared, by `GET /debug/stages` on the ops
listener, which answers 404 while the recorder is off.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import msgspec

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from model.sequencer import Assignment

EVENT_STAMPS: Final = (
    "received",
    "taken",
    "verified",
    "writing",
    "started",
    "committed",
    "published",
)
# Deliveries are stamped for one live message in DELIVERY_SAMPLE (those whose last seq is a
# multiple of it): with 100 subscribers a delivery stamp per message would cost the relay more
# per event than some of the stages it measures.
DELIVERY_SAMPLE: Final = 8
MAX_EVENTS: Final = 200_000
MAX_DELIVERIES: Final = 2_000_000

now = time.monotonic


class StageTimes(msgspec.Struct):
    """What `GET /debug/stages` answers: events as `[collab_id, seq, [stamps...]]`, deliveries
    as `[port, last_seq, events, written_at]`, and how many of each were not kept."""

    events: list[tuple[str, int, list[float]]]
    deliveries: list[tuple[int, int, int, float]]
    events_dropped: int = 0
    deliveries_dropped: int = 0


class StageRecorder:
    """Holds the stamps until the bench takes them. Lives on the Trio loop (the writer thread's
    stamps reach it through the sequencer, after `write` returned)."""

    def __init__(self) -> None:
        self._events: list[tuple[str, int, list[float]]] = []
        self._deliveries: list[tuple[int, int, int, float]] = []
        self._events_dropped = 0
        self._deliveries_dropped = 0

    def event(self, collab_id: str, seq: int, stamps: list[float]) -> None:
        if len(self._events) < MAX_EVENTS:
            self._events.append((collab_id, seq, stamps))
        else:
            self._events_dropped += 1

    def delivery(self, port: int, last_seq: int, events: int, at: float) -> None:
        if len(self._deliveries) < MAX_DELIVERIES:
            self._deliveries.append((port, last_seq, events, at))
        else:
            self._deliveries_dropped += 1

    def take(self) -> StageTimes:
        out = StageTimes(
            self._events, self._deliveries, self._events_dropped, self._deliveries_dropped
        )
        self._events, self._deliveries = [], []
        self._events_dropped = self._deliveries_dropped = 0
        return out


def sampled(last_seq: int) -> bool:
    """Whether the writes of a live message ending at `last_seq` are stamped (0: not live)."""
    return last_seq > 0 and last_seq % DELIVERY_SAMPLE == 0


# Set once at start-up by a relay whose config turns stage times on; None otherwise.
RECORDER: StageRecorder | None = None


def enable() -> StageRecorder:
    """Turn stamping on for this process (the bench's relay child runs one relay)."""
    global RECORDER  # one switch for the process, read on the hot path
    if RECORDER is None:
        RECORDER = StageRecorder()
    return RECORDER


def stamp(stamps: Iterable[list[float] | None]) -> None:
    """The same moment on each stamped submission of a batch (unstamped ones are skipped)."""
    at = now()
    for one in stamps:
        if one is not None:
            one.append(at)


def record(
    collab_id: str,
    run: Sequence[tuple[list[float] | None, Assignment]],
    timing: list[float],
) -> None:
    """Hand the stage times of a committed run's fresh events to the recorder, stamped
    `published` now (fan-out is handed them next, with no await between)."""
    recorder = RECORDER
    if recorder is None or len(timing) != 2:
        return
    at = now()
    for stamps, a in run:
        if stamps is not None and not a.duplicate:
            recorder.event(collab_id, a.seq, [*stamps, *timing, at])
