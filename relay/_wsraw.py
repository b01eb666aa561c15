"""The relay's WebSocket server: wsproto on a Trio socket stream, one task per connection.

Why not trio-websocket's `serve_websocket` (the clients still use trio-websocket): it runs two
tasks per connection (the handler, and a reader feeding a 64-message channel), a nursery of its
own, three Events and a lock, and keeps the upgrade request and its parser for the connection's
whole life: half of what an idle subscriber cost the relay (10.6 of 21.2 KB allocated;
docs/performance.md, "Memory per idle subscriber"). Here the connection's one task reads the
socket itself, in `get_message`, when the relay's request loop asks for the next message: the
loop is already serial, so nothing was gained by reading ahead, and a client that sends faster
than the relay answers meets TCP backpressure sooner (what it had queued in the channel waits in
its socket buffer instead). The price: a ping or close that arrives while a request is being
answered (a login waiting for Argon2) is answered when that request is done.

The protocol is wsproto's (frame parsing, masking, control frames, UTF-8 and close-code checks);
what this module adds is the I/O, the same limits the relay had (`max_message_size`: a larger
message is answered with close code 1009; a handshake not done within `connect_timeout` is
dropped), the close handshake, and the two relay-specific ways of writing: `send_framed` writes
bytes that are already unmasked frames (fan-out builds each published message once for every
subscriber: `fanout.Message`), and `write_now` writes them straight into the socket.

Who does what on one connection:

- The relay's request loop (the connection's task) calls `get_message`, which reads the socket,
  answers pings, answers the peer's close and ends with `ConnectionClosed` once the close
  handshake is done or the stream ended. A message that is too large, or a protocol error,
  is answered with a close frame carrying the code, and ends the connection.
- Writers (the relay's outbox writer, an artifact download, the close) take the connection's
  send turn, strictly first come, first served, so frames never interleave; a waiting writer is
  parked on a `ParkingLot` made only when a second one arrives.
- `aclose` sends the close frame and waits for the request loop to read the peer's answer (the
  caller bounds the wait; `abort` ends a stream whose peer ignored it). Once the close began,
  no data frame is written and messages still arriving are discarded.

Kept per open connection: the stream, wsproto's frame parser (its `Connection`, whose
event deque, never used here, is swapped for an empty tuple: `_drop_event_queue`), and a few
fields; the upgrade's request and HTTP parser go once it is answered.

`ConnectionClosed`, `CloseReason` and `Endpoint` are trio-websocket's public types, so the
relay's code and its tests catch the same exceptions as before. Only this module and
clientkit/_transport.py may import wsproto or touch trio-websocket's private state
(tests/test_house.py); tests/test_wsraw.py pins the wsproto version and checks a stock
trio-websocket client against this server.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import deque
from typing import TYPE_CHECKING, Final

import structlog
import trio
import wsproto
from trio_websocket import CloseReason, ConnectionClosed, Endpoint
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from wsproto.connection import Connection as Protocol

# The wsproto releases this module was checked against (its `Connection` events and states).
CHECKED_WSPROTO_VERSIONS: Final = ("1.3.2",)
# The largest message `write_now` writes: what a frame the kernel took only in part may leave
# on a connection beyond its outbox's count. Larger ones (catch-up pages, big commit groups) go
# through the connection's writer and are counted there.
WRITE_NOW_BYTES: Final = 64 * 1024
ABNORMAL_CLOSURE: Final = 1006
MESSAGE_TOO_BIG: Final = 1009
# accept() errors that mean "out of file descriptors or memory for now": wait, then retry
# (as trio.serve_listeners does), rather than stop listening.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_RETRY_SECONDS: Final = 0.1
log = structlog.get_logger("cozy.connection")


class IncompatibleWebSocketLibrary(RuntimeError):
    """wsproto is not a version this module was checked against."""


def check_compatible() -> None:
    """Raise `IncompatibleWebSocketLibrary` unless wsproto is a checked version."""
    version = getattr(wsproto, "__version__", "?")
    if version not in CHECKED_WSPROTO_VERSIONS:
        raise IncompatibleWebSocketLibrary(
            f"wsproto {version} is installed; relay/_wsraw.py was checked against"
            f" {', '.join(CHECKED_WSPROTO_VERSIONS)}: re-check its `Connection` (events, states,"
            " close handling) and extend CHECKED_WSPROTO_VERSIONS"
        )


class Limits:
    """What every connection of one server shares (one object, not a copy per connection)."""

    __slots__ = ("max_message_size", "receive_buffer_size")

    def __init__(self, max_message_size: int, receive_buffer_size: int) -> None:
        self.max_message_size = max_message_size
        self.receive_buffer_size = receive_buffer_size


class WebSocket:
    """One open server-side WebSocket connection (see the module docstring for who calls what).

    Slots, and nothing made before it is needed: a connection that only waits for its next
    message holds its stream, wsproto's frame parser and a few fields.
    """

    __slots__ = (
        "_close_reason",
        "_closed",
        "_finished",
        "_limits",
        "_parts",
        "_proto",
        "_send_waiters",
        "_sending",
        "_size",
        "_stream",
        "_tail",
    )

    def __init__(self, stream: trio.SocketStream, proto: Protocol, limits: Limits) -> None:
        self._stream = stream
        self._proto = proto
        self._limits = limits
        # Set once either side began the close (or the stream ended): no data frame is written.
        self._close_reason: CloseReason | None = None
        self._finished = False  # the close handshake is over or the stream ended: nothing is read
        self._closed: trio.Event | None = None  # made by an `aclose` waiting for the finish
        self._parts: list[bytes | bytearray | str] | None = (
            None  # a message arriving in several frames
        )
        self._size = 0
        self._sending = False  # some task has the send turn
        self._send_waiters: trio.lowlevel.ParkingLot | None = None
        # The rest of a frame `write_now` left half-written (the kernel took only part):
        # written before anything else, by the next send turn (`flush`).
        self._tail: memoryview | None = None

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection is closing or closed (None while open), as trio-websocket says."""
        return self._close_reason

    @property
    def finished(self) -> bool:
        """The close handshake is over or the stream ended: nothing more is read."""
        return self._finished

    @property
    def remote(self) -> Endpoint | str:
        """The peer's address (trio-websocket's `Endpoint` for a TCP peer)."""
        try:
            address, port = self._stream.socket.getpeername()[:2]
            return Endpoint(address, port, is_ssl=False)
        except (OSError, ValueError, TypeError):  # gone already, or not an IP peer
            return "unknown"

    # --- reading: only the connection's own task --------------------------------------------

    async def get_message(self) -> bytes | str:
        """The next complete message. Raises `ConnectionClosed` once the connection ended (the
        peer closed, the close this side began was answered, or the stream broke); messages
        that arrive after this side began closing are discarded."""
        while True:
            message = await self._next_message()
            if message is not None:
                return message
            if self._finished:
                break
            try:
                data = await self._stream.receive_some(self._limits.receive_buffer_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._finish(CloseReason(ABNORMAL_CLOSURE, None))
                break
            try:
                self._proto.receive_data(data)
            except RemoteProtocolError:  # not expected once open: wsproto reports a close
                await self._fail(1002, "protocol error")
        raise ConnectionClosed(self._close_reason)

    async def _next_message(self) -> bytes | str | None:
        """Handle what wsproto parsed so far; the first complete message, if any. (A helper,
        so that no event stays referenced while `get_message` sleeps in its read.)"""
        if self._finished:
            return None
        proto = self._proto
        for event in proto.events():
            if isinstance(event, BytesMessage | TextMessage):
                if self._close_reason is not None:
                    continue  # closing: pending messages are discarded
                message = await self._take_part(event)
                if message is not None:
                    return message
            elif isinstance(event, Ping):
                if self._close_reason is None:
                    await self._send_control(proto.send(event.response()))
            elif isinstance(event, CloseConnection):
                await self._on_close(event)
            # a Pong needs nothing: this side sends no pings
            if self.finished:  # (a property: mypy would keep the check above narrowed)
                break
        return None

    async def _take_part(self, event: BytesMessage | TextMessage) -> bytes | str | None:
        """Add one frame's data to the message in progress; the message once it is complete."""
        self._size += len(event.data)
        if self._size > self._limits.max_message_size:
            self._parts, self._size = None, 0
            limit = self._limits.max_message_size
            await self._fail(MESSAGE_TOO_BIG, f"Exceeded maximum message size: {limit} bytes")
            return None
        if event.message_finished and self._parts is None:
            self._size = 0
            return bytes(event.data) if isinstance(event, BytesMessage) else event.data
        parts = self._parts
        if parts is None:
            parts = self._parts = []
        parts.append(event.data)
        if not event.message_finished:
            return None
        self._parts, self._size = None, 0
        if isinstance(event, BytesMessage):
            return b"".join(parts)  # type: ignore[arg-type]  # one message's parts, all bytes
        return "".join(parts)  # type: ignore[arg-type]

    async def _on_close(self, event: CloseConnection) -> None:
        proto = self._proto
        if proto.state is ConnectionState.REMOTE_CLOSING:  # the peer began: answer it
            if self._close_reason is None:
                self._close_reason = CloseReason(event.code, event.reason or None)
            await self._send_control(proto.send(event.response()))
        elif proto.state is ConnectionState.OPEN:
            # wsproto's verdict on a malformed frame (1002, or 1007 for bad UTF-8): say so.
            await self._fail(event.code, event.reason or "protocol error")
            return
        # else: the answer to the close this side sent (LOCAL_CLOSING -> CLOSED)
        self._finish(self._close_reason or CloseReason(event.code, event.reason or None))
        # RFC 6455 §7.1.1: the server closes the TCP connection first.
        await self._close_stream()

    async def _fail(self, code: int, reason: str) -> None:
        """End the connection for the peer's fault: a close frame with `code`, then the end."""
        if self._proto.state is ConnectionState.OPEN:
            self._close_reason = CloseReason(code, reason)
            await self._send_control(self._proto.send(CloseConnection(code=code, reason=reason)))
        self._finish(self._close_reason or CloseReason(code, reason))
        await self._close_stream()

    def _finish(self, reason: CloseReason) -> None:
        if self._close_reason is None:
            self._close_reason = reason
        self._finished = True
        if self._closed is not None:
            self._closed.set()

    # --- writing: any task, one at a time ---------------------------------------------------

    async def _take_turn(self) -> None:
        if not self._sending:
            # Raises if cancelled, else returns without yielding: the turn is still free.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._sending = True
            return
        if self._send_waiters is None:
            self._send_waiters = trio.lowlevel.ParkingLot()
        await self._send_waiters.park()  # woken with the turn handed over (`_end_turn`)

    def _end_turn(self) -> None:
        waiters = self._send_waiters
        if waiters is not None and waiters.unpark(count=1):
            return  # the turn passes to the longest waiting sender
        self._sending = False
        self._send_waiters = None

    async def _write(self, data: bytes, *, control: bool) -> None:
        """Write `data` in this task's send turn. Data (not `control`) frames are refused with
        `ConnectionClosed` once the close began: checked in the turn, so nothing follows the
        close frame."""
        await self._take_turn()
        try:
            tail, self._tail = self._tail, None
            if tail is not None:  # half a frame is on the wire: it is finished first
                await self._stream.send_all(tail)
            if not control and self._close_reason is not None:
                raise ConnectionClosed(self._close_reason)
            if data:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._finish(CloseReason(ABNORMAL_CLOSURE, None))
            raise ConnectionClosed(self._close_reason) from None
        finally:
            self._end_turn()

    async def _send_control(self, data: bytes) -> None:
        """A pong or a close frame: a broken stream ends the connection, raising nothing."""
        with contextlib.suppress(ConnectionClosed):
            await self._write(data, control=True)

    async def send_message(self, message: bytes | str) -> None:
        """Send one message. Raises `ConnectionClosed` once the connection is closing."""
        if self._close_reason is not None:
            raise ConnectionClosed(self._close_reason)
        event = BytesMessage(data=message) if isinstance(message, bytes) else TextMessage(message)
        await self._write(self._proto.send(event), control=False)

    async def send_framed(self, data: bytes) -> None:
        """Write `data`, one or more complete unmasked frames, in order with the other sends.
        Raises `ConnectionClosed` like `send_message` once the connection is closing.

        The server negotiates no extension, so the frames need no RSV bits; wsproto keeps no
        per-message state on the sending side between complete messages (and a frame this
        server left half sent is finished before any other), so frames written beside it do
        not confuse it."""
        await self._write(data, control=False)

    def write_now(self, data: bytes) -> bool:
        """Write `data` (complete frames, at most WRITE_NOW_BYTES) straight to the socket
        without waiting, or do nothing and return False (then queue it for a writer, as usual).

        For the live fan-out path: a subscriber gets its message in the publishing task, with
        no writer-task wakeup. It is tried only when nothing can be in the way: the caller has
        nothing queued before it (see `Connection.offer`), no send of the connection is in
        progress or half done, and it is not closing. False when the kernel takes none of it
        (the send buffer is full). When it takes only part, the rest is kept and written
        before anything else by the next send turn: True, and `tail_pending` says the caller
        must `flush` soon (a frame half sent would hold back the connection's pongs, its
        close and every later message).
        """
        if (
            len(data) > WRITE_NOW_BYTES
            or self._close_reason is not None
            or self._sending
            or self._tail is not None
        ):
            return False
        try:
            written = os.write(self._stream.socket.fileno(), data)
        except OSError:  # full (EAGAIN), broken or closed: a writer's send will tell
            return False
        if written < len(data):
            self._tail = memoryview(data)[written:]
        return True

    @property
    def tail_pending(self) -> bool:
        """`write_now` left part of a frame unwritten: `flush` must follow."""
        return self._tail is not None

    async def flush(self) -> None:
        """Write what `write_now` left unwritten, in this task's send turn. Raises
        `ConnectionClosed` if the stream broke."""
        if self._tail is not None:
            await self._write(b"", control=True)

    # --- closing ----------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Begin the close handshake with `code` and `reason`, wait until the peer answered
        (read by `get_message` in the connection's task), then close the stream. Returns at
        once when the close had already begun. The caller bounds the wait (`abort` then)."""
        if self._close_reason is not None:
            return
        self._close_reason = CloseReason(code, reason)
        if self._proto.state is ConnectionState.OPEN:
            frame = self._proto.send(CloseConnection(code=code, reason=reason))
            await self._send_control(frame)
        if not self._finished:
            if self._closed is None:
                self._closed = trio.Event()
            await self._closed.wait()
        await self._close_stream()

    async def abort(self) -> None:
        """Close the TCP stream at once, without a close handshake: for a peer that ignored
        ours. `get_message` then ends with `ConnectionClosed`."""
        self._finish(CloseReason(ABNORMAL_CLOSURE, None))
        await self._close_stream()

    async def _close_stream(self) -> None:
        await trio.aclose_forcefully(self._stream)  # a socket's close does not wait


def _drop_event_queue(proto: Protocol) -> None:
    """Replace the open connection's `_events` deque (0.7 KiB: an empty deque keeps a block)
    with an empty tuple. wsproto 1.3.2's `Connection` queues there only in
    `receive_data(None)` (an end of stream, which this module never reports that way) and
    `events()` only drains it, so the queue is never used here; `check_compatible` pins the
    version this was read against."""
    if isinstance(getattr(proto, "_events", None), deque) and not proto._events:
        proto._events = ()  # type: ignore[assignment]


class UpgradeRequest:
    """A client's WebSocket upgrade request, to `accept` or `reject` (once)."""

    __slots__ = ("_handshake", "_limits", "_stream", "headers")

    def __init__(
        self,
        stream: trio.SocketStream,
        handshake: WSConnection,
        request: Request,
        limits: Limits,
    ) -> None:
        self._stream = stream
        self._handshake: WSConnection | None = handshake
        self._limits = limits
        # The request's headers, as trio-websocket gives them: (name, value) byte pairs.
        self.headers: Sequence[tuple[bytes, bytes]] = tuple(request.extra_headers)

    def _spent(self) -> WSConnection:
        handshake, self._handshake = self._handshake, None
        if handshake is None:
            raise RuntimeError("this upgrade request was already answered")
        self.headers = ()  # nothing of the upgrade is kept once it is answered
        return handshake

    async def accept(self) -> WebSocket:
        """Complete the upgrade; the open connection. Raises `ConnectionClosed` when the
        client is gone already."""
        handshake = self._spent()
        data = handshake.send(AcceptConnection())
        proto = handshake.connection  # the open connection's protocol; the upgrade's goes
        assert proto is not None
        _drop_event_queue(proto)
        ws = WebSocket(self._stream, proto, self._limits)
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ws._finish(CloseReason(ABNORMAL_CLOSURE, None))
            raise ConnectionClosed(ws.closed) from None
        return ws

    async def reject(self, status_code: int, *, body: bytes = b"") -> None:
        """Answer with a plain HTTP `status_code` (and `body`); no WebSocket opens. Raises
        `ConnectionClosed` when the client is gone already."""
        handshake = self._spent()
        headers = [(b"Content-length", str(len(body)).encode("ascii"))] if body else []
        data = handshake.send(
            RejectConnection(status_code=status_code, headers=headers, has_body=bool(body))
        )
        if body:
            data += handshake.send(RejectData(data=body))
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(CloseReason(ABNORMAL_CLOSURE, None)) from None
        finally:
            await trio.aclose_forcefully(self._stream)


class WebSocketServer:
    """Listens and serves each connection in one task of `handler_nursery`: the upgrade (within
    `connect_timeout`), then `handler(request)`; the stream is closed when the handler returns.
    """

    def __init__(
        self,
        handler: Callable[[UpgradeRequest], Awaitable[None]],
        *,
        handler_nursery: trio.Nursery,
        max_message_size: int,
        receive_buffer_size: int,
        connect_timeout: float,
    ) -> None:
        check_compatible()
        self._handler = handler
        self._handler_nursery = handler_nursery
        self._limits = Limits(max_message_size, receive_buffer_size)
        self._connect_timeout = connect_timeout
        self.port = 0

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on `host`:`port` (0 for any free port) until cancelled; `task_status` gets
        the port once listening."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_from, listener)
            task_status.started(self.port)

    async def _accept_from(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("accept_failed", error=errno.errorcode.get(exc.errno or 0, "?"))
                    await trio.sleep(_ACCEPT_RETRY_SECONDS)
                else:
                    self._handler_nursery.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        """One connection's task, from the upgrade to the closed stream."""
        try:
            request = None  # none within connect_timeout: the stream is closed
            with trio.move_on_after(self._connect_timeout):
                request = await self._read_request(stream)
            if request is not None:
                await self._handler(request)  # holds no reference to it here once answered
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_request(self, stream: trio.SocketStream) -> UpgradeRequest | None:
        """Read the HTTP upgrade request; None (answered with 400 when it was malformed) when
        there is none to serve."""
        handshake = WSConnection(ConnectionType.SERVER)
        while True:
            for event in handshake.events():
                if isinstance(event, Request):
                    return UpgradeRequest(stream, handshake, event, self._limits)
            try:
                data = await stream.receive_some(self._limits.receive_buffer_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            try:
                handshake.receive_data(data)
            except RemoteProtocolError as exc:
                if exc.event_hint is not None:  # a 400 answer, built by wsproto
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(handshake.send(exc.event_hint))
                return None
