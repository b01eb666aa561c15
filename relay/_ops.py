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
  per relay, never the process-global one). Most values are read at scrape time from the
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

import collections
import http
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import h11
import hvac
import prometheus_client
import requests.exceptions
import structlog
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from ledger import LedgerError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping

    from fanout import FanoutStats
    from ledger import Ledger
    from relay._server import RelayStats
    from relay._writer import WriterStats

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

# Events per group-commit transaction: one busy collab sends up to 256 per batch, the writer
# takes up to 4096 per transaction.
COMMIT_EVENT_BUCKETS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 4096)
COMMIT_SECONDS_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


# --- counters the relay bumps -------------------------------------------------------------------


@dataclass
class AuthCounters:
    """Refused logins and tokens, by reason, and lockouts begun. O(1) per refusal.

    Reasons: `invalid_credentials` (wrong password or unknown handle: deliberately one reason,
    as the answer is one), `locked_out` (refused unverified while the handle is locked),
    `expired_token`, `invalid_token`, `revoked_token`.
    """

    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    lockouts: int = 0

    def failed(self, reason: str, *, locked: bool = False) -> None:
        """Count one refusal; `locked` when this failure put the handle under a lock."""
        self.failures[reason] += 1
        if locked:
            self.lockouts += 1


class AccessCounters(Protocol):
    """What the Cloudflare Access gate's `statistics()` offers (relay/_cf_access.py)."""

    @property
    def verified(self) -> int: ...
    @property
    def jwks_fetches(self) -> int: ...
    @property
    def jwks_fetch_failures(self) -> int: ...
    @property
    def refused_by_reason(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class MetricSources:
    """Where `RelayCollector` reads at scrape time: each a cheap snapshot on the Trio loop."""

    relay: Callable[[], RelayStats]
    writer: Callable[[], WriterStats | None]
    auth: AuthCounters
    # The Cloudflare Access gate, when one is configured (None: no cf_access metrics).
    cf_access: Callable[[], AccessCounters | None]


# --- metrics --------------------------------------------------------------------------------------


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class RelayCollector(Collector):
    """Turns the actors' `statistics()` snapshots into metric families at scrape time."""

    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self._sources
        relay = s.relay()
        yield _gauge("cozy_connections", "Open WebSocket connections.", relay.connections)
        yield _counter(
            "cozy_connections_accepted",
            "WebSocket connections accepted since start.",
            relay.accepted_total,
        )
        yield _counter(
            "cozy_connection_limit_refusals",
            "Connections refused because the relay held its maximum.",
            relay.connection_limit_refusals,
        )
        yield _gauge(
            "cozy_outbox_queued_frames",
            "Frames queued in all connections' outboxes, not yet written to their sockets.",
            relay.outbox_frames,
        )
        yield _gauge(
            "cozy_outbox_queued_bytes",
            "Bytes queued in all connections' outboxes.",
            relay.outbox_bytes,
        )
        yield _gauge(
            "cozy_outbox_queued_frames_max",
            "The fullest connection outbox, in frames: a subscriber this far behind is cut as"
            " lagging when its outbox fills.",
            relay.outbox_frames_max,
        )
        yield _gauge(
            "cozy_appends_in_flight",
            "Appends received and not yet acknowledged or refused.",
            relay.appends_in_flight,
        )
        yield _counter(
            "cozy_overloaded_refusals",
            "Requests refused with `overloaded` because a bound was reached.",
            relay.overloaded_total,
        )
        writer = s.writer()
        if writer is not None:
            yield _counter(
                "cozy_events_appended",
                "Events newly written to the ledger (retried duplicates not counted).",
                writer.events - writer.duplicates,
            )
            yield _counter(
                "cozy_append_duplicates",
                "Retried appends answered with the seq they already had.",
                writer.duplicates,
            )
            yield _counter(
                "cozy_ledger_commits", "Group-commit transactions committed.", writer.transactions
            )
            yield _counter(
                "cozy_ledger_commit_failures",
                "Group-commit transactions that failed; nothing of them was written.",
                writer.failed_transactions,
            )
            yield _counter(
                "cozy_ledger_stalled_groups",
                "Group commits the writer stopped waiting for after writer_stall_ms (a commit in"
                " doubt); later groups were written beside them.",
                writer.stalled_groups,
            )
        fan = relay.fanout
        if fan is not None:
            yield from _fanout_metrics(fan)
        yield _counter(
            "cozy_sequencer_failures",
            "Sequencer actors that failed with an unexpected exception and were dropped (their"
            " appends refused with `overloaded`; the collab's next append starts a fresh one).",
            relay.sequencer_failures,
        )
        actors = relay.sequencers
        yield _gauge(
            "cozy_sequencers", "Active sequencer actors (one per busy collab).", len(actors)
        )
        yield _gauge(
            "cozy_sequencer_inbox_submissions",
            "Appends waiting in sequencer inboxes.",
            sum(a.inbox for a in actors),
        )
        auth = CounterMetricFamily(
            "cozy_auth_failures", "Refused logins and session tokens, by reason.", labels=["reason"]
        )
        for reason, count in sorted(s.auth.failures.items()):
            auth.add_metric([reason], count)
        yield auth
        yield _counter(
            "cozy_lockouts",
            "Login lockouts begun (a failure that put its handle under a lock).",
            s.auth.lockouts,
        )
        access = s.cf_access()
        if access is not None:
            yield from _access_metrics(access)


def _fanout_metrics(fan: FanoutStats) -> Iterator[Metric]:
    subs = GaugeMetricFamily(
        "cozy_subscriptions",
        "Following subscriptions, by state (catching up from the ledger, or live).",
        labels=["state"],
    )
    subs.add_metric(["live"], fan.live_subscriptions)
    subs.add_metric(["catching_up"], fan.subscriptions - fan.live_subscriptions)
    yield subs
    yield _counter(
        "cozy_fanout_published_events",
        "Committed events handed to the fan-out.",
        fan.published_events,
    )
    yield _counter(
        "cozy_fanout_deliveries", "Live event frames queued to subscribers.", fan.deliveries
    )
    yield _counter(
        "cozy_subscriber_lag_disconnects",
        "Subscribers disconnected for lagging (they resume from the ledger).",
        fan.lagging_disconnects,
    )
    yield GaugeMetricFamily(
        "cozy_catchups", "Catch-ups from the ledger running now (capped).", value=fan.catchups
    )
    yield _counter(
        "cozy_catchup_refusals",
        "Subscribes refused with `overloaded` because a catch-up cap was reached.",
        fan.catchup_refusals,
    )
    yield _counter(
        "cozy_catchup_stalls",
        "Catch-ups disconnected after finding no room in their outbox for the stall time.",
        fan.catchup_stalls,
    )


def _access_metrics(access: AccessCounters) -> Iterator[Metric]:
    yield _counter(
        "cozy_cf_access_verified",
        "WebSocket upgrades whose Cloudflare Access token verified.",
        access.verified,
    )
    refused = CounterMetricFamily(
        "cozy_cf_access_refused",
        "WebSocket upgrades refused by the Cloudflare Access check, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted(access.refused_by_reason.items()):
        refused.add_metric([reason], count)
    yield refused
    yield _counter(
        "cozy_cf_access_jwks_fetches", "Fetches of the Access signing keys.", access.jwks_fetches
    )
    yield _counter(
        "cozy_cf_access_jwks_fetch_failures",
        "Failed fetches of the Access signing keys.",
        access.jwks_fetch_failures,
    )


class RelayMetrics:
    """One relay's registry: its collector and the two commit histograms.

    A registry per relay (never `prometheus_client.REGISTRY`), so several relays in one process
    — tests — each report their own numbers.
    """

    def __init__(self, sources: MetricSources) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(RelayCollector(sources))
        self._commit_events = prometheus_client.Histogram(
            "cozy_ledger_commit_events",
            "Events written per group-commit transaction.",
            buckets=COMMIT_EVENT_BUCKETS,
            registry=self.registry,
        )
        self._commit_seconds = prometheus_client.Histogram(
            "cozy_ledger_commit_seconds",
            "Time of one group-commit transaction (assign, COPY, commit), in seconds.",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=self.registry,
        )

    def observe_commit(self, events: int, seconds: float) -> None:
        """Called by the LedgerWriter's thread after each commit (prometheus_client locks)."""
        self._commit_events.observe(events)
        self._commit_seconds.observe(seconds)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


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
