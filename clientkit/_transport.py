"""Opening a WebSocket to a relay, owning the TCP stream so it is always closed.

trio-websocket leaves the underlying stream open on the client side when the server closes
first (it waits for a TCP close that already happened), so we open the stream ourselves, hand
it to `wrap_client_stream`, and close it when the connection's scope ends.
"""

from __future__ import annotations

import collections
import ssl
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import trio
import trio_websocket

from model import wire

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

CONNECT_TIMEOUT: Final = 10.0


class BadRelayUrl(ValueError):
    """The relay URL is not ws://host:port/… or wss://host:port/…."""


@asynccontextmanager
async def open_websocket(
    url: str, nursery: trio.Nursery, *, message_queue_size: int = 64
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A client WebSocket whose TCP (or TLS) stream is closed when the block ends."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise BadRelayUrl(f"relay URL must look like ws://HOST:PORT or wss://HOST, got {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(CONNECT_TIMEOUT):
        stream: trio.abc.Stream
        if parts.scheme == "wss":
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname, port, ssl_context=ssl.create_default_context()
            )
        else:
            stream = await trio.open_tcp_stream(parts.hostname, port)
        try:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                parts.hostname,
                resource,
                message_queue_size=message_queue_size,
                max_message_size=wire.WS_HARD_LIMIT,
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    try:
        yield ws
    finally:
        with trio.move_on_after(2) as cleanup:
            cleanup.shield = True
            await ws.aclose()
        await trio.aclose_forcefully(stream)


class FrameReader:
    """Reads relay frames one at a time from a WebSocket, unpacking batches in order.

    For code that speaks the protocol directly (load generators, protocol tests); `Client`
    does this itself.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._pending: collections.deque[wire.Reply] = collections.deque()

    async def next(self) -> wire.Reply:
        while not self._pending:
            self._pending.extend(wire.unbatch_replies(await self.ws.get_message()))  # type: ignore[arg-type]
        return self._pending.popleft()
