"""Opening a WebSocket to a relay, owning the TCP stream so it is always closed.

trio-websocket leaves the underlying stream open on the client side when the server closes
first (it waits for a TCP close that already happened), so we open the stream ourselves, hand
it to `wrap_client_stream`, and close it when the connection's scope ends.
"""

from __future__ import annotations

import collections
import os
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
# A Cloudflare Access token (e.g. from `cloudflared access token --app URL`) sent on the upgrade
# as Cf-Access-Jwt-Assertion, for relays behind Access (SO-6). Never logged.
ACCESS_TOKEN_ENV: Final = "COZY_CF_ACCESS_TOKEN"  # noqa: S105 — a variable name, not a token


class BadRelayUrl(ValueError):
    """The relay URL is not ws://host:port/… or wss://host:port/…."""


@asynccontextmanager
async def open_websocket(
    url: str,
    nursery: trio.Nursery,
    *,
    message_queue_size: int = 64,
    access_token: str | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A client WebSocket whose TCP (or TLS) stream is closed when the block ends.

    `access_token` (default: the COZY_CF_ACCESS_TOKEN environment variable) is sent as the
    Cf-Access-Jwt-Assertion header. A relay that refuses it raises
    `trio_websocket.ConnectionRejected` (403, or 503 while it cannot check tokens).
    """
    token = access_token if access_token is not None else os.environ.get(ACCESS_TOKEN_ENV)
    headers = [(b"Cf-Access-Jwt-Assertion", token.strip().encode())] if token else None
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
                extra_headers=headers,
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
