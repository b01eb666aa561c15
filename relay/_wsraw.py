"""Writing already-framed WebSocket messages to a trio-websocket connection.

Why: fan-out builds each published batch's WebSocket frame once (`fanout.Message`) and every
subscriber's connection writes the same bytes; a connection's writer frames its own coalesced
replies the same way, so one drained outbox is one `send`. trio-websocket has no public call
for writing bytes that are already a frame; `send_message` would frame (and copy) the message
again for every connection through wsproto.

This module is the only place that touches trio-websocket's private state, and only to do what
its own `WebSocketConnection._send` does: check `_close_reason`, hold `_stream_lock` (the lock
its reader task also takes to send pongs and the close frame, so frames never interleave), and
`send_all` on `_stream`; a broken stream is handled by its `_abort_web_socket`, as `_send` does.
wsproto keeps no per-message state on the sending side between complete messages (only a
fragmented message in progress, which trio-websocket never leaves open), so frames written
beside it do not confuse it; and trio-websocket's server negotiates no extensions, so the frames
need no RSV bits. `check_compatible` asserts all of this for every connection (`Connection`
calls it first) and tests/test_wsraw.py pins it: if an upgrade of trio-websocket changes these
internals, every connection fails with this error and that test fails, rather than frames being
written wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio
import trio_websocket
from trio_websocket import ConnectionClosed

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

# The trio-websocket releases whose internals this module was checked against.
CHECKED_VERSIONS: Final = ("0.12.2",)
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
    if ws is None:
        return
    missing = [a for a in _ATTRIBUTES if not hasattr(ws, a)]
    if missing or not isinstance(ws._stream_lock, trio.StrictFIFOLock):
        raise IncompatibleWebSocketLibrary(f"trio-websocket internals changed: {missing}")
    proto = getattr(ws._wsproto.connection, "_proto", None)
    if proto is None or getattr(proto, "extensions", None) != []:
        raise IncompatibleWebSocketLibrary("a WebSocket extension was negotiated (or unknown)")


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
