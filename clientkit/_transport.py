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
# For relays behind Cloudflare Access (SO-6), sent on the upgrade and never logged: a token
# (e.g. from `cloudflared access token -app URL`), or a service token's id and secret.
ACCESS_TOKEN_ENV: Final = "COZY_CF_ACCESS_TOKEN"  # noqa: S105 — a variable name, not a token
ACCESS_CLIENT_ID_ENV: Final = "COZY_CF_ACCESS_CLIENT_ID"
ACCESS_CLIENT_SECRET_ENV: Final = "COZY_CF_ACCESS_CLIENT_SECRET"  # noqa: S105 — a variable name


class BadRelayUrl(ValueError):
    """The relay URL is not ws://host:port/… or wss://host:port/…."""


def access_headers(access_token: str | None = None) -> list[tuple[bytes, bytes]] | None:
    """The upgrade's Cloudflare Access headers, or None when nothing is configured.

    A token (`access_token`, else COZY_CF_ACCESS_TOKEN; "" means none) goes out twice: as
    `cf-access-token`, which Cloudflare's edge accepts in place of its login cookie, and as
    `Cf-Access-Jwt-Assertion`, the header the relay itself checks (what the edge adds, and what
    a client reaching the origin directly must send). A service token's id and secret
    (COZY_CF_ACCESS_CLIENT_ID and COZY_CF_ACCESS_CLIENT_SECRET, both set) go out as
    `CF-Access-Client-Id` / `CF-Access-Client-Secret`, which only the edge understands: it
    swaps them for a token.
    """
    token = access_token if access_token is not None else os.environ.get(ACCESS_TOKEN_ENV, "")
    headers: list[tuple[bytes, bytes]] = []
    if token.strip():
        value = token.strip().encode()
        headers += [(b"cf-access-token", value), (b"Cf-Access-Jwt-Assertion", value)]
    client_id = os.environ.get(ACCESS_CLIENT_ID_ENV, "").strip()
    client_secret = os.environ.get(ACCESS_CLIENT_SECRET_ENV, "").strip()
    if client_id and client_secret:
        headers += [
            (b"CF-Access-Client-Id", client_id.encode()),
            (b"CF-Access-Client-Secret", client_secret.encode()),
        ]
    return headers or None


@asynccontextmanager
async def open_websocket(
    url: str,
    nursery: trio.Nursery,
    *,
    message_queue_size: int = 64,
    access_token: str | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A client WebSocket whose TCP (or TLS) stream is closed when the block ends.

    Sends the Cloudflare Access headers of `access_headers(access_token)`. A relay (or
    Cloudflare) that refuses them raises `trio_websocket.ConnectionRejected` (403, or 503 while
    the relay cannot check tokens).
    """
    headers = access_headers(access_token)
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
