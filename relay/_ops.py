"""The operations listener: `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1.

A small server of our own: h11 (the sans-I/O HTTP/1.1 state machine that wsproto already
depends on) parses and frames, Trio moves the bytes. It listens on its own address (`ops_host`
/ `ops_port`, default 127.0.0.1:9465), apart from the WebSocket origin, so the public tunnel
never carries it and an orchestrator or Prometheus reaches it on a private interface.

- `GET /healthz` — 200 `ok` while the process serves. It checks nothing else, so a slow
  database never gets a live relay restarted.
- `GET /readyz` — 200 and a JSON body naming every check when all pass; 503 naming the failing
  ones otherwise. Checks: `relay` (the WebSocket listener is up and no shutdown has begun),
  `postgres` (`SELECT 1` through the relay's pool) and, when `BAO_ADDR` is set, `openbao`
  (`sys/health`, no token). Each runs in a worker thread under CHECK_TIMEOUT. The body holds
  check names and words from a fixed list (`ok`, `unreachable`, `timeout`, `sealed`, …), never
  an error text, an address or a credential.
- `GET /metrics` — the Prometheus text format, from the relay's own `CollectorRegistry` (one
  per relay, never the process-global one; relay/_metrics.py). Most values are read at scrape time from the
  actors' `statistics()` snapshots (`RelayCollector`), so the sequencer and fan-out loops pay
  nothing for them; the two histograms are observed once per ledger commit.

Anything else is 404; another method than GET on these paths is 405; a malformed request 400
(431 for an oversized head). One hostile client costs little: a request head is at most
MAX_HEAD_BYTES and may carry no body; each request must have arrived whole within
REQUEST_TIMEOUT of the connection opening or of the previous answer (slowloris), and its answer
must be taken within SEND_TIMEOUT; a connection lives at most CONNECTION_LIFETIME and
MAX_REQUESTS requests; beyond MAX_CONNECTIONS open at once, new ones are closed unanswered.
"""

from __future__ import annotations

import http
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import h11
import hvac
import requests.exceptions
import structlog
import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ledger import LedgerError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ledger import Ledger
    from relay._metrics import RelayMetrics

log = structlog.get_logger("cozy.ops")

MAX_HEAD_BYTES: Final = 8 * 1024
RECEIVE_BYTES: Final = 4096
REQUEST_TIMEOUT: Final = 5.0
SEND_TIMEOUT: Final = 5.0
CONNECTION_LIFETIME: Final = 60.0
MAX_REQUESTS: Final = 100
MAX_CONNECTIONS: Final = 32
CHECK_TIMEOUT: Final = 2.0
LINGER_SECONDS: Final = 1.0
LINGER_BYTES: Final = 64 * 1024

# The words a readiness check may answer; anything but OK fails it.
OK: Final = "ok"
UNREACHABLE: Final = "unreachable"
TIMEOUT: Final = "timeout"
STARTING: Final = "starting"
SHUTTING_DOWN: Final = "shutting_down"
SEALED: Final = "sealed"
NOT_INITIALIZED: Final = "not_initialized"
ERROR: Final = "error"

# OpenBao's sys/health codes that mean "can serve": active (200), standby (429, forwards to
# the active node), performance standby (473).
_BAO_SERVING: Final = frozenset({200, 429, 473})

TEXT: Final = "text/plain; charset=utf-8"
JSON: Final = "application/json"

# --- readiness ------------------------------------------------------------------------------------


class Readiness:
    """The `/readyz` checks. Each check runs in a worker thread of its own limiter, abandoned
    after CHECK_TIMEOUT (a check only reads, so nothing is left half-done); a hung one keeps
    its limiter slot until it returns, so a stuck database costs at most two threads."""

    def __init__(self, ledger: Ledger, bao_addr: str | None, state: Callable[[], str]) -> None:
        self._ledger = ledger
        self._state = state
        # token="" (not None): hvac would otherwise pick up $VAULT_TOKEN or ~/.vault-token and
        # send it with every readiness probe; sys/health needs no token.
        self._bao = (
            None if bao_addr is None else hvac.Client(url=bao_addr, token="", timeout=CHECK_TIMEOUT)
        )
        self._pg_limiter = trio.CapacityLimiter(2)
        self._bao_limiter = trio.CapacityLimiter(2)

    async def check(self) -> dict[str, str]:
        """Every check's word, `relay` first. While starting or shutting down, only `relay`."""
        results = {"relay": self._state()}
        if results["relay"] != OK:
            return results
        checks: dict[str, Callable[[], str]] = {"postgres": self._ping_postgres}
        if self._bao is not None:
            checks["openbao"] = self._bao_health
        async with trio.open_nursery() as nursery:
            for name, fn in checks.items():
                limiter = self._pg_limiter if name == "postgres" else self._bao_limiter
                nursery.start_soon(self._run, results, name, fn, limiter)
        return results

    @staticmethod
    async def _run(
        results: dict[str, str],
        name: str,
        fn: Callable[[], str],
        limiter: trio.CapacityLimiter,
    ) -> None:
        results[name] = TIMEOUT
        with trio.move_on_after(CHECK_TIMEOUT):
            results[name] = await trio.to_thread.run_sync(
                fn, abandon_on_cancel=True, limiter=limiter
            )

    def _ping_postgres(self) -> str:
        try:
            self._ledger.ping(CHECK_TIMEOUT)
        except LedgerError:
            return UNREACHABLE
        return OK

    def _bao_health(self) -> str:
        assert self._bao is not None
        try:
            answer = self._bao.sys.read_health_status(method="GET")
        except requests.exceptions.Timeout:
            return TIMEOUT
        except requests.exceptions.RequestException:
            return UNREACHABLE
        except Exception:  # noqa: BLE001 — any other client failure: not ready, say no more
            return ERROR
        status = 200 if isinstance(answer, dict) else int(getattr(answer, "status_code", 0))
        if status in _BAO_SERVING:
            return OK
        return {503: SEALED, 501: NOT_INITIALIZED}.get(status, ERROR)


# --- the HTTP server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


class OpsApp:
    """Routes a request to its answer; knows nothing of sockets."""

    def __init__(self, readiness: Readiness, metrics: RelayMetrics) -> None:
        self._readiness = readiness
        self._metrics = metrics

    async def answer(self, method: str, target: str) -> Answer:
        path = target.split("?", 1)[0]
        routes: dict[str, Callable[[], Awaitable[Answer]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics_text,
        }
        route = routes.get(path)
        if route is None:
            return Answer(404, b"not found: try /healthz, /readyz or /metrics\n")
        if method != "GET":
            return Answer(405, b"only GET is served here\n", headers=(("allow", "GET"),))
        return await route()

    async def _healthz(self) -> Answer:
        return Answer(200, b"ok\n")

    async def _readyz(self) -> Answer:
        checks = await self._readiness.check()
        failing = [name for name, word in checks.items() if word != OK]
        body: dict[str, object] = {"status": "not_ready" if failing else "ready", "checks": checks}
        if failing:
            body["failing"] = failing
        return Answer(503 if failing else 200, json.dumps(body).encode() + b"\n", JSON)

    async def _metrics_text(self) -> Answer:
        # The classic text format (0.0.4): every Prometheus and agent reads it, and our names
        # need nothing newer.
        return Answer(200, self._metrics.render(), CONTENT_TYPE_PLAIN_0_0_4)


class OpsServer:
    """HTTP/1.1 over Trio for an `OpsApp`, with the bounds in the module docstring."""

    def __init__(self, app: OpsApp) -> None:
        self._app = app
        self._open = 0

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on host:port (0: a free port) and serve until cancelled; `started(port)`.

        Raises OSError when the address cannot be bound.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        if port == 0:  # each listener would have a port of its own: keep one
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        bound = int(listeners[0].socket.getsockname()[1])
        task_status.started(bound)
        await trio.serve_listeners(self._handle, listeners)

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
            log.error("ops_request_failed", error=type(exc).__name__)
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
                    request = await self._read_request(conn, stream)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await self._send(stream, conn, Answer(status, b"bad request\n"), close=True)
                return
            if waited.cancelled_caught:
                return  # too slow (or idle too long between requests): close unanswered
            if request is None:
                return  # the client closed between requests
            if _has_body(request):
                await self._send(
                    stream, conn, Answer(400, b"requests here carry no body\n"), close=True
                )
                return
            method = request.method.decode("ascii", "replace")
            answer = await self._app.answer(method, request.target.decode("ascii", "replace"))
            last = served == MAX_REQUESTS - 1
            await self._send(stream, conn, answer, close=last)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # `Connection: close` on either side, or a request body left unread
            conn.start_next_cycle()

    @staticmethod
    async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
        """The next request, once its head and end have arrived; None on a clean EOF."""
        request: h11.Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
            elif isinstance(event, h11.Request):
                request = event
                if _has_body(event):
                    return event  # refused unread
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None  # (PAUSED cannot come before we answer; handled all the same)

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


async def _linger(stream: trio.SocketStream) -> None:
    """Close our side, then read and drop what the client still sends (for at most LINGER
    seconds and bytes), so a request we refused unread does not turn the close into a reset
    that destroys our answer before the client read it."""
    with trio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_eof()
            dropped = 0
            while dropped < LINGER_BYTES and (chunk := await stream.receive_some(RECEIVE_BYTES)):
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


def ops_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
