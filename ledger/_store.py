"""The append-only Postgres ledger, driven by sync psycopg 3.

Every method here blocks: the relay calls them through `trio.to_thread.run_sync` so the event
loop never waits on the database (ADR-0002). Each method is one transaction; on any error the
transaction rolls back and nothing is half-written. Driver errors are translated into
`ledger.errors` with ``raise … from`` (`ledger._db`) so callers never handle psycopg's types.

`Ledger` owns the connection pool; its methods come by role from mixins: accounts and
keystores (`ledger._accounts`), collabs and their membership (`ledger._collabs`, the projection
in `ledger._projection`), event appends and reads (`ledger._events`), integrity checks
(`ledger._integrity`), artifacts (`ledger._artifacts`) and login throttling
(`ledger._throttle`).
"""

from __future__ import annotations

import psycopg
from psycopg_pool import ConnectionPool

from ledger._accounts import Accounts
from ledger._artifacts import Artifacts
from ledger._collabs import Collabs
from ledger._db import _translated
from ledger._events import Events
from ledger._integrity import Integrity
from ledger._migrations import MIGRATIONS
from ledger._throttle import LoginThrottle
from ledger.errors import SchemaTooNew

_MIGRATION_LOCK = 0x636F7A79  # "cozy": one advisory lock key for schema changes


def migrate(conninfo: str) -> list[int]:
    """Apply every migration this code knows and the database lacks. Returns those applied."""
    applied: list[int] = []
    with _translated(), psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            known = {v for v, _, _ in MIGRATIONS}
            if done - known:
                raise SchemaTooNew(
                    f"the database has migrations {sorted(done - known)} this relay does not know; "
                    "run the newer relay that applied them"
                )
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


class Ledger(Accounts, Collabs, Events, Integrity, LoginThrottle, Artifacts):
    """Blocking access to the ledger through a small connection pool. Thread-safe."""

    def __init__(self, conninfo: str, *, max_connections: int = 8) -> None:
        self._pool = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_connections,
            open=False,
            kwargs={"autocommit": False},
        )

    def open(self) -> None:
        """Connect and check the schema. Raises `SchemaNotReady` / `LedgerUnavailable`."""
        with _translated():
            self._pool.open(wait=True, timeout=30)
            with self._pool.connection() as conn:
                conn.execute("SELECT 1 FROM events LIMIT 0")

    def close(self) -> None:
        self._pool.close()

    def durability_settings(self) -> dict[str, str]:
        """The crash-safety settings as the ledger's own sessions see them (per-database and
        per-role overrides included): ``fsync``, ``full_page_writes``, ``synchronous_commit``."""
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["fsync", "full_page_writes", "synchronous_commit"],),
            ).fetchall()
        return {str(name): str(setting) for name, setting in rows}

    def ping(self, timeout: float) -> None:
        """One `SELECT 1` through the pool, for readiness checks; waits at most `timeout`
        seconds for a pooled connection. Raises `LedgerUnavailable` when the database cannot
        be reached (a connection the server dropped is discarded by the pool on the way out)."""
        with _translated(), self._pool.connection(timeout=timeout) as conn:
            conn.execute("SELECT 1")
