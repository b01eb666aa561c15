"""Who a connection speaks for, and the rule that a session ends everything it opened.

A connection is bound to an account by a login or a token (`bind`). What it opens under that
binding — subscriptions, artifact uploads, tool calls and downloads in progress — belongs to the
session, and ends with it, at once (SO-5, SO-6):

- expiry: each bound connection has a timer (relay/_timers.py) that fires at the session's
  expiry, not merely at the next request, so a quiet subscription stops being fed when its
  session runs out;
- re-authentication as another account: the old account's subscriptions and uploads end before
  the new binding takes effect, so nothing opened under one account keeps serving another;
- revocation of an agent: every connection bound to it is closed (4003), and every subscription
  of the agent anywhere in the fan-out ends, whichever connection opened it;
- a person ending every session of their account, or changing the login password: the
  account's session generation moves on (in the ledger, so every token issued before is refused
  by `authenticate`), and every connection bound to the account loses its session at once (the
  connection stays open; its client may log in again). A login or authentication that read the
  account before the change and binds after it is refused (`bind` checks the generation).

The by-account index lets a login count its own account's connections (the per-account cap)
and lets revocation find them, without scanning every open connection.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Final

import structlog

from model import wire
from model.authz import Standing
from model.membership import MemberKind
from relay import _auth
from relay._context import RequestRefused

if TYPE_CHECKING:
    from collections.abc import Callable

    from ledger import AccountRow
    from relay._connection import Connection
    from relay._context import Services

log = structlog.get_logger("cozy.relay")

AGENT_REVOKED_CODE: Final = wire.CloseCode.AGENT_REVOKED
SESSION_EXPIRED: Final = "session expired: log in again"
SESSIONS_ENDED: Final = (
    "this session was ended (every session of the account was ended, or its login password"
    " changed): log in again"
)


class Sessions:
    def __init__(self, services: Services, *, on_end: Callable[[Connection, str], None]) -> None:
        self._s = services
        # Called with (connection, reason) when a session ends: the roles that keep per-session
        # state (subscriptions, uploads) drop theirs.
        self._on_end = on_end
        # Connections by the account they were bound to. An entry may be stale (the session
        # expired: `account_id` went to None); every use re-checks `account_id`, and the entry
        # goes when the connection does or rebinds.
        self._by_account: dict[str, set[Connection]] = {}
        self._filed_under: dict[Connection, str] = {}
        # Account -> the session generation its sessions were last ended at (end_account): a
        # binding made from an account row older than that is refused. One int per account that
        # ever ended its sessions while this relay ran.
        self._ended_at: dict[str, int] = {}

    # --- the standing of a connection -----------------------------------------------------------

    def standing(self, conn: Connection) -> tuple[Standing, str | None]:
        """(who the connection speaks for now, why the relay ended its last session if it did).

        An expired session is ended here too, in case its watch has not run yet.
        """
        if conn.account_id is None:
            return Standing.ANONYMOUS, conn.session_ended
        if time.time() >= conn.session_expires_at:
            self.end(conn, SESSION_EXPIRED)
            return Standing.ANONYMOUS, SESSION_EXPIRED
        return (Standing.AGENT if conn.account_kind is MemberKind.AGENT else Standing.HUMAN), None

    @staticmethod
    def account_of(conn: Connection) -> str:
        """The bound account of a connection the dispatcher already admitted."""
        assert conn.account_id is not None, "authorized requests come from a bound connection"
        return conn.account_id

    # --- binding --------------------------------------------------------------------------------

    async def authenticate(self, conn: Connection, req: wire.Authenticate) -> None:
        try:
            claims = _auth.verify_token(self._s.config.jwt_signing_key.value, req.token)
        except _auth.AuthError as exc:
            self._s.auth_counters.failed(exc.reason)
            raise RequestRefused(wire.ErrorCode.UNAUTHENTICATED, str(exc)) from None
        row = await self._s.db(self._s.ledger.account_by_id, claims.account_id)
        if row is None:
            self._s.auth_counters.failed("invalid_token")
            raise RequestRefused(
                wire.ErrorCode.UNAUTHENTICATED, "session names an unknown account: log in again"
            )
        is_agent_token = claims.agent_generation is not None
        if is_agent_token != (row.kind == "agent") or (
            is_agent_token and claims.agent_generation != row.token_generation
        ):
            self._s.auth_counters.failed("revoked_token")
            raise RequestRefused(
                wire.ErrorCode.UNAUTHENTICATED,
                "this token was revoked: ask the agent's creator for a new credential file",
            )
        if not is_agent_token and claims.session_generation != row.session_generation:
            self._s.auth_counters.failed("revoked_token")
            raise RequestRefused(wire.ErrorCode.UNAUTHENTICATED, SESSIONS_ENDED)
        self.bind(conn, row, claims.expires)
        conn.reply(wire.Authenticated(rid=req.rid, account_id=claims.account_id))

    def bind(self, conn: Connection, row: AccountRow, expires: int) -> None:
        """Make `row` the connection's account, within the per-account connection limit.

        Binding another account than the current one first ends the current session. A row
        read before the account's sessions were ended (its session generation is older) is
        refused: the login or token it came from was ended meanwhile.
        """
        if row.session_generation < self._ended_at.get(row.account_id, 0):
            self._s.auth_counters.failed("revoked_token")
            raise RequestRefused(wire.ErrorCode.UNAUTHENTICATED, SESSIONS_ENDED)
        if conn.account_id != row.account_id:
            limit = self._s.config.max_connections_per_account
            filed = self._by_account.get(row.account_id, set())
            # The filed set bounds the count from above (it also holds connections that are
            # closing or expired), so the exact count is only needed near the limit: a login
            # costs O(1) below it, not a scan of every open connection.
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
                self._s.connection_refusals += 1
                raise RequestRefused(
                    wire.ErrorCode.TOO_MANY_CONNECTIONS,
                    f"this account already has {held} open connections (at most {limit}):"
                    " close one, or reuse a connection, then retry",
                )
            if conn.account_id is not None:
                self.end(conn, "this connection authenticated as another account")
            self.unfile(conn)
            self._by_account.setdefault(row.account_id, set()).add(conn)
            self._filed_under[conn] = row.account_id
        conn.account_id = row.account_id
        conn.account_kind = MemberKind(row.kind)
        conn.sign_pk = row.sign_pk
        conn.box_pk = row.box_pk
        conn.session_expires_at = expires
        conn.session_ended = None
        self._s.front_door.authenticated(conn)  # off the unauthenticated cap and deadline
        self._changed(conn)

    def unfile(self, conn: Connection) -> None:
        """Take `conn` out of the by-account index (it closed, or binds another account)."""
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        account_id = self._filed_under.pop(conn, None)
        if account_id is not None:
            filed = self._by_account[account_id]
            filed.discard(conn)
            if not filed:
                del self._by_account[account_id]

    def connections_of(self, account_id: str) -> list[Connection]:
        """The open connections bound to `account_id` now."""
        return [c for c in self._by_account.get(account_id, ()) if c.account_id == account_id]

    # --- ending ---------------------------------------------------------------------------------

    def end(self, conn: Connection, reason: str) -> None:
        """End the connection's session and everything it opened; the connection stays open
        (the client may log in again on it)."""
        if conn.account_id is not None:
            log.info("session_ended", account_id=conn.account_id, reason=reason)
        conn.account_id = None
        conn.account_kind = None
        conn.session_ended = reason
        conn.member_of.clear()
        conn.membership_generation += 1
        for scope in list(conn.session_tasks):
            scope.cancel()
        self._on_end(conn, reason)
        self._changed(conn)

    def revoke(self, account_id: str, reason: str) -> None:
        """An agent's tokens were revoked: close its connections and end its subscriptions
        wherever they are."""
        for conn in self.connections_of(account_id):
            self.end(conn, reason)
            conn.close_gracefully(AGENT_REVOKED_CODE, reason)
        self._s.fanout.evict_account(account_id, reason)

    def end_account(
        self, account_id: str, generation: int, reason: str, *, keep: Connection | None = None
    ) -> int:
        """A person's sessions were ended in the ledger at `generation`: end the session of every
        connection bound to the account (all but `keep`, whose session goes on under a new
        token), and refuse bindings from older account rows. Returns how many ended."""
        self._ended_at[account_id] = max(generation, self._ended_at.get(account_id, 0))
        ended = 0
        for conn in self.connections_of(account_id):
            if conn is not keep:
                self.end(conn, reason)
                ended += 1
        if keep is None:
            self._s.fanout.evict_account(account_id, reason)
        return ended

    def renew(self, conn: Connection, expires: int) -> None:
        """The connection's session goes on under a fresh token expiring at `expires`."""
        conn.session_expires_at = expires
        self._changed(conn)

    def _changed(self, conn: Connection) -> None:
        """The session was bound, renewed or ended: (re)arm its expiry timer, if bound."""
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        if conn.account_id is not None:
            left = conn.session_expires_at - time.time()
            conn.expiry = self._s.timers.call_later(left, partial(self._expire, conn))

    def _expire(self, conn: Connection) -> None:
        """The session's expiry timer fired: end it, unless the wall clock says not yet."""
        conn.expiry = None
        if conn.account_id is None:
            return
        if time.time() >= conn.session_expires_at:
            self.end(conn, SESSION_EXPIRED)
        else:  # Trio's clock ran ahead of the wall clock: wait for the rest
            self._changed(conn)
