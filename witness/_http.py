"""`POST /add-checkpoint` (C2SP tlog-witness) over HTTP/1.1: httpserve (shared with the relay's
ops listener) parses, frames and bounds with h11 and Trio, `WitnessStore.add_checkpoint`
decides and persists in a worker thread.

Only the one route exists: `POST /add-checkpoint` (anything else under that path is 405, any
other path 404). There is no authentication beyond the log's signature on the checkpoint, as
the spec says; the bounds below keep a hostile client cheap:

- a request head is at most 8 KiB (431 beyond) and a body at most 64 KiB (413: 63 proof
  lines and a checkpoint with a hundred signatures fit in well under that);
- each request must arrive whole within 10 s of the connection opening or of the previous
  answer (slowloris), an answer must be taken within 10 s, a connection lives at most 120 s and
  1000 requests (keep-alive, as the spec recommends);
- beyond 64 connections open at once, new ones are closed unanswered;
- decisions run one at a time (they share one SQLite transaction lock), each a few hundred
  microseconds: Ed25519 verification, at most 63 hashes, one fsync'd commit.

A 200 is sent only after the new checkpoint is committed. If the commit fails the answer is
503 and nothing was cosigned.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Final

import structlog
import trio

from httpserve import Answer, HttpServer, Limits, Request
from model.note import parse_note

if TYPE_CHECKING:
    from witness._logs import TrustedLogs
    from witness._state import WitnessStore

log = structlog.get_logger("cozy.witness")

PATH: Final = "/add-checkpoint"
# Keep-alive, as the spec recommends, but bounded; see the module docstring.
LIMITS: Final = Limits(
    max_connections=64,
    connection_lifetime=120.0,
    request_timeout=10.0,
    send_timeout=10.0,
    max_requests=1000,
    max_body_bytes=64 * 1024,
    receive_bytes=16 * 1024,
)


class WitnessServer:
    """Serves one `WitnessStore` for the logs in `logs`. `statistics()` counts answers."""

    def __init__(self, store: WitnessStore, logs: TrustedLogs) -> None:
        self._store = store
        self._logs = logs
        self._limiter = trio.CapacityLimiter(1)
        self._http = HttpServer(
            self._answer,
            lambda: LIMITS,
            logger="cozy.witness",
            failed_event="witness_request_failed",
        )
        self.answered: dict[int, int] = {}

    def statistics(self) -> dict[str, object]:
        return {"open_connections": self._http.open_connections, "answered": dict(self.answered)}

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
        await self._http.serve_listeners([listener])

    async def _answer(self, request: Request) -> Answer:
        body = request.body
        if request.path != PATH:
            return Answer(404, b"not found: this witness serves POST /add-checkpoint\n")
        if request.method != "POST":
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


def _what(body: bytes, status: int) -> dict[str, object]:
    """The origin and size of an accepted checkpoint, for the log (a refusal logs its status
    only: its bytes are whatever a client sent, and are never echoed)."""
    if status != 200:
        return {}
    note = parse_note(body.partition(b"\n\n")[2])
    origin, size = note.text.split("\n")[:2]
    return {"origin": origin, "size": int(size)}


async def open_listener(host: str, port: int) -> trio.SocketListener:
    """One listener on host:port (0: a free port). Raises OSError (in use, unknown host)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    for extra in listeners[1:]:  # one address family is enough, and one port to print
        await extra.aclose()
    return listeners[0]


def bound_address(listener: trio.SocketListener) -> tuple[str, int]:
    bound = listener.socket.getsockname()
    return str(bound[0]), int(bound[1])
