"""`POST /add-checkpoint` (C2SP tlog-witness) over HTTP/1.1: h11 parses and frames, Trio moves
the bytes, `WitnessStore.add_checkpoint` decides and persists in a worker thread.

Only the one route exists: `POST /add-checkpoint` (anything else under that path is 405, any
other path 404). There is no authentication beyond the log's signature on the checkpoint, as
the spec says; the bounds below keep a hostile client cheap:

- a request head is at most MAX_HEAD_BYTES (431 beyond) and a body at most MAX_BODY_BYTES (413:
  63 proof lines and a checkpoint with a hundred signatures fit in well under that);
- each request must arrive whole within REQUEST_TIMEOUT of the connection opening or of the
  previous answer (slowloris), an answer must be taken within SEND_TIMEOUT, a connection lives
  at most CONNECTION_LIFETIME and MAX_REQUESTS requests (keep-alive, as the spec recommends);
- beyond MAX_CONNECTIONS open at once, new connections are closed unanswered;
- decisions run one at a time (they share one SQLite transaction lock), each a few hundred
  microseconds: Ed25519 verification, at most 63 hashes, one fsync'd commit.

A 200 is sent only after the new checkpoint is committed. If the commit fails the answer is
503 and nothing was cosigned.
"""

from __future__ import annotations

import http
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import h11
import structlog
import trio

from model.note import parse_note

if TYPE_CHECKING:
    from witness._logs import TrustedLogs
    from witness._state import WitnessStore

log = structlog.get_logger("cozy.witness")

PATH: Final = "/add-checkpoint"
MAX_HEAD_BYTES: Final = 8 * 1024
MAX_BODY_BYTES: Final = 64 * 1024
RECEIVE_BYTES: Final = 16 * 1024
REQUEST_TIMEOUT: Final = 10.0
SEND_TIMEOUT: Final = 10.0
CONNECTION_LIFETIME: Final = 120.0
MAX_REQUESTS: Final = 1000
MAX_CONNECTIONS: Final = 64
LINGER_SECONDS: Final = 1.0
LINGER_BYTES: Final = 64 * 1024
TEXT: Final = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


class _TooLarge(Exception):
    pass


class WitnessServer:
    """Serves one `WitnessStore` for the logs in `logs`. `statistics()` counts answers."""

    def __init__(self, store: WitnessStore, logs: TrustedLogs) -> None:
        self._store = store
        self._logs = logs
        self._open = 0
        self._limiter = trio.CapacityLimiter(1)
        self.answered: dict[int, int] = {}

    def statistics(self) -> dict[str, object]:
        return {"open_connections": self._open, "answered": dict(self.answered)}

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port (0: a free port), `started((host, port))`, serve until cancelled.

        Raises OSError when the address cannot be bound.
        """
        listener = await open_listener(host, port)
        task_status.started(bound_address(listener))
        await self.serve_listener(listener)

    async def serve_listener(self, listener: trio.SocketListener) -> None:
        """Serve on an open listener until cancelled (closing it then)."""
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._open >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        try:
            with trio.move_on_after(CONNECTION_LIFETIME):
                await self._exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception as exc:  # noqa: BLE001 — one request's failure stays on its connection
            log.error("witness_request_failed", error=type(exc).__name__)
        finally:
            try:
                await _linger(stream)
            finally:
                self._open -= 1
                await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        for served in range(MAX_REQUESTS):
            try:
                with trio.move_on_after(REQUEST_TIMEOUT) as waited:
                    got = await _read_request(conn, stream)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    answer = Answer(exc.error_status_hint, b"malformed HTTP request\n")
                    await self._send(stream, conn, answer, close=True)
                return
            except _TooLarge:
                answer = Answer(413, f"a request body is at most {MAX_BODY_BYTES} bytes\n".encode())
                await self._send(stream, conn, answer, close=True)
                return
            if waited.cancelled_caught or got is None:
                return  # too slow, idle too long, or closed between requests
            request, body = got
            answer = await self._answer(request, body)
            await self._send(stream, conn, answer, close=served == MAX_REQUESTS - 1)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _answer(self, request: h11.Request, body: bytes) -> Answer:
        target = request.target.decode("ascii", "replace").split("?", 1)[0]
        if target != PATH:
            return Answer(404, b"not found: this witness serves POST /add-checkpoint\n")
        if request.method != b"POST":
            return Answer(405, b"add-checkpoint is a POST\n", headers=(("allow", "POST"),))
        now = int(time.time())
        try:
            reply = await trio.to_thread.run_sync(
                lambda: self._store.add_checkpoint(body, logs=self._logs, now=now),
                limiter=self._limiter,
            )
        except sqlite3.Error as exc:
            log.error("witness_state_write_failed", error=type(exc).__name__)
            return Answer(503, b"the witness could not record its state; nothing was cosigned\n")
        self.answered[reply.status] = self.answered.get(reply.status, 0) + 1
        log.info("add_checkpoint", status=reply.status, **_what(body, reply.status))
        return Answer(reply.status, reply.body, reply.content_type)

    @staticmethod
    async def _send(
        stream: trio.SocketStream, conn: h11.Connection, answer: Answer, *, close: bool
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
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(data)


def _what(body: bytes, status: int) -> dict[str, object]:
    """The origin and size of an accepted checkpoint, for the log (a refusal logs its status
    only: its bytes are whatever a client sent, and are never echoed)."""
    if status != 200:
        return {}
    note = parse_note(body.partition(b"\n\n")[2])
    origin, size = note.text.split("\n")[:2]
    return {"origin": origin, "size": int(size)}


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body, once whole; None on a clean EOF. Raises `_TooLarge`."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
        elif isinstance(event, h11.Request):
            request = event
            for name, value in event.headers:
                if name == b"content-length" and int(value) > MAX_BODY_BYTES:
                    raise _TooLarge
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _linger(stream: trio.SocketStream) -> None:
    """Close our side, then read and drop what the client still sends (bounded), so a request
    refused unread does not turn the close into a reset that destroys our answer."""
    with trio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_eof()
            dropped = 0
            while dropped < LINGER_BYTES and (chunk := await stream.receive_some(RECEIVE_BYTES)):
                dropped += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def open_listener(host: str, port: int) -> trio.SocketListener:
    """One listener on host:port (0: a free port). Raises OSError (in use, unknown host)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    for extra in listeners[1:]:  # one address family is enough, and one port to print
        await extra.aclose()
    return listeners[0]


def bound_address(listener: trio.SocketListener) -> tuple[str, int]:
    bound = listener.socket.getsockname()
    return str(bound[0]), int(bound[1])


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
