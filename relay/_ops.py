"""The operations listener: `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1.

A small server of our own (httpserve, shared with `cozy witness`: h11 parses and frames, Trio
moves the bytes). It listens on its own address (`ops_host` / `ops_port`, default
127.0.0.1:9465), apart from the WebSocket origin, so the public tunnel never carries it and an
orchestrator or Prometheus reaches it on a private interface.

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

- `GET /debug/stages` — only while stage times are on (`COZY_STAGE_TIMES=1`, a bench
  diagnostic): the per-event stage stamps collected since the last call, as JSON, then cleared
  (relay/_stages.py). Off, the path is 404 like any other.

Anything else is 404; another method than GET on these paths is 405; a malformed request 400
(431 for an oversized head). One hostile client costs little: a request head is at most 8 KiB
and may carry no body; each request must have arrived whole within REQUEST_TIMEOUT of the
connection opening or of the previous answer (slowloris), and its answer must be taken within
SEND_TIMEOUT; a connection lives at most CONNECTION_LIFETIME and MAX_REQUESTS requests; beyond
MAX_CONNECTIONS open at once, new ones are closed unanswered.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

import hvac
import msgspec
import requests.exceptions
import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from httpserve import Answer, HttpServer, Limits, Request, url_of
from ledger import LedgerError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ledger import Ledger
    from relay._metrics import RelayMetrics
    from relay._stages import StageRecorder

REQUEST_TIMEOUT: Final = 5.0
SEND_TIMEOUT: Final = 5.0
CONNECTION_LIFETIME: Final = 60.0
MAX_REQUESTS: Final = 100
MAX_CONNECTIONS: Final = 32
CHECK_TIMEOUT: Final = 2.0

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


def limits() -> Limits:
    """The bounds above (and httpserve's: heads of 8 KiB at most, a bounded linger), read as each
    connection opens (so a test may shorten one)."""
    return Limits(
        max_connections=MAX_CONNECTIONS,
        connection_lifetime=CONNECTION_LIFETIME,
        request_timeout=REQUEST_TIMEOUT,
        send_timeout=SEND_TIMEOUT,
        max_requests=MAX_REQUESTS,
        max_body_bytes=0,  # a request here may carry no body: 400, refused unread
    )


class OpsApp:
    """Routes a request to its answer; knows nothing of sockets."""

    def __init__(
        self, readiness: Readiness, metrics: RelayMetrics, stages: StageRecorder | None = None
    ) -> None:
        self._readiness = readiness
        self._metrics = metrics
        self._stages = stages

    async def answer(self, request: Request) -> Answer:
        routes: dict[str, Callable[[], Awaitable[Answer]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics_text,
        }
        if self._stages is not None:
            routes["/debug/stages"] = self._stage_times
        route = routes.get(request.path)
        if route is None:
            return Answer(404, b"not found: try /healthz, /readyz or /metrics\n")
        if request.method != "GET":
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

    async def _stage_times(self) -> Answer:
        # Taken and cleared: each bench run reads only its own events (relay/_stages.py).
        assert self._stages is not None
        return Answer(200, msgspec.json.encode(self._stages.take()), JSON)

    async def _metrics_text(self) -> Answer:
        # The classic text format (0.0.4): every Prometheus and agent reads it, and our names
        # need nothing newer.
        return Answer(200, self._metrics.render(), CONTENT_TYPE_PLAIN_0_0_4)


class OpsServer:
    """HTTP/1.1 over Trio for an `OpsApp` (httpserve), with the bounds in the module docstring."""

    def __init__(self, app: OpsApp) -> None:
        self._http = HttpServer(
            app.answer,
            limits,
            logger="cozy.ops",
            failed_event="ops_request_failed",
            malformed=b"bad request\n",
        )

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
        await self._http.serve_listeners(listeners)


ops_url: Final = url_of
