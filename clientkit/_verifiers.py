"""Event signatures checked on every core while a history streams in.

A catch-up is bound by Ed25519 verification on one core, and PyNaCl releases the GIL while it
verifies: so frames are taken off a subscription in batches, and each batch's content events
are checked in worker threads (`model.envelope.precheck`, with the members' keys as the reader's
fold has them) while the fold takes in the batch before it. The fold stays the only judge:
it skips its own check only for an event whose signature held under exactly the key it pins
there (`Prechecked`), and checks every other event itself, in order, as before. The workers
also decrypt the content they can with the reader's epoch keys (the fold's main thread used to
spend as long decrypting each event as the rest of its fold, most of it waiting to get the GIL
back from the workers after each call); the fold takes that plaintext only for the exact body
and the key it would use itself.

The workers are a process-wide pool (`concurrent.futures`, one thread per core): they never
touch Trio, and a batch's result is awaited through a Trio worker thread.
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

import trio

from model import wire
from model.envelope import Prechecked, merge_prechecked, precheck

if TYPE_CHECKING:
    from collections.abc import Mapping

    from model.envelope import SignedEvent

BATCH: Final = 512  # frames taken off a subscription at a time, at most
# Below this many events a batch is checked by the fold itself: a thread hop costs more.
MIN_BATCH: Final = 32
WORKERS: Final = max(2, os.cpu_count() or 2)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool  # one pool per process, made on first use
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="cozy-verify")
        return _pool


class Batch:
    """Frames taken off a subscription, in order, with their signatures being checked."""

    def __init__(
        self,
        frames: list[wire.Reply],
        keys: Mapping[str, bytes],
        collab_keys: Mapping[int, bytes] | None = None,
    ) -> None:
        self.frames = collections.deque(frames)
        events: list[SignedEvent] = [f.event for f in frames if isinstance(f, wire.Event)]
        self._futures: list[Future[Prechecked]] = []
        if len(events) >= MIN_BATCH and keys:
            step = -(-len(events) // WORKERS)
            pool = _executor()
            self._futures = [
                pool.submit(precheck, events[i : i + step], keys, collab_keys)
                for i in range(0, len(events), step)
            ]

    async def checked(self) -> Prechecked | None:
        """What the workers found held (None when the batch was too small to send them)."""
        if not self._futures:
            return None
        parts = []
        for future in self._futures:
            parts.append(
                future.result() if future.done() else await trio.to_thread.run_sync(future.result)
            )
        return merge_prechecked(parts)
