"""Login throttling state: failed logins per handle, in the `login_failures` table (SO-6).

Rows are keyed by a *handle key*: a keyed hash of the handle string as the client typed it,
made by the relay with a key that is not in the database (relay/_throttle.py). So the table
holds no handle in clear — not even a password someone typed into the handle field — and a
thief with only the database cannot test guesses against it. Rows exist whether or not an
account has that handle, so neither the table nor anything computed from it tells which
handles exist; rows older than the policy's window are pruned (`prune_login_failures`). The
policy (how many failures are free, how the lock grows, the hourly cap) belongs to the relay and
is passed in as a `LoginPolicy`; the arithmetic is the pure function `after_failure`. Every
timestamp comes from the database clock (``now()``), so several relays on one database agree on
every lock whatever their own clocks say.

`LoginThrottle` is a mixin of `ledger.Ledger`: like every ledger method, each of its methods
blocks, runs one transaction and raises only `ledger.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import msgspec

from ledger._db import _translated

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    """How failed logins are throttled. The relay owns the numbers (`relay._throttle`)."""

    free_failures: int
    """Consecutive failures that cost nothing extra."""
    base_delay: float
    """Seconds locked after the first failure beyond the free ones; doubles with each more."""
    max_delay: float
    """Cap on that lock, in seconds."""
    window_cap: int
    """Failures per window that may reach the password verifier; then locked to window end."""
    window_seconds: float
    """The window opens at the first failure after the previous window closed."""

    def delay_after(self, failures: int) -> float:
        """Seconds of lock after `failures` consecutive failures (0.0 while they are free)."""
        beyond = failures - self.free_failures
        if beyond <= 0:
            return 0.0
        return min(self.base_delay * 2.0 ** min(beyond - 1, 64), self.max_delay)

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.window_seconds)


@dataclass(frozen=True, slots=True)
class FailureState:
    """One handle's stored throttle state (the columns `after_failure` reads and writes)."""

    failures: int
    window_start: datetime
    window_failures: int
    locked_until: datetime | None


class LockoutRow(msgspec.Struct, frozen=True):
    """A handle key whose throttle is in effect, as operators see it. Times are Unix epoch
    seconds. The handle itself is not stored: the relay's operator command names the rows that
    belong to existing accounts by recomputing their keys.

    `window_failures` counts the failures of the current hourly window (0 once it closed);
    `locked_until` is None unless the handle is locked right now.
    """

    handle_key: bytes
    failures: int
    window_failures: int
    locked_until: float | None
    last_failure_at: float


def after_failure(state: FailureState, now: datetime, policy: LoginPolicy) -> FailureState:
    """The state after one more failed login at `now` (the database's clock). Pure.

    A lock already running (set by another relay's concurrent failure) is never shortened.
    """
    window_start, window_failures = state.window_start, state.window_failures
    if now >= window_start + policy.window:
        window_start, window_failures = now, 0
    failures = state.failures + 1
    window_failures += 1
    ends = [t for t in (state.locked_until,) if t is not None and t > now]
    delay = policy.delay_after(failures)
    if delay > 0:
        ends.append(now + timedelta(seconds=delay))
    if window_failures >= policy.window_cap:
        ends.append(window_start + policy.window)
    return FailureState(failures, window_start, window_failures, max(ends, default=None))


class LoginThrottle:
    """Failed-login bookkeeping per handle key, for `ledger.Ledger` (a mixin)."""

    _pool: ConnectionPool[psycopg.Connection[TupleRow]]

    def login_wait(self, handle_key: bytes) -> float:
        """Seconds the handle must still wait before a login may be verified; 0.0 if allowed."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT greatest(0, extract(epoch FROM locked_until - now()))::float8"
                " FROM login_failures WHERE handle_key = %s",
                (handle_key,),
            ).fetchone()
        return 0.0 if r is None or r[0] is None else float(r[0])

    def record_login_failure(self, handle_key: bytes, *, policy: LoginPolicy) -> float:
        """Count one failed login for the handle; returns the seconds it is now locked for.

        Concurrent failures for one handle (from any relay) are serialized on its row.
        """
        with _translated(), self._pool.connection() as conn:
            # Insert-if-missing first so that there is always a row to lock: a new handle's
            # row starts with a fresh window (window_start = now(), no failures).
            conn.execute(
                "INSERT INTO login_failures (handle_key) VALUES (%s)"
                " ON CONFLICT (handle_key) DO NOTHING",
                (handle_key,),
            )
            r = conn.execute(
                "SELECT now(), failures, window_start, window_failures, locked_until"
                " FROM login_failures WHERE handle_key = %s FOR UPDATE",
                (handle_key,),
            ).fetchone()
            assert r is not None
            now: datetime = r[0]
            new = after_failure(FailureState(r[1], r[2], r[3], r[4]), now, policy)
            conn.execute(
                "UPDATE login_failures SET failures = %s, window_start = %s,"
                " window_failures = %s, locked_until = %s, last_failure_at = now()"
                " WHERE handle_key = %s",
                (new.failures, new.window_start, new.window_failures, new.locked_until, handle_key),
            )
        if new.locked_until is None:
            return 0.0
        return max(0.0, (new.locked_until - now).total_seconds())

    def record_login_success(self, handle_key: bytes) -> None:
        """A successful login resets the consecutive failures (not the hourly window's count).

        A lock is left as it is: one still running was set by a concurrent failure and stands.
        """
        with _translated(), self._pool.connection() as conn:
            conn.execute(
                "UPDATE login_failures SET failures = 0 WHERE handle_key = %s AND failures > 0",
                (handle_key,),
            )

    def clear_login_failures(self, handle_key: bytes, *, policy: LoginPolicy) -> bool:
        """Forget everything about the handle (an operator lifting a lock, hourly cap included).

        True when its throttle was in effect (locked, or failures counted); False when there
        was nothing to clear.
        """
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "DELETE FROM login_failures WHERE handle_key = %(key)s RETURNING"
                " failures > 0 OR locked_until > now()"
                " OR (window_failures > 0 AND window_start + %(window)s > now())",
                {"key": handle_key, "window": policy.window},
            ).fetchone()
        return r is not None and bool(r[0])

    def list_login_lockouts(self, *, policy: LoginPolicy) -> list[LockoutRow]:
        """Every handle key whose throttle is in effect, most recent failure first.

        In effect: locked now, consecutive failures counted, or failures in an open window.
        """
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT handle_key, failures,"
                " CASE WHEN window_start + %(window)s > now() THEN window_failures ELSE 0 END,"
                " CASE WHEN locked_until > now()"
                "  THEN extract(epoch FROM locked_until)::float8 END,"
                " extract(epoch FROM last_failure_at)::float8"
                " FROM login_failures WHERE failures > 0 OR locked_until > now()"
                "  OR (window_failures > 0 AND window_start + %(window)s > now())"
                " ORDER BY last_failure_at DESC, handle_key",
                {"window": policy.window},
            ).fetchall()
        return [LockoutRow(bytes(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def prune_login_failures(self, *, policy: LoginPolicy) -> int:
        """Delete the records that no longer throttle anything: no failure for a whole window
        and no lock still running. Returns how many went. (A handle that comes back after
        that starts from zero consecutive failures, as after a successful login.)"""
        with _translated(), self._pool.connection() as conn:
            return conn.execute(
                "DELETE FROM login_failures WHERE last_failure_at < now() - %(window)s"
                " AND (locked_until IS NULL OR locked_until <= now())",
                {"window": policy.window},
            ).rowcount

    def update_password_hash(
        self, account_id: str, new_hash: str, *, replaces: str | None = None
    ) -> bool:
        """Store a fresh password hash (an Argon2id rehash with current parameters).

        With `replaces`, only if the stored hash is still that one, so a rehash can never undo
        a password change that happened meanwhile. True when a row was updated.
        """
        with _translated(), self._pool.connection() as conn:
            cur = conn.execute(
                "UPDATE accounts SET password_hash = %s"
                " WHERE account_id = %s AND (%s::text IS NULL OR password_hash = %s)",
                (new_hash, account_id, replaces, replaces),
            )
            return cur.rowcount == 1
