"""What a catch-up may cost: its page and outbox bounds, and how many may run at once.

A catch-up reads a subscriber's missed events from the ledger and queues them to its
connection. A client that stops reading must not make the relay hold more than a bounded amount
for it, and many cheap clients must not make it hold many such amounts (issue 13, item 6). So:

- the ledger is read in pages of at most `page_events` events and `page_bytes` bytes, and the
  next two pages are read while one is queued (so the database's round trips overlap the
  socket and use both cores), never further ahead: a catch-up holds at most `PAGES_HELD` pages;
- a page is queued message by message, each only while the connection's outbox holds at most
  `outbox_bytes`; a client that does not read pins at most three pages and that share of its
  outbox (plus what the connection's writer is writing), and after `stall_seconds` without
  room it is disconnected as lagging, so it does not hold its slot for ever;
- at most `per_connection` catch-ups run on one connection, `per_account` over all of an
  account's connections and `per_relay` in the whole relay. A subscribe over a cap is refused
  with `overloaded` and a message saying which cap and what to do (`CatchupGate.admit`).

`CatchupGate` is plain bookkeeping (no I/O): the fan-out admits a subscription before its
catch-up and releases it when the subscription goes live, finishes or is removed. `Prefetch`
is one page read ahead, and `page_events` sizes the next page so it can be guessed
(`Fanout._queue_pages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from fanout._fanout import PageItem, Subscription

MiB: Final = 1024 * 1024
# Pages a catch-up holds at once: the one it is queueing and the two it reads ahead.
PAGES_HELD: Final = 3
K = TypeVar("K")


@dataclass(frozen=True)
class CatchupLimits:
    """The bounds of catch-up (docs/protocol.md, "Limits"); the relay's config sets them."""

    # Large pages: each costs a database round trip, and a page's bytes, not its events, are
    # what the memory bound counts.
    page_events: int = 4096
    page_bytes: int = MiB
    # A catch-up queues its next message only while the outbox holds at most this many bytes.
    outbox_bytes: int = MiB
    # A catch-up that finds no room for this long is disconnected as lagging.
    stall_seconds: float = 60
    # Live events held for a subscriber while it catches up; beyond either, they are dropped and
    # the catch-up reads the ledger again (the frames are shared by every such subscriber).
    pending_events: int = 10_000
    pending_bytes: int = 4 * MiB
    per_connection: int = 4
    per_account: int = 16
    per_relay: int = 128


class CatchupGate:
    """Counts running catch-ups per connection, per account and in all; admits or refuses."""

    def __init__(self, limits: CatchupLimits) -> None:
        self.limits = limits
        self.running = 0
        self.refused = 0
        self._per_connection: dict[object, int] = {}
        self._per_account: dict[str, int] = {}

    def admit(self, connection: object, account_id: str) -> str | None:
        """Count one more catch-up, or return why not (a message for the client) and count
        nothing. Every admitted catch-up must be `release`d exactly once."""
        limits = self.limits
        if self._per_connection.get(connection, 0) >= limits.per_connection:
            reason = (
                f"{limits.per_connection} subscriptions are already catching up on this"
                " connection (the limit): wait for `caught_up` on one of them, then subscribe"
                " again"
            )
        elif self._per_account.get(account_id, 0) >= limits.per_account:
            reason = (
                f"this account already has {limits.per_account} subscriptions catching up over"
                " its connections (the limit): wait for `caught_up` on one of them, then"
                " subscribe again"
            )
        elif self.running >= limits.per_relay:
            reason = (
                f"the relay is serving {limits.per_relay} catch-ups (its limit): retry in a few"
                " seconds"
            )
        else:
            self.running += 1
            self._per_connection[connection] = self._per_connection.get(connection, 0) + 1
            self._per_account[account_id] = self._per_account.get(account_id, 0) + 1
            return None
        self.refused += 1
        return reason

    def release(self, connection: object, account_id: str) -> None:
        self.running -= 1
        _decrement(self._per_connection, connection)
        _decrement(self._per_account, account_id)


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


class Prefetch:
    """A ledger page read beside the catch-up that will need it next, from `from_seq`, at most
    `max_events`. Its outcome, error included, is handed over by `page` (not raised in the
    nursery), so a failed read reaches the catch-up exactly as a read it made itself would.
    `cancel` drops a read that guessed wrong (the thread's query finishes, unused)."""

    def __init__(self, from_seq: int, max_events: int) -> None:
        self.from_seq = from_seq
        self.max_events = max_events
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._page: tuple[Sequence[PageItem], bool] | None = None
        self._error: Exception | None = None

    async def run(
        self,
        read: Callable[[Subscription, int, int], Awaitable[tuple[Sequence[PageItem], bool]]],
        sub: Subscription,
    ) -> None:
        with self._scope:
            try:
                self._page = await read(sub, self.from_seq, self.max_events)
            except Exception as exc:  # noqa: BLE001 — handed to the catch-up, re-raised there
                self._error = exc
            finally:
                self._done.set()

    def cancel(self) -> None:
        self._scope.cancel()

    async def page(self) -> tuple[Sequence[PageItem], bool]:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._page is not None
        return self._page


def page_events(items: Sequence[PageItem], most: int, page_bytes: int) -> int:
    """How many events to ask the next page for: as many as should fit four fifths of
    `page_bytes` at the sizes of `items` (so the page ends at its count and the read after it
    can be guessed), at most `most`."""
    size = sum(
        len(item) if isinstance(item, bytes) else len(item.event.body) + len(item.event.sig)
        for _, item in items
    )
    return max(1, min(most, page_bytes * 4 // 5 * len(items) // max(size, 1)))
