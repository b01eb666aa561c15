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
import re
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final, TypeVar, TypeVarTuple, Unpack

import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from fanout import Fanout, FanoutStats, Subscription
from ledger import (
    AccountRow,
    AlreadyExists,
    ArtifactRow,
    HandleTaken,
    InvalidInput,
    KeystoreRow,
    Ledger,
    LedgerError,
    StaleVersion,
)
from model import wire
from model.artifacts import RefHasher
from model.chain import start_of
from model.envelope import (
    KIND_MANAGEMENT,
    MAX_BODY_BYTES,
    EventBody,
    SequencedEvent,
    decode_body,
    verify_event,
)
from model.errors import BadSignature, InvalidEvent, ModelError
from model.ids import is_id, new_id
from model.membership import (
    CAP_POST,
    CAP_READ,
    CAP_TOOL_PREFIX,
    AddMember,
    CreateCollab,
    MemberKind,
    ProofRejected,
    apply,
    proof_of,
)
from model.proofs import verify_keystore_write
from relay import _auth, _throttle
from relay._cf_access import AccessDenied, AccessVerifier
from relay._connection import (
    MAX_APPENDS_IN_FLIGHT,
    MAX_BACKGROUND_TASKS,
    ArtifactUpload,
    Connection,
)
from relay._ops import (
    OK,
    SHUTTING_DOWN,
    STARTING,
    AuthCounters,
    MetricSources,
    OpsApp,
    OpsServer,
    Readiness,
    RelayMetrics,
    ops_url,
)
from relay._sequencer import (
    InboxFull,
    SequencerRegistry,
    SequencerStats,
    ShuttingDown,
    Submission,
)
from relay._writer import LedgerWriter
from relay.broker import Broker, SecretStore, ToolFailed, UnknownTool
from relay.config import bao_auth

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import nacl.signing

    from relay._cf_access import AccessIdentity
    from relay.config import RelayConfig

log = structlog.get_logger("cozy.relay")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

SHUTDOWN_CLOSE_CODE: Final = 1001
AGENT_REVOKED_CODE: Final = 4003
MAX_UPLOADS: Final = 4  # artifact uploads in progress per connection
UPLOAD_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


# A collab's genesis event must be this fresh (ms) when it reaches the relay.
CREATE_COLLAB_MAX_SKEW_MS: Final = 10 * 60 * 1000
SHUTDOWN_GRACE: Final = 5.0
HANDSHAKE_TIMEOUT: Final = 10.0
# Messages trio-websocket reads ahead of the request loop, per connection. When they are not
# taken, it stops reading the socket (TCP backpressure): at most READ_QUEUE * WS_HARD_LIMIT
# bytes wait per connection.
READ_QUEUE: Final = 64
# Bytes asked of the socket per read (trio-websocket's default is 4 KiB): a 32-append batch of
# 4 KiB events is ~135 KiB, so this is ~4 reads and wsproto feeds per message instead of ~33.
# The buffer exists only while a read returns data, so idle connections do not pay for it.
RECEIVE_BUFFER: Final = 64 * 1024


class RequestRefused(Exception):
    """A request is refused with a typed error frame; the connection stays open."""

    def __init__(self, code: wire.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


class Relay:
    """A running relay. Use `serve` (via `nursery.start`) to get one that is listening."""

    def __init__(
        self, config: RelayConfig, ledger: Ledger, relay_key: nacl.signing.SigningKey
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.relay_key = relay_key
        self.relay_pk = bytes(relay_key.verify_key)
        self.fanout = Fanout(self._read_range)
        auth = bao_auth(config)
        self.broker = Broker(config.tools, None if auth is None else SecretStore(auth))
        self.url = ""
        self._connections: set[Connection] = set()
        # Connections by the account they were bound to (`_bind`), so a login counts only its
        # own account's connections instead of scanning every open one. An entry may be stale
        # (the session expired or an agent was revoked: `account_id` went to None); every use
        # re-checks `account_id`, and the entry goes when the connection does or rebinds.
        self._by_account: dict[str, set[Connection]] = {}
        self._filed_under: dict[Connection, str] = {}
        self._accepted = 0
        self._overloaded = 0  # requests shed with `overloaded` (a bound was reached)
        self._connection_refusals = 0  # logins/auths refused: too many connections
        self._db_limiter = trio.CapacityLimiter(8)
        self._auth_limiter = trio.CapacityLimiter(2)
        self._shutdown = trio.Event()
        self._sequencers: SequencerRegistry | None = None
        self._writer: LedgerWriter | None = None
        self._listening = False
        # Operations: refusals counted on the login paths (O(1)); everything else is read from
        # the actors' statistics() when /metrics is scraped. `ops_url` is set once listening.
        self.auth_counters = AuthCounters()
        self.metrics = RelayMetrics(
            MetricSources(
                relay=self.statistics,
                writer=lambda: None if self._writer is None else self._writer.statistics(),
                auth=self.auth_counters,
                cf_access=lambda: None if self.access is None else self.access.statistics(),
            )
        )
        self._ops = OpsApp(Readiness(ledger, config.bao_addr, self._readiness), self.metrics)
        self.ops_url = ""
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
            overloaded_total=self._overloaded,
            connection_limit_refusals=self._connection_refusals,
        )

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
            async with trio.open_nursery() as relay:
                url = await relay.start(self._serve_relay)
                self._listening = True
                task_status.started(url)
            ops.cancel_scope.cancel()

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
                    self.ledger, self.relay_key, on_commit=self.metrics.observe_commit
                )
                writers.start_soon(writer.run, name="ledger-writer")
                async with trio.open_nursery() as sequencers:
                    self._sequencers = SequencerRegistry(
                        sequencers, self.ledger, writer, self.fanout, on_removed=self._removed
                    )
                    async with trio.open_nursery() as accept:
                        server = await accept.start(
                            partial(
                                serve_websocket,
                                self._handle,
                                self.config.host,
                                self.config.port,
                                None,
                                handler_nursery=connections,
                                message_queue_size=READ_QUEUE,
                                receive_buffer_size=RECEIVE_BUFFER,
                                max_message_size=wire.WS_HARD_LIMIT,
                                connect_timeout=HANDSHAKE_TIMEOUT,
                            )
                        )
                        self.url = f"ws://{self.config.host}:{server.port}"
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

    async def _handle(self, request: WebSocketRequest) -> None:
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
        subscriptions: dict[str, Subscription] = {}
        try:
            await self._serve_connection(ws, subscriptions, identity)
        except Exception as exc:  # noqa: BLE001 — contain a connection's failure to itself
            # Not log.exception: an exception's message may quote request data.
            log.error("connection_failed", error=type(exc).__name__, where=_where(exc))

    async def _serve_connection(
        self,
        ws: WebSocketConnection,
        subscriptions: dict[str, Subscription],
        identity: AccessIdentity | None = None,
    ) -> None:
        async with trio.open_nursery() as nursery:
            conn = Connection(ws, nursery)
            conn.access = identity
            self._connections.add(conn)
            nursery.start_soon(conn.run_writer)
            conn.reply(
                wire.Welcome(
                    protocol=wire.PROTOCOL,
                    relay_pk=self.relay_pk,
                    max_frame_bytes=wire.MAX_FRAME_BYTES,
                    max_body_bytes=MAX_BODY_BYTES,
                )
            )
            try:
                while True:
                    data = await ws.get_message()
                    # Once closing, keep reading until the close handshake ends the loop (so the
                    # close frame with its code and reason gets out), but act on nothing more.
                    if not conn.closing:
                        await self._on_frame(conn, data, nursery, subscriptions)
            except ConnectionClosed:
                pass
            finally:
                self._connections.discard(conn)
                self._unfile(conn)
                for sub in subscriptions.values():
                    self.fanout.remove(sub)
                nursery.cancel_scope.cancel()

    async def _on_frame(
        self,
        conn: Connection,
        data: bytes | str,
        nursery: trio.Nursery,
        subscriptions: dict[str, Subscription],
    ) -> None:
        if isinstance(data, str):
            self._refuse(
                conn,
                None,
                wire.ErrorCode.MALFORMED_FRAME,
                "send binary msgpack frames, not text; see docs/protocol.md",
            )
        elif len(data) > wire.MAX_FRAME_BYTES:
            self._refuse(
                conn,
                None,
                wire.ErrorCode.FRAME_TOO_LARGE,
                f"frame is {len(data)} bytes; the limit is {wire.MAX_FRAME_BYTES}. Nothing was stored.",
            )
        else:
            await self._on_request(conn, data, nursery, subscriptions, in_batch=False)

    async def _on_request(
        self,
        conn: Connection,
        data: bytes,
        nursery: trio.Nursery,
        subscriptions: dict[str, Subscription],
        *,
        in_batch: bool,
    ) -> None:
        """Decode and run one request; every refusal becomes a typed error frame."""
        rid: int | None = None
        try:
            try:
                req = wire.decode_request(data)
            except wire.MalformedFrame as exc:
                rid = exc.rid
                raise RequestRefused(wire.ErrorCode.MALFORMED_FRAME, str(exc)) from None
            if isinstance(req, wire.Batch):
                if in_batch or len(req.frames) > wire.MAX_BATCH_FRAMES:
                    raise RequestRefused(
                        wire.ErrorCode.MALFORMED_FRAME,
                        f"batches do not nest and hold at most {wire.MAX_BATCH_FRAMES} frames",
                    )
                for raw in req.frames:
                    await self._on_request(conn, bytes(raw), nursery, subscriptions, in_batch=True)
                return
            rid = req.rid
            await self._dispatch(conn, req, nursery, subscriptions)
        except RequestRefused as exc:
            self._refuse(conn, rid, exc.code, exc.message)
        except InvalidInput:
            self._refuse(
                conn,
                rid,
                wire.ErrorCode.INVALID_REQUEST,
                "the request holds a value that cannot be stored (e.g. a NUL character)",
            )
        except LedgerError as exc:
            log.warning("ledger_error", error=type(exc).__name__, rid=rid)
            self._refuse(
                conn,
                rid,
                wire.ErrorCode.OVERLOADED,
                "the ledger is unavailable right now; retry shortly",
            )
        except Exception as exc:  # noqa: BLE001 — one request's bug must not take the relay down
            incident = new_id("e")
            log.error(
                "request_failed",
                incident=incident,
                rid=rid,
                error=type(exc).__name__,
                where=_where(exc),
            )
            self._refuse(
                conn,
                rid,
                wire.ErrorCode.INTERNAL,
                f"the relay failed on this request (incident {incident}); it is logged for the operator",
            )

    @staticmethod
    def _refuse(conn: Connection, rid: int | None, code: wire.ErrorCode, message: str) -> None:
        log.info("request_refused", code=code.value, rid=rid, account_id=conn.account_id)
        conn.reply(wire.Error(rid=rid, code=code, message=message))

    async def _dispatch(
        self,
        conn: Connection,
        req: wire.Request,
        nursery: trio.Nursery,
        subscriptions: dict[str, Subscription],
    ) -> None:
        match req:
            case wire.Append():
                await self._append(conn, req)
            case wire.Ping():
                conn.reply(wire.Pong(rid=req.rid))
            case wire.CallTool():
                # Checked here; the call itself runs beside the read loop (it may take seconds).
                await self._require_member(conn, req.collab_id, CAP_TOOL_PREFIX + req.tool)
                if not self.broker.has(req.tool):
                    raise RequestRefused(
                        wire.ErrorCode.NOT_FOUND, f"this relay declares no tool {req.tool!r}"
                    )
                self._start_background(conn, nursery, self._call_tool, conn, req)
            case wire.Signup():
                await self._signup(conn, req)
            case wire.Login():
                await self._login(conn, req)
            case wire.Authenticate():
                try:
                    claims = _auth.verify_token(self.config.jwt_signing_key.value, req.token)
                except _auth.AuthError as exc:
                    self.auth_counters.failed(exc.reason)
                    raise RequestRefused(wire.ErrorCode.UNAUTHENTICATED, str(exc)) from None
                await self._bind_account(conn, claims)
                conn.reply(wire.Authenticated(rid=req.rid, account_id=claims.account_id))
            case wire.CreateAgent():
                await self._create_agent(conn, req)
            case wire.RevokeAgent():
                await self._revoke_agent(conn, req)
            case wire.CreateCollab():
                await self._create_collab(conn, req)
            case wire.PutKeystore():
                await self._put_keystore(conn, req)
            case wire.PutArtifactChunk():
                await self._put_artifact_chunk(conn, req)
            case wire.GetArtifact():
                await self._require_member(conn, req.collab_id, CAP_READ)
                artifact_row = await self._db(self.ledger.artifact, req.collab_id, req.ref)
                if artifact_row is None:
                    raise RequestRefused(
                        wire.ErrorCode.NOT_FOUND, "no such artifact in this collab"
                    )
                self._start_background(
                    conn, nursery, self._send_artifact, conn, req.rid, artifact_row
                )
            case wire.GetKeystore():
                account_id = _require_auth(conn)
                stored = await self._db(self.ledger.keystore, account_id)
                if stored is None or not stored.blob:
                    raise RequestRefused(
                        wire.ErrorCode.NOT_FOUND, "this account has no stored keystore"
                    )
                conn.reply(wire.Keystore(rid=req.rid, version=stored.version, blob=stored.blob))
            case wire.Subscribe():
                await self._require_member(conn, req.collab_id, CAP_READ)
                if req.from_seq < 1:
                    raise RequestRefused(wire.ErrorCode.INVALID_REQUEST, "from_seq starts at 1")
                if req.collab_id in subscriptions:
                    raise RequestRefused(
                        wire.ErrorCode.INVALID_REQUEST,
                        "already subscribed to this collab on this connection",
                    )
                sub = Subscription(
                    req.collab_id,
                    req.from_seq,
                    conn,
                    follow=req.follow,
                    account_id=conn.account_id or "",
                )
                subscriptions[req.collab_id] = sub
                conn.reply(
                    wire.Subscribed(rid=req.rid, collab_id=req.collab_id, from_seq=req.from_seq)
                )
                nursery.start_soon(self._stream, sub, subscriptions)
            case wire.Unsubscribe():
                found = subscriptions.pop(req.collab_id, None)
                if found is None:
                    raise RequestRefused(wire.ErrorCode.NOT_FOUND, "not subscribed to this collab")
                self.fanout.remove(found)
                conn.reply(wire.Unsubscribed(rid=req.rid, collab_id=req.collab_id))
            case wire.GetAccount():
                _require_auth(conn)
                if req.account_id is not None:
                    ok = is_id(req.account_id, "a")
                    row = await self._db(self.ledger.account_by_id, req.account_id) if ok else None
                elif req.handle is not None:
                    ok = bool(_auth.HANDLE_RE.fullmatch(req.handle))
                    row = await self._db(self.ledger.account_by_handle, req.handle) if ok else None
                else:
                    raise RequestRefused(
                        wire.ErrorCode.INVALID_REQUEST, "give account_id or handle"
                    )
                if row is None:
                    raise RequestRefused(wire.ErrorCode.NOT_FOUND, "no such account")
                conn.reply(
                    wire.AccountInfo(
                        rid=req.rid,
                        account_id=row.account_id,
                        handle=row.handle,
                        sign_pk=row.sign_pk,
                        box_pk=row.box_pk,
                    )
                )

    async def _stream(self, sub: Subscription, subscriptions: dict[str, Subscription]) -> None:
        try:
            await self.fanout.stream(sub)
        except ConnectionClosed:
            self.fanout.remove(sub)
        finally:
            # A finished (non-following) subscription frees its collab slot on this connection.
            if sub.ended and subscriptions.get(sub.collab_id) is sub:
                del subscriptions[sub.collab_id]

    async def _append(self, conn: Connection, req: wire.Append) -> None:
        account_id = _require_auth(conn)
        try:
            body = decode_body(req.event.body)
        except InvalidEvent as exc:
            raise RequestRefused(
                wire.ErrorCode.INVALID_EVENT, f"{exc}; nothing was stored"
            ) from None
        if body.actor_id != account_id:
            raise RequestRefused(
                wire.ErrorCode.UNAUTHORIZED, "events must be authored by the logged-in account"
            )
        await self._require_member(conn, body.collab_id)
        if body.kind == KIND_MANAGEMENT:
            await self._check_addition(body)
        assert self._sequencers is not None
        # Shed load instead of queueing it: a flood gets `overloaded` at once, and the reader
        # of this connection never waits on a full inbox (which would stall its other requests).
        ticket = conn.admit_append(len(req.event.body))
        if ticket is None:
            self._overloaded += 1
            raise RequestRefused(
                wire.ErrorCode.OVERLOADED,
                f"this connection already has {conn.appends_in_flight} appends waiting for their"
                f" acks (at most {MAX_APPENDS_IN_FLIGHT}, 16 MiB): wait for acks, then retry",
            )
        try:
            self._sequencers.submit_nowait(
                body.collab_id, Submission(ticket, req.rid, req.event, body, conn.sign_pk)
            )
        except InboxFull:
            ticket.release()
            self._overloaded += 1
            raise RequestRefused(
                wire.ErrorCode.OVERLOADED,
                "this collab receives appends faster than the relay can store them; nothing was"
                " stored: retry after a short pause (appends are idempotent)",
            ) from None
        except ShuttingDown:
            ticket.release()
            raise RequestRefused(
                wire.ErrorCode.SHUTTING_DOWN, "the relay is shutting down; retry on reconnect"
            ) from None

    def _start_background(
        self,
        conn: Connection,
        nursery: trio.Nursery,
        fn: Callable[[Unpack[Ts]], Awaitable[None]],
        *args: *Ts,
    ) -> None:
        """Run a request's slow part (tool call, download) beside the reader, at most
        MAX_BACKGROUND_TASKS at once per connection; more is refused with `overloaded`."""
        if conn.background_tasks >= MAX_BACKGROUND_TASKS:
            self._overloaded += 1
            raise RequestRefused(
                wire.ErrorCode.OVERLOADED,
                f"at most {MAX_BACKGROUND_TASKS} tool calls and downloads at once per"
                " connection: wait for one to finish, then retry",
            )
        conn.background_tasks += 1

        async def run() -> None:
            try:
                await fn(*args)
            finally:
                conn.background_tasks -= 1

        nursery.start_soon(run)

    async def _signup(self, conn: Connection, req: wire.Signup) -> None:
        try:
            _auth.check_signup(req.handle, req.password)
        except _auth.AuthError as exc:
            raise RequestRefused(wire.ErrorCode.INVALID_REQUEST, str(exc)) from None
        if len(req.sign_pk) != 32 or len(req.box_pk) != 32:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST, "sign_pk and box_pk must be 32-byte public keys"
            )
        if not is_id(req.account_id, "a"):
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST, "account_id must look like a_<26 base32 chars>"
            )
        keystore = None
        if req.keystore:
            if not verify_keystore_write(
                req.sign_pk, req.account_id, 1, req.keystore, req.keystore_sig
            ):
                raise RequestRefused(
                    wire.ErrorCode.BAD_SIGNATURE,
                    "the keystore is not signed by the account key being registered",
                )
            keystore = KeystoreRow(1, req.keystore, req.keystore_sig)
        password_hash = await trio.to_thread.run_sync(
            _auth.hash_password, req.password, limiter=self._auth_limiter
        )
        account_id = req.account_id
        await self._create_account(
            AccountRow(account_id, req.handle, password_hash, req.sign_pk, req.box_pk), keystore
        )
        log.info("account_created", account_id=account_id)
        conn.reply(wire.SignedUp(rid=req.rid, account_id=account_id))

    async def _create_collab(self, conn: Connection, req: wire.CreateCollab) -> None:
        """A collab starts with its genesis proof, signed by the creator's account key: a
        session token alone cannot create one, and the relay cannot invent an owner (SO-5)."""
        account_id = _require_auth(conn)
        try:
            verified = verify_event(req.event, conn.sign_pk)
            body = verified.body
            if body.kind != KIND_MANAGEMENT or body.actor_id != account_id:
                raise ProofRejected("bad_genesis", "send a `create` proof made by your account")
            proof = proof_of(body)
            if not isinstance(proof.op, CreateCollab):
                raise ProofRejected("bad_genesis", "a collab's first event must create it")
            owner = proof.op.owner
            if (owner.sign_pk, owner.box_pk) != (conn.sign_pk, conn.box_pk):
                raise ProofRejected("bad_genesis", "the owner's keys must be your account's keys")
            membership = apply(None, proof, start_of(body.collab_id), actor_id=account_id)
        except BadSignature:
            raise RequestRefused(
                wire.ErrorCode.BAD_SIGNATURE, "collab creation must be signed by your account key"
            ) from None
        except ModelError as exc:
            raise RequestRefused(
                wire.ErrorCode.INVALID_EVENT, f"{exc}; nothing was stored"
            ) from None
        if abs(time.time() * 1000 - body.ts) > CREATE_COLLAB_MAX_SKEW_MS:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "the creation proof is too old or from the future; check your clock",
            )
        try:
            await self._db(self.ledger.create_collab, verified, membership)
        except AlreadyExists:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "that collab id exists already; pick another random id",
            ) from None
        conn.member_of[body.collab_id] = None
        log.info("collab_created", collab_id=body.collab_id, account_id=account_id)
        conn.reply(wire.CollabCreated(rid=req.rid, collab_id=body.collab_id))

    async def _check_addition(self, body: EventBody) -> None:
        """An added member's pinned keys must be that account's keys, so every member's key
        is one its owner registered (the fold itself cannot know the directory)."""
        try:
            op = proof_of(body).op
        except ProofRejected as exc:
            raise RequestRefused(
                wire.ErrorCode.INVALID_EVENT, f"{exc}; nothing was stored"
            ) from None
        if not isinstance(op, AddMember):
            return
        new = op.member
        row = (
            await self._db(self.ledger.account_by_id, new.account_id)
            if is_id(new.account_id, "a")
            else None
        )
        if row is None or (row.sign_pk, row.box_pk) != (new.sign_pk, new.box_pk):
            raise RequestRefused(
                wire.ErrorCode.INVALID_EVENT,
                "the member to add must be an existing account with exactly its registered"
                " keys; look the account up again",
            )

    def _removed(self, collab_id: str, account_id: str) -> None:
        """A committed removal: end the removed member's subscriptions and forget the cached
        membership on their connections, so their next request is checked afresh."""
        self.fanout.evict(collab_id, account_id, "you were removed from this collab")
        for conn in self._by_account.get(account_id, ()):
            if conn.account_id == account_id:
                conn.member_of.pop(collab_id, None)
        log.info("member_removed", collab_id=collab_id, account_id=account_id)

    async def _put_keystore(self, conn: Connection, req: wire.PutKeystore) -> None:
        """Keystore writes need the account key: a stolen session cannot replace, roll back or
        delete the sealed keystore (SO-2)."""
        account_id = _require_auth(conn)
        if not verify_keystore_write(conn.sign_pk, account_id, req.version, req.blob, req.sig):
            raise RequestRefused(
                wire.ErrorCode.BAD_SIGNATURE, "keystore writes must be signed by your account key"
            )
        try:
            await self._db(
                self.ledger.put_keystore, account_id, KeystoreRow(req.version, req.blob, req.sig)
            )
        except StaleVersion as exc:
            raise RequestRefused(
                wire.ErrorCode.STALE,
                f"the stored keystore is version {exc.current}; fetch it, merge, and write version {exc.current + 1}",
            ) from None
        log.info(
            "keystore_stored", account_id=account_id, version=req.version, deleted=not req.blob
        )
        conn.reply(wire.KeystoreStored(rid=req.rid, version=req.version))

    async def _put_artifact_chunk(self, conn: Connection, req: wire.PutArtifactChunk) -> None:
        """Store one piece of an upload; on the final piece check the whole upload's hash.

        Pieces go to the ledger as they arrive, so no upload is ever held in memory whole.
        """
        account_id = _require_auth(conn)
        await self._require_member(conn, req.collab_id, CAP_POST)
        upload = conn.uploads.get(req.upload)
        if req.index == 0 and upload is None:
            if not UPLOAD_ID_RE.fullmatch(req.upload) or len(conn.uploads) >= MAX_UPLOADS:
                raise RequestRefused(
                    wire.ErrorCode.INVALID_REQUEST,
                    f"upload ids are 16-64 letters, digits, '_' or '-'; at most {MAX_UPLOADS} uploads at once",
                )
            upload = conn.uploads[req.upload] = ArtifactUpload(req.collab_id, RefHasher())
        if upload is None or upload.collab_id != req.collab_id or req.index != upload.next_index:
            conn.uploads.pop(req.upload, None)
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "artifact pieces must arrive in order, from 0; start again",
            )
        upload.size += len(req.data)
        if upload.size > self.config.max_artifact_bytes:
            conn.uploads.pop(req.upload, None)
            raise RequestRefused(
                wire.ErrorCode.FRAME_TOO_LARGE,
                f"artifacts are limited to {self.config.max_artifact_bytes} bytes on this relay",
            )
        upload.hasher.update(req.data)
        try:
            await self._db(self.ledger.put_artifact_piece, req.upload, req.index, req.data)
        except AlreadyExists:
            conn.uploads.pop(req.upload, None)
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "that upload id is in use; start again with a new random one",
            ) from None
        upload.next_index += 1
        if not req.final:
            conn.reply(wire.ArtifactChunkStored(rid=req.rid, index=req.index))
            return
        del conn.uploads[req.upload]
        if upload.hasher.ref() != req.ref:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "the upload does not hash to the ref it claims; nothing was stored",
            )
        await self._db(
            self.ledger.finish_artifact,
            req.collab_id,
            req.ref,
            req.upload,
            account_id,
            upload.size,
            upload.next_index,
        )
        log.info("artifact_stored", collab_id=req.collab_id, size=upload.size)
        conn.reply(wire.ArtifactStored(rid=req.rid, ref=req.ref, size=upload.size))

    async def _call_tool(self, conn: Connection, req: wire.CallTool) -> None:
        try:
            status, body = await self.broker.call(req.tool, req.args)
        except ToolFailed as exc:
            self._refuse(conn, req.rid, wire.ErrorCode.TOOL_FAILED, str(exc))
            return
        except UnknownTool:
            self._refuse(conn, req.rid, wire.ErrorCode.NOT_FOUND, "no such tool")
            return
        except Exception as exc:  # noqa: BLE001 — a broker bug fails this call, nothing else
            incident = new_id("e")
            log.error("tool_failed", incident=incident, error=type(exc).__name__, where=_where(exc))
            self._refuse(
                conn,
                req.rid,
                wire.ErrorCode.INTERNAL,
                f"the tool call failed inside the relay (incident {incident})",
            )
            return
        log.info("tool_result", tool=req.tool, status=status, account_id=conn.account_id)
        conn.reply(wire.ToolResult(rid=req.rid, status=status, body=body))

    async def _send_artifact(self, conn: Connection, rid: int, found: ArtifactRow) -> None:
        """Stream the stored pieces a page at a time, paced by the client's socket."""
        index = 0
        try:
            while index < found.pieces:
                page = await self._db(self.ledger.artifact_pieces, found.upload, index, 16)
                if not page:
                    break
                for data in page:
                    final = index == found.pieces - 1
                    await conn.send(
                        wire.encode(wire.ArtifactData(rid=rid, index=index, data=data, final=final))
                    )
                    index += 1
        except ConnectionClosed:
            pass

    async def _login(self, conn: Connection, req: wire.Login) -> None:
        """Throttled per handle string, known or not, with identical answers (SO-6).

        The lock check, the verification and the bookkeeping of its outcome all happen while
        holding one verifier slot, so attempts queued behind a failure see the lock it caused:
        a locked handle's password is never verified, however many attempts arrive at once.
        """
        policy = _throttle.LOGIN_POLICY
        if not _auth.HANDLE_RE.fullmatch(req.handle):
            # No account can have this handle: answer as for any unknown handle, after the same
            # verifier work, without touching the database with arbitrary bytes.
            await trio.to_thread.run_sync(
                _auth.verify_password, None, req.password, limiter=self._auth_limiter
            )
            self.auth_counters.failed("invalid_credentials")
            raise RequestRefused(wire.ErrorCode.INVALID_CREDENTIALS, "handle or password is wrong")
        async with self._auth_limiter:
            wait = await self._db(self.ledger.login_wait, req.handle)
            if wait > 0:
                self.auth_counters.failed("locked_out")
                raise RequestRefused(wire.ErrorCode.RATE_LIMITED, _throttle.lockout_message(wait))
            row = await self._db(self.ledger.account_by_handle, req.handle)
            ok = await trio.to_thread.run_sync(  # the slot held above bounds the concurrency
                _auth.verify_password, None if row is None else row.password_hash, req.password
            )
            if row is None or not ok:
                locked_for = await self._db(
                    partial(self.ledger.record_login_failure, policy=policy), req.handle
                )
                self.auth_counters.failed("invalid_credentials", locked=locked_for > 0)
                raise RequestRefused(
                    wire.ErrorCode.INVALID_CREDENTIALS, "handle or password is wrong"
                )
            await self._db(self.ledger.record_login_success, req.handle)
        if _auth.needs_rehash(row.password_hash):
            await self._rehash(row, req.password)
        token, expires = _auth.issue_token(
            self.config.jwt_signing_key.value,
            row.account_id,
            self.config.session_ttl_seconds,
            time.time(),
        )
        self._bind(conn, row, expires)
        conn.reply(
            wire.LoggedIn(rid=req.rid, account_id=row.account_id, token=token, expires_at=expires)
        )

    async def _rehash(self, row: AccountRow, password: str) -> None:
        """Store a hash with today's Argon2id parameters; best effort (the login stands)."""
        new_hash = await trio.to_thread.run_sync(
            _auth.hash_password, password, limiter=self._auth_limiter
        )
        try:
            await self._db(
                partial(self.ledger.update_password_hash, replaces=row.password_hash),
                row.account_id,
                new_hash,
            )
        except LedgerError as exc:
            log.warning(
                "password_rehash_failed", account_id=row.account_id, error=type(exc).__name__
            )
        else:
            log.info("password_rehashed", account_id=row.account_id)

    async def _bind_account(self, conn: Connection, claims: _auth.Claims) -> None:
        row = await self._db(self.ledger.account_by_id, claims.account_id)
        if row is None:
            self.auth_counters.failed("invalid_token")
            raise RequestRefused(
                wire.ErrorCode.UNAUTHENTICATED, "session names an unknown account: log in again"
            )
        is_agent_token = claims.agent_generation is not None
        if is_agent_token != (row.kind == "agent") or (
            is_agent_token and claims.agent_generation != row.token_generation
        ):
            self.auth_counters.failed("revoked_token")
            raise RequestRefused(
                wire.ErrorCode.UNAUTHENTICATED,
                "this token was revoked: ask the agent's creator for a new credential file",
            )
        self._bind(conn, row, claims.expires)

    async def _create_account(self, row: AccountRow, keystore: KeystoreRow | None) -> None:
        try:
            await self._db(self.ledger.create_account, row, keystore)
        except HandleTaken as exc:
            raise RequestRefused(wire.ErrorCode.HANDLE_TAKEN, str(exc)) from None
        except AlreadyExists:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST, "that account id is taken; pick another random id"
            ) from None

    async def _create_agent(self, conn: Connection, req: wire.CreateAgent) -> None:
        """A human registers a bot's account (keys generated on the human's device) and gets
        the agent's long-lived, revocable token. What the agent may do in a collab is granted
        separately, by the signed `add` proof with its capabilities."""
        creator = _require_auth(conn)
        me = await self._db(self.ledger.account_by_id, creator)
        if me is None or me.kind != "human":
            raise RequestRefused(wire.ErrorCode.UNAUTHORIZED, "only people create agents")
        if not _auth.HANDLE_RE.fullmatch(req.handle) or not is_id(req.account_id, "a"):
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "an agent needs a handle (3-32 of a-z, 0-9, '_', '.', '-') and an a_… id",
            )
        if len(req.sign_pk) != 32 or len(req.box_pk) != 32:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST, "sign_pk and box_pk must be 32-byte public keys"
            )
        row = AccountRow(
            req.account_id, req.handle, "!agent: no password", req.sign_pk, req.box_pk,
            kind="agent", created_by=creator,
        )  # fmt: skip
        await self._create_account(row, None)
        token, expires = _auth.issue_token(
            self.config.jwt_signing_key.value,
            req.account_id,
            _auth.AGENT_TOKEN_TTL,
            agent_generation=0,
        )
        log.info("agent_created", account_id=req.account_id, created_by=creator)
        conn.reply(
            wire.AgentCreated(
                rid=req.rid, account_id=req.account_id, token=token, expires_at=expires
            )
        )

    async def _revoke_agent(self, conn: Connection, req: wire.RevokeAgent) -> None:
        """Its creator revokes an agent: every token issued to it stops working at once and
        its open connections are closed. (Removing it from collabs, which rotates their keys,
        is the creator's signed `remove`, made separately.)"""
        creator = _require_auth(conn)
        generation = await self._db(self.ledger.revoke_agent, req.account_id, creator)
        if generation is None:
            raise RequestRefused(wire.ErrorCode.NOT_FOUND, "no agent of yours has that id")
        for other in list(self._by_account.get(req.account_id, ())):
            if other.account_id == req.account_id:
                other.account_id = None
                other.close_gracefully(AGENT_REVOKED_CODE, "agent revoked by its creator")
        log.info("agent_revoked", account_id=req.account_id, generation=generation)
        conn.reply(wire.AgentRevoked(rid=req.rid, account_id=req.account_id))

    def _bind(self, conn: Connection, row: AccountRow, expires: int) -> None:
        """Make `row` the connection's account, within the per-account connection limit."""
        if conn.account_id != row.account_id:
            limit = self.config.max_connections_per_account
            filed = self._by_account.get(row.account_id, set())
            # The filed set bounds the count from above (it also holds connections that are
            # closing, expired or revoked), so the exact count is only needed near the limit:
            # a login costs O(1) below it, not a scan of every open connection.
            held = len(filed) - (conn in filed)
            if held >= limit:
                now = time.time()
                held = sum(
                    1
                    for other in filed
                    if other is not conn
                    and other.account_id == row.account_id
                    and not other.closing
                    and other.session_expires_at > now
                )
            if held >= limit:
                self._connection_refusals += 1
                raise RequestRefused(
                    wire.ErrorCode.TOO_MANY_CONNECTIONS,
                    f"this account already has {held} open connections (at most {limit}):"
                    " close one, or reuse a connection, then retry",
                )
            conn.member_of.clear()
            self._unfile(conn)
            self._by_account.setdefault(row.account_id, set()).add(conn)
            self._filed_under[conn] = row.account_id
        conn.account_id = row.account_id
        conn.sign_pk = row.sign_pk
        conn.box_pk = row.box_pk
        conn.session_expires_at = expires

    def _unfile(self, conn: Connection) -> None:
        """Take `conn` out of the by-account index (it closed, or binds another account)."""
        account_id = self._filed_under.pop(conn, None)
        if account_id is not None:
            filed = self._by_account[account_id]
            filed.discard(conn)
            if not filed:
                del self._by_account[account_id]

    async def _require_member(
        self, conn: Connection, collab_id: str, need: str | None = None
    ) -> None:
        """A member of the collab — and, for an agent, one granted capability `need`."""
        account_id = _require_auth(conn)
        if collab_id not in conn.member_of:
            found = (
                await self._db(self.ledger.member, collab_id, account_id)
                if is_id(collab_id, "c")
                else None
            )
            if found is None:
                # The same answer whether the collab does not exist or is not yours.
                raise RequestRefused(
                    wire.ErrorCode.UNAUTHORIZED, "you are not a member of this collab"
                )
            kind, granted = found
            conn.member_of[collab_id] = granted if kind == MemberKind.AGENT else None
        caps = conn.member_of[collab_id]
        if need is not None and caps is not None and need not in caps:
            raise RequestRefused(
                wire.ErrorCode.UNAUTHORIZED, f"this agent was not given the {need!r} capability"
            )

    async def _read_range(self, collab_id: str, from_seq: int, limit: int) -> list[SequencedEvent]:
        return await self._db(self.ledger.read_range, collab_id, from_seq, limit)

    async def _db(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        """Run a blocking ledger call in a worker thread (never abandoned on cancel)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._db_limiter)


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame: enough to find a bug, never a value from it."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "?" if tb is None else f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def _require_auth(conn: Connection) -> str:
    if conn.account_id is not None and time.time() >= conn.session_expires_at:
        # The session ran out while the connection stayed open: it is no session any more.
        conn.account_id = None
        conn.member_of.clear()
        raise RequestRefused(wire.ErrorCode.UNAUTHENTICATED, "session expired: log in again")
    if conn.account_id is None:
        raise RequestRefused(
            wire.ErrorCode.UNAUTHENTICATED, "log in or authenticate with a session token first"
        )
    return conn.account_id
