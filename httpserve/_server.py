"""One h11 connection loop with the bounds that keep a hostile client cheap (`Limits`):

- a request head is at most `max_head_bytes` (431 beyond) and a body at most `max_body_bytes`
  (413 beyond; with 0, a request that carries a body at all is refused unread with 400);
- each request must arrive whole within `request_timeout` of the connection opening or of the
  previous answer (slowloris: closed unanswered), an answer must be taken within
  `send_timeout`, a connection lives at most `connection_lifetime` and `max_requests` requests;
- beyond `max_connections` open at once, new connections are closed unanswered;
- on close we linger (bounded) so that a request refused unread does not turn the close into a
  reset that destroys our answer before the client read it.

A failure inside one exchange stays on its connection: it is logged by type only (its text may
quote what a client sent) under the event name the server was given, and the connection closed.
"""

from __future__ import annotations

import http
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import h11
import structlog
import trio

TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Limits:
    """What one server allows; the defaults are what the ops listener and the witness share."""

    max_connections: int
    connection_lifetime: float
    request_timeout: float
    send_timeout: float
    max_requests: int
    max_head_bytes: int = 8 * 1024
    max_body_bytes: int = 0
    receive_bytes: int = 4096
    linger_seconds: float = 1.0
    linger_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Answer]]


class _Refused(Exception):
    """A request body we will not read: its answer is sent, then the connection closed."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer


class HttpServer:
    """Serves `handler` over every connection given to `handle` (e.g. by trio.serve_listeners)."""

    def __init__(
        self,
        handler: Handler,
        limits: Callable[[], Limits],
        *,
        logger: str,
        failed_event: str,
        malformed: bytes = b"malformed HTTP request\n",
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._log = structlog.get_logger(logger)
        self._failed_event = failed_event
        self._malformed = malformed
        self.open_connections = 0

    async def serve_listeners(self, listeners: list[trio.SocketListener]) -> None:
        """Serve until cancelled (closing the listeners then)."""
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        limits = self._limits()  # read as each connection opens
        if self.open_connections >= limits.max_connections:
            await trio.aclose_forcefully(stream)
            return
        self.open_connections += 1
        try:
            with trio.move_on_after(limits.connection_lifetime):
                await self._exchange(stream, limits)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception as exc:  # noqa: BLE001 — one request's failure stays on its connection
            self._log.error(self._failed_event, error=type(exc).__name__)
        finally:
            try:
                await _linger(stream, limits)
            finally:
                self.open_connections -= 1
                await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, limits: Limits) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        for served in range(limits.max_requests):
            try:
                with trio.move_on_after(limits.request_timeout) as waited:
                    request = await _read_request(conn, stream, limits)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    answer = Answer(exc.error_status_hint, self._malformed)
                    await _send(stream, conn, answer, limits, close=True)
                return
            except _Refused as refused:
                await _send(stream, conn, refused.answer, limits, close=True)
                return
            if waited.cancelled_caught or request is None:
                return  # too slow, idle too long, or closed between requests: unanswered
            answer = await self._handler(request)
            last = served == limits.max_requests - 1
            await _send(stream, conn, answer, limits, close=last)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # `Connection: close` on either side
            conn.start_next_cycle()


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream, limits: Limits
) -> Request | None:
    """The next request and its body, once whole; None on a clean EOF. Raises `_Refused`."""
    most = limits.max_body_bytes
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(limits.receive_bytes))
        elif isinstance(event, h11.Request):
            head = event
            if most == 0 and _has_body(event):
                raise _Refused(Answer(400, b"requests here carry no body\n"))
            for name, value in event.headers:
                if name == b"content-length" and int(value) > most:
                    raise _Refused(_too_large(most))
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > most:
                raise _Refused(_too_large(most))
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return Request(
                head.method.decode("ascii", "replace"),
                head.target.decode("ascii", "replace"),
                bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None  # (PAUSED cannot come before we answer; handled all the same)


async def _send(
    stream: trio.SocketStream, conn: h11.Connection, answer: Answer, limits: Limits, *, close: bool
) -> None:
    headers = [
        ("content-type", answer.content_type),
        ("content-length", str(len(answer.body))),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
        *answer.headers,
    ]
    if close:
        headers.append(("connection", "close"))
    data = conn.send(
        h11.Response(
            status_code=answer.status,
            headers=headers,
            reason=http.HTTPStatus(answer.status).phrase.encode(),
        )
    )
    data = (data or b"") + (conn.send(h11.Data(data=answer.body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    with trio.move_on_after(limits.send_timeout):
        await stream.send_all(data)


async def _linger(stream: trio.SocketStream, limits: Limits) -> None:
    """Close our side, then read and drop what the client still sends (bounded)."""
    with trio.move_on_after(limits.linger_seconds):
        try:
            await stream.send_eof()
            dropped = 0
            while dropped < limits.linger_bytes and (
                chunk := await stream.receive_some(limits.receive_bytes)
            ):
                dropped += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and value.strip() != b"0":
            return True
    return False


def _too_large(most: int) -> Answer:
    return Answer(413, f"a request body is at most {most} bytes\n".encode())


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
