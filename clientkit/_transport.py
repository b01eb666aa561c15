"""Opening a WebSocket to a relay, owning the TCP stream so it is always closed.

trio-websocket leaves the underlying stream open on the client side when the server closes
first (it waits for a TCP close that already happened), so we open the stream ourselves, hand
it to `wrap_client_stream`, and close it when the connection's scope ends.

The close handshake needs trio-websocket's reader task: `aclose` sends the close frame and then
waits for the reader to see the relay's answer. A caller cancelled from outside (a timeout, a
bot being stopped, a nursery cancelled with the connection still open) would cancel that reader
too, and every close would then sit out its whole timeout. So the reader runs under a shield of
its own that only this module lifts, after the handshake or its bound.

That shield is the client's one reliance on trio-websocket's internals, and it lives only here
(tests/test_house.py checks the source tree; the relay's are in relay/_wsraw.py): it hands
`wrap_client_stream` a stand-in nursery, trusting that the library only ever calls `start_soon`
on it, to start its reader task. A version that called anything else would fail every connect
with an AttributeError, never misbehave quietly; CHECKED_VERSIONS names the releases this was
read against (tests/test_house.py pins the installed one, tests/test_client_close.py the
handshake).
"""

from __future__ import annotations

import collections
import os
import ssl
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

import trio
import trio_websocket

from model import wire

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

# The trio-websocket releases whose `wrap_client_stream` was checked to use only
# `nursery.start_soon` (see `_ShieldedReader`).
CHECKED_VERSIONS: Final = ("0.12.2",)
CONNECT_TIMEOUT: Final = 10.0
# How long a close may wait for the relay's answering close frame: on loopback it takes about a
# millisecond; a relay that never answers (stalled, gone, a black-holed network) costs this much.
CLOSE_TIMEOUT: Final = 2.0
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


class _ShieldedReader:
    """Stands in for the nursery `wrap_client_stream` starts its reader task in.

    Runs the task in the caller's nursery under a shielded cancel scope, so cancelling the
    caller does not end the reader before the close handshake is done; `stop` ends it.
    `wrap_client_stream` only ever calls `start_soon` on its nursery.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._scope = trio.CancelScope(shield=True)

    def start_soon(
        self, fn: Callable[..., Awaitable[object]], *args: Any, name: object = None
    ) -> None:
        async def shielded() -> None:
            with self._scope:
                await fn(*args)

        self._nursery.start_soon(shielded, name=name or fn)

    def stop(self) -> None:
        self._scope.cancel()


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

    Closing sends close code 1000 and waits for the relay's answering close frame, also when the
    caller was cancelled, for at most CLOSE_TIMEOUT seconds; then the stream is closed either
    way. The reader task runs in `nursery` until then.
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
        reader = _ShieldedReader(nursery)
        try:
            ws = await trio_websocket.wrap_client_stream(
                cast("trio.Nursery", reader),
                stream,
                parts.hostname,
                resource,
                message_queue_size=message_queue_size,
                max_message_size=wire.WS_HARD_LIMIT,
                extra_headers=headers,
            )
        except BaseException:
            reader.stop()
            await trio.aclose_forcefully(stream)
            raise
    try:
        yield ws
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await ws.aclose()
        reader.stop()
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
