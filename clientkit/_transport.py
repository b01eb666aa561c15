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
(tests/test_house.py checks the source tree; the relay serves WebSocket with its own wsproto
server, relay/_wsraw.py): it hands `wrap_client_stream` a stand-in nursery, trusting that the
library only ever calls `start_soon` on it, to start its reader task. A version that called
anything else would fail every connect with an AttributeError, never misbehave quietly;
CHECKED_VERSIONS names the releases this was read against (tests/test_house.py pins the
installed one, tests/test_client_close.py the handshake).

A mistyped URL must not cost a person a traceback or a long wait: `check_relay_url` names the
URL to use instead, a relay that does not answer in time raises `RelayUnreachable`, and a
`wss://` URL for a relay that speaks plain WebSocket (the relay itself never speaks TLS: TLS
ends at the edge in front of it, docs/deploy/) is found out within about a second by a plain
upgrade on a second connection while the TLS handshake hangs (`_open_tls_stream`).
"""

from __future__ import annotations

import base64
import collections
import os
import secrets
import ssl
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

import trio
import trio_websocket

from clientkit.errors import ClientError, RelayUnreachable
from model import wire

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

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


# A TLS handshake that has not finished after this long is checked for a relay that speaks
# plain WebSocket on that port (the answer to a ClientHello it never gives).
TLS_PROBE_AFTER: Final = 1.0
# How long that check waits for the plain upgrade's answer.
PLAIN_PROBE_TIMEOUT: Final = 3.0


class BadRelayUrl(ClientError, ValueError):
    """The relay URL is not ws://host:port/… or wss://host:port/… (or names TLS that the relay
    does not speak); the message names the URL to use."""


def check_relay_url(url: str) -> str:
    """`url` if it is a relay URL (ws:// or wss:// with a host), else `BadRelayUrl` saying
    which URL was probably meant. No I/O: callers check before doing slow work (sealing a
    keystore) that would be wasted on a typo."""
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss") and parts.hostname:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        guess = f"ws://{url}"
    elif scheme.lower() in ("http", "https"):
        guess = f"{'wss' if scheme.lower() == 'https' else 'ws'}://{rest}"
    else:
        guess = "ws://HOST:PORT"
    raise BadRelayUrl(
        f"{url!r} is not a relay URL: use {guess} (relay URLs start with ws://, or wss:// for"
        " a relay behind TLS)"
    )


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
    parts = urlsplit(check_relay_url(url))
    assert parts.hostname is not None  # checked
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with _timed_out_as_unreachable(url):
        stream: trio.abc.Stream
        if parts.scheme == "wss":
            stream = await _open_tls_stream(parts.hostname, port, resource, url)
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


@contextmanager
def _timed_out_as_unreachable(url: str) -> Iterator[None]:
    """`trio.fail_after(CONNECT_TIMEOUT)`, its timeout raised as `RelayUnreachable`."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            yield
    except trio.TooSlowError:
        raise RelayUnreachable(
            f"the relay at {url} did not answer within {CONNECT_TIMEOUT:g} s: check the URL"
            " and that the relay is running"
        ) from None


async def _open_tls_stream(host: str, port: int, resource: str, url: str) -> trio.SSLStream[Any]:
    """A TLS stream whose handshake is done, or a one-line reason why there is none.

    A relay speaking plain WebSocket never answers a ClientHello (its HTTP parser waits for the
    end of a request line that never comes), so a handshake still pending after
    TLS_PROBE_AFTER, or one that failed, is checked with a plain upgrade on a second connection:
    if that is accepted, the URL should have said ws://.
    """
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=host)
    plain = False
    failed: ssl.SSLError | trio.BrokenResourceError | None = None
    try:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal plain
                await trio.sleep(TLS_PROBE_AFTER)
                plain = await _speaks_plain_websocket(host, port, resource)
                if plain:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await tls.do_handshake()
            except (ssl.SSLError, trio.BrokenResourceError) as exc:
                failed = exc
            nursery.cancel_scope.cancel()
        if failed is not None and not plain:
            plain = await _speaks_plain_websocket(host, port, resource)
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    if plain:
        await trio.aclose_forcefully(tls)
        raise BadRelayUrl(
            f"the relay at {url} does not speak TLS; use ws://{url.partition('://')[2]}"
        )
    if failed is not None:
        await trio.aclose_forcefully(tls)
        reason = failed.__cause__ or failed  # trio wraps the ssl module's error
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise RelayUnreachable(
                f"the TLS certificate of {host}:{port} does not verify"
                f" ({reason.verify_message}): check the URL"
            ) from None
        raise RelayUnreachable(
            f"the TLS handshake with {host}:{port} failed ({_one_line(reason)}): check the URL"
        ) from None
    return tls


async def _speaks_plain_websocket(host: str, port: int, resource: str) -> bool:
    """Whether `host:port` accepts a WebSocket upgrade without TLS (answers 101). A TLS server
    never does; an error or silence counts as no."""
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    request = (
        f"GET {resource} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = b""
    with trio.move_on_after(PLAIN_PROBE_TIMEOUT):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        try:
            await stream.send_all(request.encode())
            while len(answer) < 12 and (more := await stream.receive_some(64)):
                answer += more
        except (OSError, trio.BrokenResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
    return answer.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
