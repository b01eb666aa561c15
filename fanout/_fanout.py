"""The fan-out actor: who is subscribed to which collab, catch-up from the ledger, then live.

Only committed events reach `publish` (the sequencer persists first, then notifies), so any
event a subscriber misses while it catches up is already readable from the ledger. That gives
the gap-free, duplicate-free switch from catch-up to live:

1. register the subscription in the *catching-up* state: live events now queue in `pending`;
2. page through the ledger from `from_seq` until the ledger says it held no more (every event
   committed before registration is there);
3. with no await in between, replay `pending` from the next expected seq and flip to *live*.

If `pending` overflows during a long catch-up it is dropped and step 2 runs again.

Catch-up costs bounded memory whatever the client does (fanout/_catchup.py): each ledger page
is bounded in events and in bytes, becomes pre-framed `batch` messages (as live batches do),
and goes through the connection's bounded outbox, each message only once the outbox holds at
most a small share; at most two pages are read ahead of the one being queued. A subscriber that
stops reading pins those pages and that share, is disconnected as lagging after a while without room,
and how many catch-ups may run at once is capped per connection, account and relay. Live frames
are offered to the subscriber's outbox without waiting: a full outbox means the subscriber lags,
and it is disconnected with a reason and the seq to resume from, so a slow subscriber never
stalls the sequencer or anyone else. Each published batch (one commit's events of one collab)
becomes one `Message` — the events' frames in one `batch`, already framed for WebSocket — built
once, and the same bytes go to every subscriber as one item of its outbox, written with one
`send` (ADR-0005). A DM's body goes only to its two participants: everyone else gets a
`withheld` frame with the event id and chain, enough to keep verifying the chain, and the DM's
signed header, which proves the position is a DM between two other members; so a batch
holding DMs is built once per distinct view of it (usually three: each participant's, and
everyone else's).

A member removed from a collab has their live subscriptions to it ended (`evict`) right after
the removal event is queued to them, so they see why their stream ended.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, NamedTuple, Protocol

import msgspec
import trio

from fanout._catchup import PAGES_HELD, CatchupGate, CatchupLimits, Prefetch, page_events
from fanout._message import Message, starts_new_batch
from model import wire
from model.envelope import SequencedEvent, decode_body, dm_header, dm_link_id

LAG_CLOSE_CODE: Final = wire.CloseCode.LAGGING


# An event of a catch-up page: (seq, its `event` frame), or (seq, the event) for a DM, whose
# frame depends on who reads it.
PageItem = tuple[int, bytes | SequencedEvent]
# (collab_id, from_seq, max_events, max_bytes) -> (items, whether the ledger held more):
# `Ledger.read_frames` run in a worker thread.
ReadPage = Callable[[str, int, int, int], Awaitable[tuple[Sequence[PageItem], bool]]]


class Outbox(Protocol):
    """The subscriber's side of a connection, as fan-out needs it."""

    def offer(self, frame: bytes | Message) -> bool:
        """Queue a frame, or a whole `Message` (sent as is), without waiting; False when the
        queue is full."""

    async def wait_for_room(self, message: Message, share: int) -> bool:
        """Wait until `message` may be queued as catch-up: the outbox is empty, or it holds at
        most `share` bytes and has room for the message. False once the connection closes."""

    def disconnect(self, code: int, reason: str) -> None:
        """Drop the connection with a close code and a human-readable reason."""


class Subscription:
    __slots__ = (
        "account_id",
        "admitted",
        "collab_id",
        "ended",
        "follow",
        "live",
        "next_seq",
        "outbox",
        "overflowed",
        "pending",
        "pending_bytes",
        "tree_size",
    )

    def __init__(
        self, collab_id: str, from_seq: int, outbox: Outbox, *, follow: bool, account_id: str = ""
    ) -> None:
        self.collab_id = collab_id
        self.account_id = account_id
        self.next_seq = from_seq
        self.outbox = outbox
        self.follow = follow
        self.live = False
        self.ended = False
        self.overflowed = False
        self.admitted = False  # holds a catch-up slot (`Fanout.admit`) until live or gone
        # A list, not a deque: cleared once live, it holds no storage (an empty deque keeps a
        # 0.5 KiB block, per idle subscriber; docs/performance.md).
        self.pending: list[_Out] = []
        self.pending_bytes = 0
        # The size of the last checkpoint the subscriber holds: the client's `tree_size`, then
        # each one sent (relay/_checkpoints.py proves consistency from it).
        self.tree_size = 0

    def __repr__(self) -> str:
        return f"Subscription({self.collab_id}, next={self.next_seq}, live={self.live})"


class FanoutStats(msgspec.Struct):
    """A snapshot for metrics. `subscriptions` are the following ones registered now, of which
    `live_subscriptions` are past their catch-up; `catchups` are running now; the other counts
    are totals since start."""

    collabs: int
    subscriptions: int
    published_events: int
    deliveries: int
    lagging_disconnects: int
    live_subscriptions: int = 0
    catchups: int = 0  # catch-ups running now (following or not)
    catchup_refusals: int = 0  # subscribes refused with `overloaded` by a catch-up cap
    catchup_stalls: int = 0  # catch-ups disconnected for finding no room in their outbox
    catchup_reads_dropped: int = 0  # pages read ahead from a wrong guess, read again


def encode_event(ev: SequencedEvent) -> bytes:
    return wire.encode(
        wire.Event(collab_id=ev.collab_id, seq=ev.seq, event=ev.event, chain=ev.chain)
    )


def _encode_withheld(ev: SequencedEvent) -> bytes:
    """The link a non-participant gets for a DM: its header and signature, never its body
    (only version-2 DMs have an audience, so the header exists)."""
    header = dm_header(decode_body(ev.event.body))
    return wire.encode(
        wire.Withheld(
            collab_id=ev.collab_id,
            seq=ev.seq,
            event_id=dm_link_id(header, ev.event.sig),
            chain=ev.chain,
            author_id=header.actor_id,
            recipient_id=header.recipient_id,
            epoch=header.epoch,
            sealed=header.sealed,
            sig=ev.event.sig,
        )
    )


class _Out(NamedTuple):
    """One event's frames: the full one, and for a DM the withheld one for non-participants."""

    seq: int
    frame: bytes
    audience: tuple[str, ...] = ()
    withheld: bytes = b""

    def for_account(self, account_id: str) -> bytes:
        if not self.audience or account_id in self.audience:
            return self.frame
        return self.withheld

    @classmethod
    def of(cls, ev: SequencedEvent) -> _Out:
        if not ev.audience:
            return cls(ev.seq, encode_event(ev))
        return cls(ev.seq, encode_event(ev), ev.audience, _encode_withheld(ev))

    @property
    def size(self) -> int:
        return len(self.frame) + len(self.withheld)


class _Group:
    """One published batch (ascending, contiguous seqs) and its messages, built on first use:
    one for everyone when it holds no DM, else one per distinct view of its DMs."""

    __slots__ = ("_dms", "_messages", "first_seq", "frames", "last_seq")

    def __init__(self, frames: list[_Out]) -> None:
        self.frames = frames
        self.first_seq = frames[0].seq
        self.last_seq = frames[-1].seq
        self._dms = [out.audience for out in frames if out.audience]
        self._messages: dict[tuple[bool, ...], list[Message]] = {}

    def messages_for(self, account_id: str) -> list[Message]:
        view = tuple(account_id in audience for audience in self._dms)
        msgs = self._messages.get(view)
        if msgs is None:
            msgs = self._messages[view] = _messages(
                [o.for_account(account_id) for o in self.frames]
            )
            last = self.first_seq - 1
            for msg in msgs:
                last += msg.events
                msg.last_seq = last
        return msgs


def _messages(frames: Iterable[bytes]) -> list[Message]:
    """`frames` as `batch` messages of at most MAX_BATCH_FRAMES frames and BATCH_BYTES bytes
    (a lone frame over that goes alone), so no message exceeds what a client accepts."""
    out: list[Message] = []
    run: list[bytes] = []
    size = 0
    for frame in frames:
        if starts_new_batch(len(run), size, len(frame)):
            out.append(Message.of_frames(run))
            run, size = [], 0
        run.append(frame)
        size += len(frame)
    if run:
        out.append(Message.of_frames(run))
    return out


def _catchup_messages(
    items: Sequence[PageItem], account_id: str
) -> collections.deque[tuple[Message, int]]:
    """A ledger page as `account_id` may see it, in `batch` messages by the one batching rule
    (`_messages`), each with the seq of its last event. Frames the ledger built are spliced in
    as they are; only a DM's frame is encoded here, the one this account may see."""
    out: collections.deque[tuple[Message, int]] = collections.deque()
    sent = 0
    frames = (
        item if isinstance(item, bytes) else _frame_for(item, account_id) for _, item in items
    )
    for message in _messages(frames):
        sent += message.events
        out.append((message, items[sent - 1][0]))
    return out


def _frame_for(ev: SequencedEvent, account_id: str) -> bytes:
    """`_Out.of(ev).for_account(account_id)` without encoding the frame the account does not
    see."""
    if not ev.audience or account_id in ev.audience:
        return encode_event(ev)
    return _encode_withheld(ev)


class Fanout:
    """Subscriber registry and live streaming. Lives on the Trio loop; never blocks."""

    def __init__(
        self,
        read_page: ReadPage,
        limits: CatchupLimits | None = None,
        caught_up: Callable[[Subscription], wire.CaughtUp] | None = None,
    ) -> None:
        self._read_page = read_page
        # Builds a subscription's `caught_up` (the relay adds its signed checkpoint); called
        # with no await around it, at the moment the subscriber has been sent its whole head.
        self._caught_up = caught_up or _plain_caught_up
        self.limits = limits or CatchupLimits()
        self._gate = CatchupGate(self.limits)
        self._subs: dict[str, set[Subscription]] = {}
        self._published = 0
        self._deliveries = 0
        self._lagging = 0
        self._stalls = 0
        self._reads_dropped = 0

    def statistics(self) -> FanoutStats:
        """O(subscriptions): meant for a metrics scrape, not for the publish path."""
        return FanoutStats(
            collabs=len(self._subs),
            subscriptions=sum(len(s) for s in self._subs.values()),
            published_events=self._published,
            deliveries=self._deliveries,
            lagging_disconnects=self._lagging,
            live_subscriptions=sum(sub.live for subs in self._subs.values() for sub in subs),
            catchups=self._gate.running,
            catchup_refusals=self._gate.refused,
            catchup_stalls=self._stalls,
            catchup_reads_dropped=self._reads_dropped,
        )

    def publish(self, events: Sequence[SequencedEvent]) -> None:
        """Hand committed events (one collab, ascending seq) to every subscriber of it."""
        if not events:
            return
        self._published += len(events)
        subs = self._subs.get(events[0].collab_id)
        if not subs:
            return
        frames = [_Out.of(ev) for ev in events]
        group = _Group(frames)
        size = 0  # computed for the first subscriber that is catching up

        for sub in list(subs):
            if sub.live:
                if sub.next_seq == group.first_seq:
                    self._deliver_group(sub, group)
                else:
                    self._deliver(sub, frames)
            elif not sub.overflowed:
                size = size or sum(out.size for out in frames)
                sub.pending.extend(frames)
                sub.pending_bytes += size
                if (
                    len(sub.pending) > self.limits.pending_events
                    or sub.pending_bytes > self.limits.pending_bytes
                ):
                    sub.pending.clear()
                    sub.pending_bytes = 0
                    sub.overflowed = True

    def admit(self, sub: Subscription) -> str | None:
        """Take a catch-up slot for `sub` before `stream`ing it, or return why not: a message
        for the client, to refuse its subscribe with `overloaded` (fanout/_catchup.py). The slot
        is given back when `sub` goes live, finishes or is removed."""
        refusal = self._gate.admit(sub.outbox, sub.account_id)
        sub.admitted = refusal is None
        return refusal

    async def stream(self, sub: Subscription) -> None:
        """Catch `sub` up from the ledger, then (if following) leave it live until `remove`.

        Returns once the subscription is live (or finished, when not following, or its
        connection closed). The caller owns the subscription's lifetime and must call `remove`
        when its connection ends. A subscription that was not `admit`ted is caught up all the
        same, without a slot (for callers with a bound of their own).
        """
        try:
            await self._catch_up(sub)
        finally:
            self._release(sub)

    def register(self, sub: Subscription) -> None:
        """Make a following `sub` known to `publish` and `evict` now, before its task runs
        `stream` (which registers it too, for callers that do not). An ended one stays out."""
        if sub.follow and not sub.ended:
            self._subs.setdefault(sub.collab_id, set()).add(sub)

    async def _catch_up(self, sub: Subscription) -> None:
        if _already_ended(sub):
            return  # ended (evicted, unsubscribed) before its task started
        self.register(sub)
        while True:
            sub.overflowed = False
            if not await self._replay(sub):
                return
            if not sub.follow:
                if not sub.outbox.offer(wire.encode(self._caught_up(sub))):
                    self._lag(sub)
                sub.ended = True
                return
            if not sub.overflowed:
                break
        # No await from here on: replay what queued up while we read, then flip to live.
        backlog = [f for f in sub.pending if f.seq >= sub.next_seq]
        sub.pending.clear()
        sub.pending_bytes = 0
        sub.live = True
        self._deliver(sub, backlog)
        if not sub.ended and not sub.outbox.offer(wire.encode(self._caught_up(sub))):
            self._lag(sub)

    async def _replay(self, sub: Subscription) -> bool:
        """Queue the ledger from `sub.next_seq` to the head it finds; False when the
        subscription must stop. While one page is queued the next ones are read
        (`_queue_pages`), so the ledger's round trips overlap the socket and each other; a
        catch-up holds at most `PAGES_HELD` pages. A failed read raises here as itself (not in
        an exception group), as a read without the nursery would."""
        page = await self._read(sub, sub.next_seq, self.limits.page_events)
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                done = await self._queue_pages(sub, page, nursery)
            except Exception as exc:  # noqa: BLE001 — re-raised below, outside the nursery
                failure, done = exc, False
            nursery.cancel_scope.cancel()  # reads ahead that are no longer wanted
        if failure is not None:
            raise failure
        return done

    async def _queue_pages(
        self, sub: Subscription, page: tuple[Sequence[PageItem], bool], nursery: trio.Nursery
    ) -> bool:
        """Queue `page` and the pages after it, reading up to PAGES_HELD - 1 of them ahead.

        Postgres builds a page's frames on one core (ledger/_frames.py), and that, not the
        socket, is what bounds a catch-up; two reads at once use both cores. Where a page ends
        is known only once it is read (it is bounded by bytes too), so the second read ahead is
        a guess: pages are asked for by an event count that should fit the byte bound (from the
        sizes of the page just read), the guess starts where such a page would end, and a read
        that does not start where the page before it ended is dropped (cancelled) and read
        again from the right seq. A guess is only made while pages do end at their count.
        """
        limits = self.limits
        ahead: collections.deque[Prefetch] = collections.deque()
        requested = limits.page_events  # the event count `page` was read with
        while True:
            items, more = page
            if more:
                next_seq = items[-1][0] + 1
                if ahead and ahead[0].from_seq != next_seq:  # a wrong guess, and what followed
                    for read in ahead:
                        read.cancel()
                    self._reads_dropped += len(ahead)
                    ahead.clear()
                limit = page_events(items, limits.page_events, limits.page_bytes)
                wanted = PAGES_HELD - 1 if len(items) == requested else 1
                while len(ahead) < wanted:
                    start = ahead[-1].from_seq + ahead[-1].max_events if ahead else next_seq
                    read = Prefetch(start, limit)
                    nursery.start_soon(read.run, self._read, sub)
                    ahead.append(read)
            messages = _catchup_messages(items, sub.account_id)
            del items, page  # the page is held once, as messages
            while messages:
                message, last_seq = messages.popleft()  # let go of each once it is queued
                if not await self._queue(sub, message):
                    return False
                sub.next_seq = last_seq + 1
            if sub.ended:
                return False
            if not more:
                return True
            read = ahead.popleft()
            requested = read.max_events
            page = await read.page()

    async def _read(
        self, sub: Subscription, from_seq: int, max_events: int
    ) -> tuple[Sequence[PageItem], bool]:
        return await self._read_page(sub.collab_id, from_seq, max_events, self.limits.page_bytes)

    async def _queue(self, sub: Subscription, message: Message) -> bool:
        """Queue one catch-up message once the outbox has room for it; False when the
        subscription must stop (ended, connection closing, or stalled and disconnected)."""
        with trio.move_on_after(self.limits.stall_seconds):
            if not await sub.outbox.wait_for_room(message, self.limits.outbox_bytes):
                self.remove(sub)  # the connection is going away
                return False
            if sub.ended:
                return False  # unsubscribed: nothing of it may follow the Unsubscribed reply
            if not sub.outbox.offer(message):
                self._lag(sub)
                return False
            return True
        self._stalls += 1
        self._lag(sub, "stalled")  # the close reason's 123 bytes leave no room for more
        return False

    def remove(self, sub: Subscription) -> None:
        sub.ended = True
        self._release(sub)
        subs = self._subs.get(sub.collab_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.collab_id]

    def evict(self, collab_id: str, account_id: str, reason: str) -> int:
        """End `account_id`'s live subscriptions to `collab_id` (they were removed from it).

        Call it after publishing the removal, so the removed member receives the event that
        removed them before the end. Returns how many subscriptions ended.
        """
        ended = 0
        for sub in list(self._subs.get(collab_id, ())):
            if sub.account_id == account_id:
                self.end(sub, reason)
                ended += 1
        return ended

    def evict_account(self, account_id: str, reason: str) -> int:
        """End every subscription of `account_id`, in every collab and on every connection
        (its agent token was revoked). Returns how many subscriptions ended."""
        ended = 0
        for subs in list(self._subs.values()):
            for sub in list(subs):
                if sub.account_id == account_id:
                    self.end(sub, reason)
                    ended += 1
        return ended

    def end(self, sub: Subscription, reason: str) -> None:
        """End one subscription now, telling its subscriber why and where to resume.

        Works in either state: a subscription still catching up stops at its next page.
        """
        if sub.ended:
            return
        self.remove(sub)
        if not sub.outbox.offer(
            wire.encode(
                wire.SubscriptionEnded(
                    collab_id=sub.collab_id, reason=reason, resume_from=sub.next_seq
                )
            )
        ):
            self._lag(sub)

    def _deliver_group(self, sub: Subscription, group: _Group) -> None:
        """The whole published batch as one message: the live path's common case."""
        if sub.ended:
            return
        for msg in group.messages_for(sub.account_id):
            if not sub.outbox.offer(msg):
                self._lag(sub)
                return
        sub.next_seq = group.last_seq + 1
        self._deliveries += len(group.frames)

    def _deliver(self, sub: Subscription, frames: Sequence[_Out]) -> None:
        for out in frames:
            seq = out.seq
            if sub.ended:
                return
            if seq < sub.next_seq:
                continue  # already sent during catch-up
            if seq != sub.next_seq or not sub.outbox.offer(out.for_account(sub.account_id)):
                # A gap cannot happen (publish order is commit order); treat it like lag so the
                # client resumes from the ledger instead of silently missing an event.
                self._lag(sub)
                return
            sub.next_seq = seq + 1
            self._deliveries += 1

    def _release(self, sub: Subscription) -> None:
        if sub.admitted:
            sub.admitted = False
            self._gate.release(sub.outbox, sub.account_id)

    def _lag(self, sub: Subscription, how: str = "lagging") -> None:
        self._lagging += 1
        self.remove(sub)
        sub.outbox.disconnect(
            LAG_CLOSE_CODE,
            f"subscriber {how} on {sub.collab_id}: reconnect and resume after the last seq you"
            f" received (at most {sub.next_seq - 1} was queued)",
        )


def _already_ended(sub: Subscription) -> bool:
    """`sub.ended`, read through a call so the type checker does not carry the answer past
    the awaits after it (another task ends subscriptions)."""
    return sub.ended


def _plain_caught_up(sub: Subscription) -> wire.CaughtUp:
    return wire.CaughtUp(collab_id=sub.collab_id, seq=sub.next_seq - 1)
