"""One client connection: a bounded outbox drained by a writer task, and a close protocol.

Replies, acks and live events are *offered* to the outbox without waiting; when it is full (in
frames or in bytes) the client is not keeping up, so the connection is dropped with a reason
rather than letting it stall a sequencer or the fan-out. Catch-up goes through the same outbox,
paced: the fan-out waits (`wait_for_room`) until the outbox holds at most a small share before
queueing each catch-up message, so a client catching up is paced by its own socket and leaves
the rest of the outbox to replies and live events.

The connection also counts what it has asked of the relay but not yet been answered: appends
waiting for their seq (`AppendTicket`) and background work such as tool calls and artifact
downloads. The server refuses more than the limits below with `overloaded` instead of queueing
it, so one connection's flood costs a bounded amount of memory (docs/protocol.md, "Limits").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio
from trio_websocket import ConnectionClosed, Endpoint

from fanout import Message, framed_batch, starts_new_batch
from model import wire
from model._crypto import random_bytes
from model.proofs import CHALLENGE_BYTES
from relay import _stages

if TYPE_CHECKING:
    from fanout import Subscription
    from model.artifacts import RefHasher
    from model.authz import MemberView
    from model.membership import MemberKind
    from relay._cf_access import AccessIdentity
    from relay._timers import Timer
    from relay._wsraw import WebSocket

OUTBOX_FRAMES: Final = 8192
# The outbox's byte budget. Live event frames are shared by every subscriber (encoded once), so
# this bounds what one stalled client pins, not a copy per client.
OUTBOX_BYTES: Final = 8 * 1024 * 1024
# Appends submitted on one connection and not yet acked (or refused): beyond either bound the
# next one is refused with `overloaded`. The bench keeps 512 in flight per connection.
MAX_APPENDS_IN_FLIGHT: Final = 2048
MAX_APPEND_BYTES_IN_FLIGHT: Final = 16 * 1024 * 1024
# Tool calls and artifact downloads run beside the reader; at most this many per connection.
MAX_BACKGROUND_TASKS: Final = 8
# The writer drains the outbox into one `send` of at most about this many bytes.
WRITE_BYTES: Final = 1024 * 1024
CLOSE_TIMEOUT: Final = 2.0


@dataclass
class ArtifactUpload:
    """An artifact upload in progress on one connection: whose, where it goes, how far it got."""

    collab_id: str
    hasher: RefHasher
    account_id: str = ""
    next_index: int = 0
    size: int = 0


class Connection:
    """One client connection's state. An idle one holds no task of its own (its writer runs
    only while the outbox has something to send; its timers live in relay/_timers.py) and
    only what it needs: slots, not a `__dict__`, and the outbox's deque exists while there is
    something in it (docs/performance.md, "Memory per idle subscriber")."""

    __slots__ = (
        "_closing",
        "_dead",
        "_dropped",
        "_outbox",
        "_outbox_bytes_limit",
        "_outbox_frames_limit",
        "_peer_port",
        "_room",
        "_unsent",
        "_writer_done",
        "access",
        "account_id",
        "account_kind",
        "append_bytes_in_flight",
        "appends_in_flight",
        "background_tasks",
        "box_pk",
        "caller",
        "challenge",
        "expiry",
        "member_of",
        "membership_generation",
        "nursery",
        "outbox_bytes",
        "outbox_frames",
        "session_ended",
        "session_expires_at",
        "session_tasks",
        "sign_pk",
        "subscriptions",
        "uploads",
        "ws",
    )

    def __init__(self, ws: WebSocket, nursery: trio.Nursery) -> None:
        self.ws = ws
        # Sent in `Welcome`; signed requests sign it, so their signatures hold on this
        # connection only (model/proofs.py).
        self.challenge = random_bytes(CHALLENGE_BYTES)
        self.account_id: str | None = None
        self.sign_pk: bytes = b""
        self.box_pk: bytes = b""
        self.session_expires_at = 0.0
        # Why the relay ended the last session while the connection stayed open (it expired,
        # the account ended its sessions): the next refusal says so.
        self.session_ended: str | None = None
        self.account_kind: MemberKind | None = None  # the bound account's kind
        # Everything below belongs to the current session, and ends with it (relay/_sessions.py).
        self.uploads: dict[str, ArtifactUpload] = {}  # artifact uploads in progress
        self.subscriptions: dict[str, Subscription] = {}  # by collab
        # Tool calls and downloads (a dict as an ordered set: an empty one holds no table).
        self.session_tasks: dict[trio.CancelScope, None] = {}
        # collab -> the sender's membership there, checked once and then cached until a removal
        # evicts it; `membership_generation` moves on every eviction, so a lookup that started
        # before one never writes its stale answer back.
        self.member_of: dict[str, MemberView] = {}
        self.membership_generation = 0
        # The bound session's expiry timer (relay/_sessions.py re-arms it on every change).
        self.expiry: Timer | None = None
        # Who Cloudflare Access let through (SO-6), when the relay checks it; else None.
        self.access: AccessIdentity | None = None
        # Whom the relay's rate budgets charge for this connection (relay._throttle.caller_key).
        self.caller = ""
        self.nursery = nursery
        # Items are single frames (coalesced into batches by the writer) or whole messages
        # built once by fan-out for every subscriber (written as they are). None while empty
        # and no writer runs: an idle connection keeps no queue.
        self._outbox: deque[bytes | Message] | None = None
        # The limits as they were when the connection opened (a test gives one connection a tiny
        # outbox by patching the module constant around its creation).
        self._outbox_bytes_limit = OUTBOX_BYTES
        self._outbox_frames_limit = OUTBOX_FRAMES
        self.outbox_bytes = 0  # bytes queued in the outbox, not yet handed to the socket
        self.outbox_frames = 0  # frames queued (a fan-out Message counts its event frames)
        self._unsent = 0  # items offered to the outbox and not yet written by the writer
        self.appends_in_flight = 0
        self.append_bytes_in_flight = 0
        self.background_tasks = 0
        self._closing = False
        self._dropped = False
        self._dead = False  # a send found the connection closed: nothing more is written
        # Set when the running writer ends; None while none runs (started by `offer`).
        self._writer_done: trio.Event | None = None
        # Catch-ups waiting for the outbox to drain; made by the first that waits.
        self._room: trio.lowlevel.ParkingLot | None = None
        self._peer_port: int | None = None  # for stage times (relay/_stages.py), when asked

    @property
    def closing(self) -> bool:
        return self._closing

    def admit_append(self, size: int) -> AppendTicket | None:
        """Count one more append in flight, or None when this connection is at its limit."""
        if (
            self.appends_in_flight >= MAX_APPENDS_IN_FLIGHT
            or self.append_bytes_in_flight + size > MAX_APPEND_BYTES_IN_FLIGHT
        ):
            return None
        self.appends_in_flight += 1
        self.append_bytes_in_flight += size
        return AppendTicket(self, size)

    async def _run_writer(self, outbox: deque[bytes | Message], done: trio.Event) -> None:
        """Send queued items in order until the outbox is empty, then end (`offer` starts the
        next writer); once closing, until everything queued is sent.

        Everything already queued goes out in one `send` (up to about WRITE_BYTES): runs of
        single frames are coalesced into `batch` messages of at most MAX_BATCH_FRAMES frames and
        BATCH_BYTES bytes (so a batch never exceeds what a client accepts), each framed here; a
        fan-out `Message` is written as the WebSocket frame it already is.
        """
        # Live messages in the send underway, while stage times are recorded (relay/_stages.py).
        written: list[Message] | None = [] if _stages.RECORDER is not None else None
        try:
            while not self._dropped:
                # First the rest of a direct write the kernel took only in part (`offer`).
                # Checked on every round, with no await between it and ending: a tail left
                # while this writer was sending is never left behind.
                await self.ws.flush()
                if not outbox:
                    break
                out: list[bytes] = []
                run: list[bytes] = []
                run_size = size = taken = 0
                while outbox and size < WRITE_BYTES:
                    item = outbox.popleft()
                    taken += 1
                    n = len(item)
                    self.outbox_bytes -= n
                    size += n
                    if isinstance(item, Message):
                        self.outbox_frames -= item.events
                        if written is not None and _stages.sampled(item.last_seq):
                            written.append(item)
                        if run:
                            out.append(framed_batch(run))
                            run, run_size = [], 0
                        out.append(item.framed)
                    else:
                        if starts_new_batch(len(run), run_size, n):
                            out.append(framed_batch(run))
                            run, run_size = [], 0
                        self.outbox_frames -= 1
                        run.append(item)
                        run_size += n
                if run:
                    out.append(framed_batch(run))
                if self._room:  # a catch-up waits: taken off the queue, it may queue more
                    self._room.unpark_all()
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()  # hold one copy of what is being written, not two
                if written:
                    # Stamped as the bytes go to the socket: the subscriber may read them
                    # before this task runs again.
                    self._record_deliveries(written, _stages.now())
                    written.clear()
                await self.ws.send_framed(data)
                self._unsent -= taken
        except ConnectionClosed:
            self._dead = True  # what is offered from now on stays queued (and counted)
        finally:
            if self._dropped or (not self._dead and not outbox):
                self._outbox = None  # idle again (or dropped): let the deque go
            self._writer_done = None
            done.set()

    async def wait_for_room(self, message: Message, share: int) -> bool:
        """Wait until `message` may be queued as catch-up: the outbox is empty, or it holds at
        most `share` bytes and `offer` would take the message. False once closing. The caller
        offers it right after, with no await in between (a message too big even for an empty
        outbox is then refused, as a live one would be)."""
        while not self._closing:
            if self.outbox_frames == 0 or (
                self.outbox_bytes <= share and self._fits(len(message), message.events)
            ):
                return True
            if self._room is None:
                self._room = trio.lowlevel.ParkingLot()
            await self._room.park()
        return False

    def _fits(self, size: int, frames: int) -> bool:
        return (
            self.outbox_bytes + size <= self._outbox_bytes_limit
            and self.outbox_frames + frames <= self._outbox_frames_limit
        )

    def offer(self, frame: bytes | Message) -> bool:
        """Queue a frame (or a fan-out `Message`) without waiting. False when the connection is
        closing or the outbox is full (OUTBOX_FRAMES frames, counting each event frame of a
        `Message`, or OUTBOX_BYTES bytes); the caller decides what a full outbox means (see
        `reply`)."""
        if self._closing:
            return False
        # Nothing queued ahead of a fan-out message: write it now if the kernel takes it (this
        # saves the writer task a wakeup per published batch), else queue it as usual.
        if self._unsent == 0 and isinstance(frame, Message):
            at = (
                _stages.now()
                if _stages.RECORDER is not None and _stages.sampled(frame.last_seq)
                else 0.0
            )
            if self.ws.write_now(frame.framed):
                if at:
                    self._record_deliveries([frame], at)
                if self.ws.tail_pending:  # taken only in part: a writer finishes it
                    self._start_writer(self._outbox if self._outbox is not None else deque())
                return True
        n = len(frame)
        frames = frame.events if isinstance(frame, Message) else 1
        if not self._fits(n, frames):
            return False
        outbox = self._outbox
        if outbox is None:
            outbox = deque()
        elif len(outbox) >= OUTBOX_FRAMES:
            return False
        outbox.append(frame)
        self._start_writer(outbox)
        self._unsent += 1
        self.outbox_bytes += n
        self.outbox_frames += frames
        return True

    def _start_writer(self, outbox: deque[bytes | Message]) -> None:
        """Make `outbox` the queue and start its writer, unless one runs (it takes what is
        queued) or a send found the connection closed."""
        self._outbox = outbox
        if self._writer_done is None and not self._dead:
            done = self._writer_done = trio.Event()
            self.nursery.start_soon(self._run_writer, outbox, done)

    def _record_deliveries(self, messages: list[Message], at: float) -> None:
        """Stage times: live messages written to this subscriber's socket at `at`."""
        recorder = _stages.RECORDER
        if recorder is None:
            return
        if self._peer_port is None:
            remote = self.ws.remote
            self._peer_port = remote.port if isinstance(remote, Endpoint) else 0
        port = self._peer_port
        for msg in messages:
            recorder.delivery(port, msg.last_seq, msg.events, at)

    def reply(self, frame: wire.Reply) -> None:
        """Queue a reply; a client that cannot take its own replies is dropped as lagging."""
        if not self.offer(wire.encode(frame)) and not self._closing:
            self.disconnect(
                wire.CloseCode.LAGGING, "client is not reading its replies: reconnect and resume"
            )

    async def send(self, frame: bytes) -> None:
        """Send a frame now, waiting for the socket (artifact downloads)."""
        await self.ws.send_message(frame)

    def disconnect(self, code: int, reason: str) -> None:
        """Drop now: pending frames are discarded, the peer gets `code` and `reason`."""
        if self._closing:
            return
        self._closing = self._dropped = True
        if self._outbox is not None and self._writer_done is None:
            self._outbox = None  # pending frames are discarded (a running writer stops)
        if self._room is not None:
            self._room.unpark_all()
        self.nursery.start_soon(self._close_socket, code, reason)

    def close_gracefully(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with `code` and `reason` (used at shutdown)."""
        if self._closing:
            return
        self._closing = True
        if self._room is not None:
            self._room.unpark_all()
        self.nursery.start_soon(self._close_after_flush, code, reason)

    def ended(self) -> None:
        """The connection's handler is done (its nursery closes): offer nothing more."""
        self._closing = True

    async def _close_after_flush(self, code: int, reason: str) -> None:
        if (done := self._writer_done) is not None:  # what is queued is being written
            with trio.move_on_after(CLOSE_TIMEOUT):
                await done.wait()
        await self._close_socket(code, reason)

    async def _close_socket(self, code: int, reason: str) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            await self.ws.aclose(code, reason)
        if scope.cancelled_caught:
            await self.ws.abort()  # the peer ignored our close


class AppendTicket:
    """The reply path of one append in flight: answers the connection, and on that (single)
    answer frees the connection's in-flight slot. Implements the sequencer's `Replier`."""

    __slots__ = ("_conn", "_size")

    def __init__(self, conn: Connection, size: int) -> None:
        self._conn: Connection | None = conn
        self._size = size

    def release(self) -> None:
        """Free the slot without answering (the append never reached a sequencer)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.appends_in_flight -= 1
            conn.append_bytes_in_flight -= self._size

    def reply(self, frame: wire.Reply) -> None:
        conn = self._conn
        self.release()
        if conn is not None:
            conn.reply(frame)
