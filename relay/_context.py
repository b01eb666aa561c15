"""What every request handler of the relay shares: the ledger, the actors, the limits, the
typed refusal, and the two ways a request's slow part leaves the read loop (a worker thread for
blocking calls, a background task for long ones).

The handlers themselves are split by role, one module each, all behind the one authorization
point in relay/_dispatch.py:

    _sessions.py       who a connection speaks for; session expiry, re-authentication and
                       revocation end what the session opened
    _accounts.py       sign-up, login, agents, the account directory
    _collabs.py        collab creation, appends (handed to the sequencers), tool calls
    _artifacts.py      uploads and downloads of encrypted artifacts
    _subscriptions.py  live and catch-up reads through the fan-out

and beside them, called from those: `_keystores.py` (the KDF floor for stored keystores) and
`_uploads.py` (deleting refused and abandoned uploads; the periodic housekeeping sweep).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeVar, TypeVarTuple, Unpack

import structlog
import trio

from model import wire
from model.excgroups import leaves
from relay._connection import MAX_BACKGROUND_TASKS
from relay._frontdoor import FrontDoor
from relay._timers import Timers

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from fanout import Fanout
    from ledger import Ledger
    from relay._connection import Connection
    from relay._metrics import AuthCounters
    from relay._registry import SequencerRegistry
    from relay.broker import Broker
    from relay.config import RelayConfig

log = structlog.get_logger("cozy.relay")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

DB_THREADS: Final = 8


class RequestRefused(Exception):
    """A request is refused with a typed error frame; the connection stays open."""

    def __init__(self, code: wire.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Services:
    """The relay's shared parts, as the role modules see them."""

    def __init__(
        self,
        config: RelayConfig,
        ledger: Ledger,
        fanout: Fanout,
        broker: Broker,
        auth_counters: AuthCounters,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.fanout = fanout
        self.broker = broker
        self.auth_counters = auth_counters
        self.db_limiter = trio.CapacityLimiter(DB_THREADS)
        # Every per-connection timer (session expiry, login deadline, heartbeats), one task.
        self.timers = Timers()
        # Unauthenticated connections, fair Argon2 slots, enumeration budgets (ADR-0018).
        self.front_door = FrontDoor(config.front_door, self.timers)
        self.sequencers: SequencerRegistry | None = None  # set while the relay serves
        self.overloaded = 0  # requests shed with `overloaded` (a bound was reached)
        self.connection_refusals = 0  # logins/auths refused: too many connections

    async def db(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        """Run a blocking ledger call in a worker thread (never abandoned on cancel)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.db_limiter)

    def overload(self, message: str) -> RequestRefused:
        """Count a request shed because a bound was reached, and build its refusal."""
        self.overloaded += 1
        return RequestRefused(wire.ErrorCode.OVERLOADED, message)

    def start_background(
        self, conn: Connection, fn: Callable[[Unpack[Ts]], Awaitable[None]], *args: *Ts
    ) -> None:
        """Run a request's slow part (tool call, download) beside the reader, at most
        MAX_BACKGROUND_TASKS at once per connection; more is refused with `overloaded`.

        The task belongs to the connection's current session: ending the session (expiry,
        re-authentication, revocation) cancels it, so nothing a session started outlives it.
        """
        if conn.background_tasks >= MAX_BACKGROUND_TASKS:
            raise self.overload(
                f"at most {MAX_BACKGROUND_TASKS} tool calls and downloads at once per"
                " connection: wait for one to finish, then retry"
            )
        conn.background_tasks += 1
        scope = trio.CancelScope()
        conn.session_tasks[scope] = None

        async def run() -> None:
            try:
                with scope:
                    await fn(*args)
            finally:
                conn.session_tasks.pop(scope, None)
                conn.background_tasks -= 1

        conn.nursery.start_soon(run)


def require_public_keys(sign_pk: bytes, box_pk: bytes) -> None:
    """Refuse a request whose signing or box public key is not 32 bytes."""
    if len(sign_pk) != 32 or len(box_pk) != 32:
        raise RequestRefused(
            wire.ErrorCode.INVALID_REQUEST, "sign_pk and box_pk must be 32-byte public keys"
        )


def refuse(conn: Connection, rid: int | None, code: wire.ErrorCode, message: str) -> None:
    """Answer one request with a typed error frame (logged by code, never by message)."""
    log.info("request_refused", code=code.value, rid=rid, account_id=conn.account_id)
    conn.reply(wire.Error(rid=rid, code=code, message=message))


def where(exc: BaseException) -> str:
    """file:line of the innermost frame: enough to find a bug, never a value from it."""
    tb = leaves(exc)[0].__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "?" if tb is None else f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
