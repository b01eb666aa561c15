"""Writing already-framed WebSocket messages to a trio-websocket connection.

Why: fan-out builds each published batch's WebSocket frame once (`fanout.Message`) and every
subscriber's connection writes the same bytes; a connection's writer frames its own coalesced
replies the same way, so one drained outbox is one `send`. trio-websocket has no public call
for writing bytes that are already a frame; `send_message` would frame (and copy) the message
again for every connection through wsproto.

This module is the only place in the relay that touches trio-websocket's private state
(tests/test_house.py checks the source tree; the client's one reliance on its internals is
pinned in clientkit/_transport.py), and only to do what its own `WebSocketConnection._send`
does: check `_close_reason`, hold `_stream_lock` (the lock its reader task also takes to send
pongs and the close frame, so frames never interleave), and `send_all` on `_stream`; a broken
stream is handled by its `_abort_web_socket`, as `_send` does. wsproto keeps no per-message
state on the sending side between complete messages (only a fragmented message in progress,
which trio-websocket never leaves open), so frames written beside it do not confuse it; and
trio-websocket's server negotiates no extensions, so the frames need no RSV bits.
`check_compatible` asserts all of this for every connection (`Connection` calls it first) and
tests/test_wsraw.py pins it: if an upgrade of trio-websocket changes these internals, every
connection fails with this error and that test fails, rather than frames being written wrong.
`abort_stream` closes `_stream` for a peer that ignores the close handshake.

`release_handshake` lets go of the HTTP upgrade's parser once the connection is open: wsproto
keeps its `H11Handshake` (an h11 connection with its buffer and states, and an event queue)
for the connection's whole life, though after the upgrade its only use is `WSConnection.events`
asking it for events (it has none left). An idle subscriber is mostly such bookkeeping, so the
relay swaps it for a shared empty stand-in (docs/performance.md, "Memory per idle
subscriber"); tests/test_wsraw.py pins the wsproto version and its shape.
"""

from __future__ import annotations

import array
import fcntl
import os
import termios
from typing import TYPE_CHECKING, Final

import structlog
import trio
import trio_websocket
import wsproto
from trio_websocket import ConnectionClosed
from wsproto.handshake import H11Handshake

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trio_websocket import WebSocketConnection
    from wsproto.events import Event

# The trio-websocket releases whose internals this module was checked against.
CHECKED_VERSIONS: Final = ("0.12.2",)
# The wsproto releases whose `WSConnection` `release_handshake` was checked against.
CHECKED_WSPROTO_VERSIONS: Final = ("1.3.2",)
# `write_now` writes only while the socket's send buffer would hold at most this much.
WRITE_NOW_BYTES: Final = 8 * 1024
log = structlog.get_logger("cozy.connection")
_ATTRIBUTES: Final = ("_close_reason", "_stream_lock", "_stream", "_wsproto", "_abort_web_socket")


class IncompatibleWebSocketLibrary(RuntimeError):
    """trio-websocket is not a version whose internals `send_framed` was checked against."""


def check_compatible(ws: WebSocketConnection | None = None) -> None:
    """Raise `IncompatibleWebSocketLibrary` unless trio-websocket is a checked version (and,
    given a connection, it has the internals `send_framed` uses and no extension)."""
    version = getattr(trio_websocket, "__version__", "?")
    if version not in CHECKED_VERSIONS:
        raise IncompatibleWebSocketLibrary(
            f"trio-websocket {version} is installed; relay/_wsraw.py was checked against"
            f" {', '.join(CHECKED_VERSIONS)}: re-check its internals and extend CHECKED_VERSIONS"
        )
    version = getattr(wsproto, "__version__", "?")
    if version not in CHECKED_WSPROTO_VERSIONS:
        raise IncompatibleWebSocketLibrary(
            f"wsproto {version} is installed; relay/_wsraw.py was checked against"
            f" {', '.join(CHECKED_WSPROTO_VERSIONS)}: re-check `WSConnection` (its use of"
            " `handshake` once open) and extend CHECKED_WSPROTO_VERSIONS"
        )
    if ws is None:
        return
    missing = [a for a in _ATTRIBUTES if not hasattr(ws, a)]
    if missing or not isinstance(ws._stream_lock, trio.StrictFIFOLock):
        raise IncompatibleWebSocketLibrary(f"trio-websocket internals changed: {missing}")
    proto = getattr(ws._wsproto.connection, "_proto", None)
    if proto is None or getattr(proto, "extensions", None) != []:
        raise IncompatibleWebSocketLibrary("a WebSocket extension was negotiated (or unknown)")


def write_now(ws: WebSocketConnection, data: bytes) -> bool:
    """Write `data` (complete frames, at most WRITE_NOW_BYTES) straight to the socket without
    waiting, or do nothing and return False. True means the kernel took all of it.

    For the live fan-out path: a subscriber whose socket is drained gets its message in the
    publishing task, with no writer-task wakeup. It only tries when nothing can be in the way
    or left half-written: the caller has nothing queued before it (see `Connection.offer`), no
    send of the connection is in progress (the stream lock is free), it is not closing, it is a
    plain TCP socket, and what its send buffer holds (TIOCOUTQ) plus `data` is at most
    WRITE_NOW_BYTES, half of Linux's default TCP send buffer (16 KiB, which the relay never
    lowers), so the kernel takes it whole. Should the kernel take
    only part anyway, the connection cannot continue (half a frame is on the wire and the lock
    cannot be held across tasks to finish it), so it is aborted: the client reconnects and
    resumes, exactly as after a lagging disconnect.
    """
    if (
        len(data) > WRITE_NOW_BYTES
        or ws._close_reason
        or ws._stream_lock.locked()
        or not isinstance(ws._stream, trio.SocketStream)
    ):
        return False
    fd = ws._stream.socket.fileno()
    try:
        # Bytes still in the send buffer (sent but unacknowledged too: a peer's delayed ACK
        # keeps a few KiB there for a while even when it reads promptly).
        queued = array.array("i", [0])
        fcntl.ioctl(fd, termios.TIOCOUTQ, queued)
        if queued[0] + len(data) > WRITE_NOW_BYTES:
            return False
        written = os.write(fd, data)
    except OSError:  # full (EAGAIN), broken or closed: the writer's send_all will tell
        return False
    if written == len(data):
        return True
    log.warning("direct_write_partial", written=written, size=len(data))
    ws._stream.socket.close()  # the reader and writer see the stream closed and end
    return False


async def abort_stream(ws: WebSocketConnection) -> None:
    """Close the connection's TCP stream at once, without a close handshake: for a peer that
    ignored ours. trio-websocket's `aclose` gives up waiting but leaves the stream open."""
    await trio.aclose_forcefully(ws._stream)


async def send_framed(ws: WebSocketConnection, data: bytes) -> None:
    """Write `data`, one or more complete unmasked frames, in order with the connection's own
    sends. Raises `ConnectionClosed` like `send_message` once the connection is closing."""
    async with ws._stream_lock:
        # Checked under the lock: `aclose` sets the reason before it queues the close frame
        # for this (FIFO) lock, so nothing is written after a close frame.
        if ws._close_reason:
            raise ConnectionClosed(ws._close_reason)
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws._close_reason) from None


class _SpentHandshake:
    """Stands in for wsproto's `H11Handshake` once the connection is open: `WSConnection`
    reads only `events()` from it then (`state`, `send` and `receive_data` go to its
    `connection`), and a finished handshake has no events left."""

    __slots__ = ()

    def events(self) -> Iterator[Event]:
        return iter(())


_SPENT_HANDSHAKE: Final = _SpentHandshake()


def release_handshake(ws: WebSocketConnection) -> bool:
    """Drop the open connection's HTTP upgrade state (about 2.5 KiB); True if it was dropped.

    Only when the upgrade is complete (wsproto has its `connection`) and every handshake event
    was taken; otherwise nothing changes (the connection then just keeps those bytes).
    """
    proto = ws._wsproto
    handshake = proto.handshake
    if (
        proto.connection is None
        or not isinstance(handshake, H11Handshake)
        or handshake._events  # an event not yet taken: keep it where `events()` finds it
    ):
        return False
    proto.handshake = _SPENT_HANDSHAKE  # type: ignore[assignment]
    return True
