"""The relay daemon: WebSocket endpoint, request dispatch, and the structured shutdown.

Nursery layout (outermost first) — the order is the shutdown order, reversed:

    ops nursery                the operations listener (relay/_ops.py: /healthz, /readyz,
                               /metrics) on its own port: up before the WebSocket listener,
                               down after the last connection closed
      connections nursery      every client connection (reader, writer, subscriptions)
        sequencers nursery     one actor per active collab
          accept nursery       the listening socket

Shutdown: cancel the accept nursery (stop accepting), close the sequencer inboxes and wait for
the actors to drain (in-flight appends are committed and acked), stop the ledger writer, then
close every connection
gracefully with code 1001 and a reason. `/readyz` answers 503 from the moment shutdown begins
(and until the WebSocket listener is up), so a load balancer stops sending clients first.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final

import structlog
import trio
from trio_websocket import ConnectionClosed

from fanout import Fanout, FanoutStats
from model import wire
from model.checkpoints import CheckpointSigner
from model.envelope import MAX_BODY_BYTES
from relay import _stages
from relay._accounts import Accounts
from relay._artifacts import Artifacts
from relay._cf_access import AccessDenied, AccessVerifier
from relay._checkpoints import CollabTrees
from relay._collabs import Collabs
from relay._connection import Connection
from relay._context import Services, where
from relay._dispatch import Dispatcher
from relay._metrics import AuthCounters, MetricSources, RelayMetrics
from relay._ops import OK, SHUTTING_DOWN, STARTING, OpsApp, OpsServer, Readiness, ops_url
from relay._registry import SequencerRegistry
from relay._sessions import Sessions
from relay._subscriptions import Subscriptions
from relay._throttle import caller_key
from relay._uploads import Housekeeping
from relay._witnessing import Witnessing
from relay._writer import LedgerWriter
from relay._wsraw import WebSocketServer
from relay.broker import Broker, SecretStore
from relay.config import bao_auth

if TYPE_CHECKING:
    import nacl.signing

    from fanout import Subscription
    from ledger import FramePage, Ledger
    from relay._cf_access import AccessIdentity
    from relay._sequencer import SequencerStats
    from relay._wsraw import UpgradeRequest
    from relay.config import RelayConfig

log = structlog.get_logger("cozy.relay")

SHUTDOWN_CLOSE_CODE: Final = wire.CloseCode.GOING_AWAY
SHUTDOWN_GRACE: Final = 5.0
HANDSHAKE_TIMEOUT: Final = 10.0
# Bytes asked of the socket per read (trio-websocket's default is 4 KiB): a 32-append batch of
# 4 KiB events is ~135 KiB, so this is ~4 reads and wsproto feeds per message instead of ~33.
# The buffer exists only while a read returns data, so idle connections do not pay for it.
RECEIVE_BUFFER: Final = 64 * 1024


@dataclass
class RelayStats:
    """A snapshot of what the relay holds, for metrics and the overload tests: every queue
    here is bounded (docs/protocol.md, "Limits")."""

    connections: int
    accepted_total: int
    sequencers: list[SequencerStats] = field(default_factory=list)
    fanout: FanoutStats | None = None
    outbox_frames: int = 0  # frames queued to clients, summed over connections
    outbox_bytes: int = 0
    outbox_frames_max: int = 0  # the fullest single outbox
    appends_in_flight: int = 0  # submitted, not yet acked or refused, over all connections
    overloaded_total: int = 0  # requests refused with `overloaded` because a bound was hit
    connection_limit_refusals: int = 0
    sequencer_failures: int = 0  # actors that failed and were dropped (each one contained)
    writer_stalled_groups: int = 0  # group commits the writer stopped waiting for (in doubt)
    signature_workers_ready: int = 0  # signature-check worker processes ready (ADR-0022)
    signature_workers_lost: int = 0  # ready workers that died, hung or got out of step
    signature_checks_in_workers: int = 0  # checks the workers answered


class Relay:
    """A running relay. Use `serve` (via `nursery.start`) to get one that is listening."""

    def __init__(
        self, config: RelayConfig, ledger: Ledger, relay_key: nacl.signing.SigningKey
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.relay_key = relay_key
        self.relay_pk = bytes(relay_key.verify_key)
        # Each collab's tree and the relay's signed checkpoints of it (ADR-0020).
        self.trees = CollabTrees(
            ledger,
            CheckpointSigner(config.relay_name, bytes(relay_key)),
            trio.CapacityLimiter(2),
        )
        # Cosignatures from the configured witnesses, for collabs with a witness policy.
        self.witnessing: Witnessing | None = None
        if config.witnesses:
            self.witnessing = Witnessing(
                self.trees,
                config.witnesses,
                config.witness_interval_ms / 1000,
                refresh=config.checkpoint_interval_ms / 3000,
            )
            self.trees.on_grow = self.witnessing.poke
            self.trees.witnesses = len(config.witnesses)
            self.trees.cosign_wait = (
                min(2 * config.witness_interval_ms, config.checkpoint_interval_ms / 2) / 1000
            )
        self.fanout = Fanout(self._read_page, config.catchup, caught_up=self._caught_up)
        auth = bao_auth(config)
        self.broker = Broker(config.tools, None if auth is None else SecretStore(auth))
        self.url = ""
        self._connections: set[Connection] = set()
        self._accepted = 0
        self._shutdown = trio.Event()
        self._writer: LedgerWriter | None = None
        self._sequencers: SequencerRegistry | None = None
        self._listening = False
        self.auth_counters = AuthCounters()
        # The request handling, one object per role around the one authorization point.
        self._services = services = Services(
            config, ledger, self.fanout, self.broker, self.auth_counters
        )
        self._subscriptions = Subscriptions(services, self.trees)
        # Sweeps uploads a crash left and old login-failure records (relay/_uploads.py).
        self.housekeeping = Housekeeping(ledger, config, services.db)
        self._sessions = sessions = Sessions(services, on_end=self._session_ended)
        self._artifacts = Artifacts(services, sessions)
        self._collabs = Collabs(services, sessions)
        self._dispatcher = Dispatcher(
            sessions=sessions,
            accounts=Accounts(services, sessions),
            collabs=self._collabs,
            artifacts=self._artifacts,
            subscriptions=self._subscriptions,
            front_door=services.front_door,
        )
        # Unauthenticated connections, fair Argon2 slots, enumeration budgets (ADR-0018).
        self.front_door = services.front_door
        # Operations: refusals counted on the login paths (O(1)); everything else is read from
        # the actors' statistics() when /metrics is scraped. `ops_url` is set once listening.
        self.metrics = RelayMetrics(
            MetricSources(
                relay=self.statistics,
                writer=lambda: None if self._writer is None else self._writer.statistics(),
                auth=self.auth_counters,
                cf_access=lambda: None if self.access is None else self.access.statistics(),
            )
        )
        # Stage times (relay/_stages.py): a bench diagnostic, on for the whole process.
        stages = _stages.enable() if config.stage_times else None
        self._ops = OpsApp(
            Readiness(ledger, config.bao_addr, self._readiness), self.metrics, stages
        )
        self.ops_url = ""
        self.ops_port_taken: int | None = None  # the configured ops port, when it was taken
        # SO-6: the Cloudflare Access gate, when configured; `access.statistics()` for metrics.
        self.access = None if config.cf_access is None else AccessVerifier(config.cf_access)

    def statistics(self) -> RelayStats:
        conns = list(self._connections)
        return RelayStats(
            connections=len(conns),
            accepted_total=self._accepted,
            sequencers=[] if self._sequencers is None else self._sequencers.statistics(),
            fanout=self.fanout.statistics(),
            outbox_frames=sum(c.outbox_frames for c in conns),
            outbox_bytes=sum(c.outbox_bytes for c in conns),
            outbox_frames_max=max((c.outbox_frames for c in conns), default=0),
            appends_in_flight=sum(c.appends_in_flight for c in conns),
            overloaded_total=self._services.overloaded,
            connection_limit_refusals=self._services.connection_refusals,
            sequencer_failures=0 if self._sequencers is None else self._sequencers.failures,
            writer_stalled_groups=0
            if self._writer is None
            else self._writer.statistics().stalled_groups,
            **self._signature_worker_stats(),
        )

    def _signature_worker_stats(self) -> dict[str, int]:
        workers = None if self._sequencers is None else self._sequencers.signature_workers
        if workers is None:
            return {}
        return {
            "signature_workers_ready": len(workers.pids()),
            "signature_workers_lost": workers.lost,
            "signature_checks_in_workers": workers.answered,
        }

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def _readiness(self) -> str:
        if self._shutdown.is_set():
            return SHUTTING_DOWN
        return OK if self._listening else STARTING

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until `request_shutdown`, then drain and close everything in order.

        The operations listener (unless `ops_port` is None) comes up first and goes down last;
        `ops_url` names it. Raises OSError when either address cannot be bound.
        """
        async with trio.open_nursery() as ops:
            if self.config.ops_port is not None:
                host, port = self.config.ops_host, self.config.ops_port
                try:
                    bound = await ops.start(OpsServer(self._ops).serve, host, port)
                except OSError as exc:
                    if self.config.ops_port_fallback and exc.errno == errno.EADDRINUSE:
                        # `cozy dev` beside another relay: any free port beats not starting.
                        log.info("ops_port_taken", port=port, hint="using a free port instead")
                        self.ops_port_taken = port
                        bound = await ops.start(OpsServer(self._ops).serve, host, 0)
                    else:
                        log.error(
                            "ops_listen_failed",
                            host=host,
                            port=port,
                            error=exc.strerror,
                            hint="set COZY_OPS_PORT to a free port, 0 for any, or off",
                        )
                        raise
                self.ops_url = ops_url(host, bound)
                log.info("ops_listening", url=self.ops_url)
            # Outlives every connection: their timers fire here (relay/_timers.py).
            ops.start_soon(self._services.timers.run, name="timers")
            async with trio.open_nursery() as relay:
                url = await relay.start(self._serve_relay)
                self._listening = True
                task_status.started(url)
            ops.cancel_scope.cancel()

    def _caught_up(self, sub: Subscription) -> wire.CaughtUp:
        frame = self.trees.caught_up(sub.collab_id, sub.next_seq - 1, sub.tree_size)
        if frame.checkpoint:
            sub.tree_size = frame.seq
        return frame

    async def _serve_relay(self, *, task_status: trio.TaskStatus[str]) -> None:
        """The WebSocket relay itself, in the nursery order of the module docstring."""
        if self.access is not None:
            # Fetch the Access keys before listening, so a wrong team domain is in the first
            # log lines. Unreachable is logged, not fatal: upgrades get 503 until a fetch works.
            await self.access.start()
        # Connections get SHUTDOWN_GRACE seconds to close after the sequencers drained; any
        # still open then (including sockets that never finished the WebSocket handshake) are
        # cancelled, so shutdown is bounded.
        with trio.CancelScope() as connections_scope:
            async with trio.open_nursery() as connections, trio.open_nursery() as writers:
                writer = self._writer = LedgerWriter(
                    self.ledger,
                    on_commit=self.metrics.observe_commit,
                    stall_after=self.config.writer_stall_ms / 1000,
                )
                writers.start_soon(writer.run, name="ledger-writer")
                async with trio.open_nursery() as sequencers:
                    self._sequencers = self._services.sequencers = SequencerRegistry(
                        sequencers,
                        self.ledger,
                        writer,
                        self.fanout,
                        on_changed=self._collabs.changed,
                        trees=self.trees,
                        signature_workers=self.config.signature_workers,
                    )
                    async with trio.open_nursery() as accept:
                        # The relay's own WebSocket server (relay/_wsraw.py): one task per
                        # connection, which reads the socket when the request loop asks.
                        server = WebSocketServer(
                            self._handle,
                            handler_nursery=connections,
                            receive_buffer_size=RECEIVE_BUFFER,
                            max_message_size=wire.WS_HARD_LIMIT,
                            connect_timeout=HANDSHAKE_TIMEOUT,
                        )
                        port = await accept.start(
                            partial(server.serve, self.config.host, self.config.port)
                        )
                        self.url = f"ws://{self.config.host}:{port}"
                        accept.start_soon(self.housekeeping.run, name="housekeeping")
                        if self.witnessing is not None:
                            accept.start_soon(self.witnessing.run, name="witnessing")
                        log.info("relay_listening", url=self.url, relay_pk=self.relay_pk.hex())
                        task_status.started(self.url)
                        await self._shutdown.wait()
                        log.info("relay_stopping", phase="stop_accepting")
                        accept.cancel_scope.cancel()
                    log.info("relay_stopping", phase="drain_sequencers")
                    self._sequencers.close()
                writer.close()
                log.info(
                    "relay_stopping", phase="close_connections", connections=len(self._connections)
                )
                for conn in list(self._connections):
                    conn.close_gracefully(
                        SHUTDOWN_CLOSE_CODE, "relay shutting down: reconnect later and resume"
                    )
                connections_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
        log.info("relay_stopped")

    # --- per connection -------------------------------------------------------------------------

    async def _handle(self, request: UpgradeRequest) -> None:
        identity: AccessIdentity | None = None
        if self.access is not None:
            # SO-6: Cloudflare Access before any other surface. A refused upgrade gets a plain
            # HTTP answer and never becomes a WebSocket, so no frame of it is ever read.
            try:
                identity = await self.access.verify_headers(request.headers)
            except AccessDenied as exc:
                log.info("access_refused", reason=exc.reason, status=exc.status)
                with contextlib.suppress(ConnectionClosed):  # the client may be gone already
                    await request.reject(exc.status, body=str(exc).encode())
                return
            log.info("access_verified", **identity.log_fields())
        ws = await request.accept()
        self._accepted += 1
        # The connection is served in this same coroutine (not one more awaited inside it): a
        # frame less for every idle connection to keep.
        try:
            async with trio.open_nursery() as nursery:
                conn = Connection(ws, nursery)
                conn.access = identity
                conn.caller = caller_key(None if identity is None else identity.subject, ws.remote)
                self._connections.add(conn)
                self.front_door.admit(conn)  # over the cap, the oldest unauthenticated one closes
                conn.reply(
                    wire.Welcome(
                        protocol=wire.PROTOCOL,
                        relay_pk=self.relay_pk,
                        max_frame_bytes=wire.MAX_FRAME_BYTES,
                        max_body_bytes=MAX_BODY_BYTES,
                        challenge=conn.challenge,
                        heartbeat_ms=self.config.checkpoint_interval_ms,
                    )
                )
                try:
                    while True:
                        data = await ws.get_message()
                        # Once closing, keep reading until the close handshake ends the loop (so the
                        # close frame with its code and reason gets out), but act on nothing more.
                        if not conn.closing:
                            await self._dispatcher.on_frame(conn, data)
                except ConnectionClosed:
                    pass
                finally:
                    conn.ended()
                    self._connections.discard(conn)
                    self.front_door.closed(conn)
                    self._sessions.unfile(conn)
                    self._subscriptions.drop_all(conn)
                    self._artifacts.abandon(conn)
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 — contain a connection's failure to itself
            # Not log.exception: an exception's message may quote request data.
            log.error("connection_failed", error=type(exc).__name__, where=where(exc))

    def _session_ended(self, conn: Connection, reason: str) -> None:
        """A session ended with its connection still open: end what it opened."""
        self._subscriptions.end_all(conn, reason)
        self._artifacts.abandon(conn)

    async def _read_page(
        self, collab_id: str, from_seq: int, max_events: int, max_bytes: int
    ) -> FramePage:
        return await self._services.db(
            self.ledger.read_frames, collab_id, from_seq, max_events, max_bytes
        )
