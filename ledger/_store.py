"""The append-only Postgres ledger, driven by sync psycopg 3.

Every method here blocks: the relay calls them through `trio.to_thread.run_sync` so the event
loop never waits on the database (ADR-0002). Each method is one transaction; on any error the
transaction rolls back and nothing is half-written. Driver errors are translated into
`ledger.errors` with ``raise … from`` so callers never handle psycopg's types.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from ledger._artifacts import Artifacts
from ledger._db import _translated
from ledger._migrations import MIGRATIONS
from ledger._throttle import LoginThrottle
from ledger.errors import (
    AlreadyExists,
    HandleTaken,
    KeysChanged,
    LedgerUnavailable,
    SchemaTooNew,
    SequencingConflict,
    StaleVersion,
)
from model import chain as chainmod
from model.envelope import (
    KIND_DM,
    KIND_MANAGEMENT,
    SequencedEvent,
    SignedEvent,
    audience_of,
    decode_body,
    event_id,
    verify_event,
)
from model.errors import ModelError
from model.membership import Membership, apply, proof_of, signer_key
from model.sequencer import Assignment, assign

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from model.envelope import VerifiedEvent

_ACCOUNT_COLUMNS = (
    "SELECT account_id, handle, password_hash, sign_pk, box_pk, kind, created_by,"
    " token_generation, session_generation FROM accounts"
)
_ACCOUNT_BY_HANDLE = _ACCOUNT_COLUMNS + " WHERE handle = %s"
_ACCOUNT_BY_ID = _ACCOUNT_COLUMNS + " WHERE account_id = %s"
# How long a commit whose reply was lost may take to settle before the append is refused.
SETTLE_SECONDS = 5.0
_MIGRATION_LOCK = 0x636F7A79  # "cozy": one advisory lock key for schema changes
_EVENT_ID_UNIQUE = "events_event_id_key"  # the UNIQUE (event_id) of migration 1


class Page(NamedTuple):
    """One page of a collab's events (`Ledger.read_page`); `more`: the ledger held more."""

    events: list[SequencedEvent]
    more: bool


class AccountRow(msgspec.Struct, frozen=True):
    account_id: str
    handle: str
    password_hash: str
    sign_pk: bytes
    box_pk: bytes
    kind: str = "human"  # or "agent": created by `created_by`, authenticates with agent tokens
    created_by: str | None = None
    token_generation: int = 0  # agent tokens carry it; revocation bumps it
    session_generation: int = 0  # a person's session tokens carry it; ending sessions bumps it

    def __repr__(self) -> str:
        return f"AccountRow(account_id={self.account_id!r}, handle={self.handle!r})"


class AgentRow(msgspec.Struct, frozen=True):
    """An agent as its creator lists it. `created_at` in seconds since the epoch."""

    account_id: str
    handle: str
    created_at: int
    revoked: bool  # every token issued to it is refused (revocation is final)


class KeystoreRow(msgspec.Struct, frozen=True):
    """A sealed keystore as stored: opaque to the relay, signed by the account key."""

    version: int
    blob: bytes
    sig: bytes

    def __repr__(self) -> str:
        return f"KeystoreRow(version={self.version}, <{len(self.blob)} bytes>)"


class StoredAt(NamedTuple):
    """Where an event the ledger holds was stored, and who authored it (`Ledger.stored_at`)."""

    collab_id: str
    seq: int
    chain: bytes
    actor_id: str


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """One collab's batch: its events and the head the sequencer believes is current.

    `membership`, when set, is the membership after this batch (a `mgmt` event changed it):
    the projection rows are replaced in the same transaction as the events.
    """

    collab_id: str
    head: chainmod.Head
    events: Sequence[VerifiedEvent]
    membership: Membership | None = None


@dataclass
class ProjectionReport:
    """What `rebuild_projections` found: collabs whose stored projection differed."""

    collabs: int = 0
    repaired: list[str] = field(default_factory=list)


@dataclass
class LedgerReport:
    """What `verify_ledger` found. `ok` only when every collab's chain recomputed exactly."""

    collabs: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


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


class Ledger(LoginThrottle, Artifacts):
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

    # --- accounts -----------------------------------------------------------------------------

    def create_account(self, row: AccountRow, keystore: KeystoreRow | None = None) -> None:
        """Create the account and, when given, its keystore (version 1) in one transaction."""
        with _translated(), self._pool.connection() as conn:
            try:
                conn.execute(
                    "INSERT INTO accounts (account_id, handle, password_hash, sign_pk, box_pk,"
                    " kind, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (row.account_id, row.handle, row.password_hash, row.sign_pk, row.box_pk,
                     row.kind, row.created_by),
                )  # fmt: skip
                if keystore is not None:
                    conn.execute(
                        "INSERT INTO keystores (account_id, version, blob, sig)"
                        " VALUES (%s, %s, %s, %s)",
                        (row.account_id, keystore.version, keystore.blob, keystore.sig),
                    )
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name == "accounts_handle_key":
                    raise HandleTaken(f"the handle {row.handle!r} is taken; pick another") from exc
                raise AlreadyExists("an account with this id exists already") from exc

    def revoke_agent(self, agent_id: str, creator_id: str) -> int | None:
        """Bump an agent's token generation (every token issued before is refused). Only its
        creator may; returns the new generation, or None when there is no such agent of theirs."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "UPDATE accounts SET token_generation = token_generation + 1"
                " WHERE account_id = %s AND kind = 'agent' AND created_by = %s"
                " RETURNING token_generation",
                (agent_id, creator_id),
            ).fetchone()
        return None if r is None else int(r[0])

    def agents_of(self, creator_id: str, *, limit: int) -> list[AgentRow]:
        """The first `limit` agents `creator_id` created, oldest first, revoked ones included."""
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT account_id, handle, created_at, token_generation > 0 FROM accounts"
                " WHERE kind = 'agent' AND created_by = %s ORDER BY created_at, account_id"
                " LIMIT %s",
                (creator_id, limit),
            ).fetchall()
        return [AgentRow(r[0], r[1], int(r[2].timestamp()), bool(r[3])) for r in rows]

    def end_sessions(self, account_id: str, *, password_hash: str | None = None) -> int | None:
        """Bump a person's session generation, so every session token issued before is refused;
        with `password_hash`, store it as the new login password in the same statement.

        Returns the new generation, or None when there is no such (human) account.
        """
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "UPDATE accounts SET session_generation = session_generation + 1,"
                " password_hash = coalesce(%s, password_hash)"
                " WHERE account_id = %s AND kind = 'human' RETURNING session_generation",
                (password_hash, account_id),
            ).fetchone()
        return None if r is None else int(r[0])

    # --- keystores -----------------------------------------------------------------------------

    def keystore(self, account_id: str) -> KeystoreRow | None:
        """The stored keystore (``blob`` empty once deleted), or None if there never was one."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT version, blob, sig FROM keystores WHERE account_id = %s", (account_id,)
            ).fetchone()
        return None if r is None else KeystoreRow(r[0], bytes(r[1] or b""), bytes(r[2]))

    def put_keystore(self, account_id: str, new: KeystoreRow) -> None:
        """Store `new` if its version is exactly one above the stored one (1 if none).

        The caller has verified the account key's signature. Raises `StaleVersion` naming the
        stored version otherwise; nothing is written then.
        """
        with _translated(), self._pool.connection() as conn:
            self._put_keystore_in(conn, account_id, new)

    @staticmethod
    def _put_keystore_in(conn: psycopg.Connection[Any], account_id: str, new: KeystoreRow) -> None:
        r = conn.execute(
            "SELECT version FROM keystores WHERE account_id = %s FOR UPDATE", (account_id,)
        ).fetchone()
        current = 0 if r is None else int(r[0])
        if new.version != current + 1:
            raise StaleVersion(current)
        conn.execute(
            "INSERT INTO keystores (account_id, version, blob, sig) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (account_id) DO UPDATE SET version = EXCLUDED.version,"
            " blob = EXCLUDED.blob, sig = EXCLUDED.sig, updated_at = now()",
            (account_id, new.version, new.blob or None, new.sig),
        )

    def rotate_account_keys(
        self,
        account_id: str,
        old: tuple[bytes, bytes],
        new: tuple[bytes, bytes],
        keystore: KeystoreRow,
    ) -> None:
        """Replace the account's (sign_pk, box_pk) `old` by `new` and store `keystore` (the
        next version) with them, in one transaction (ADR-0017).

        The caller has verified the old and new keys' signatures. Raises `KeysChanged` when
        the stored keys are not `old` (another rotation won), `StaleVersion` when the keystore
        version is not the next one; nothing is written then.
        """
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT sign_pk, box_pk FROM accounts WHERE account_id = %s FOR UPDATE",
                (account_id,),
            ).fetchone()
            if r is None or (bytes(r[0]), bytes(r[1])) != old:
                raise KeysChanged("the account's keys changed meanwhile")
            self._put_keystore_in(conn, account_id, keystore)
            conn.execute(
                "UPDATE accounts SET sign_pk = %s, box_pk = %s WHERE account_id = %s",
                (new[0], new[1], account_id),
            )

    def collabs_of(self, account_id: str) -> list[str]:
        """The collabs the account is a member of, as projected from the ledger."""
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT collab_id FROM collab_members WHERE account_id = %s ORDER BY 1",
                (account_id,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def account_by_handle(self, handle: str) -> AccountRow | None:
        return self._account("handle", handle)

    def account_by_id(self, account_id: str) -> AccountRow | None:
        return self._account("account_id", account_id)

    def account_handles(self) -> list[str]:
        """Every account's handle (operator tools name lockouts with them)."""
        with _translated(), self._pool.connection() as conn:
            return [str(r[0]) for r in conn.execute("SELECT handle FROM accounts ORDER BY handle")]

    def _account(self, column: str, value: str) -> AccountRow | None:
        query = _ACCOUNT_BY_HANDLE if column == "handle" else _ACCOUNT_BY_ID
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(query, (value,)).fetchone()
        if r is None:
            return None
        return AccountRow(
            r[0], r[1], r[2], bytes(r[3]), bytes(r[4]), r[5], r[6], int(r[7]), int(r[8])
        )

    # --- collabs ------------------------------------------------------------------------------

    def create_collab(self, genesis: VerifiedEvent, membership: Membership) -> chainmod.Head:
        """Create a collab from its verified genesis `mgmt` event (seq 1) and its folded
        membership, in one transaction. Raises `AlreadyExists` if the collab exists."""
        collab_id = genesis.body.collab_id
        head = chainmod.start_of(collab_id)
        chain = chainmod.next_head(head.chain, genesis.event_id)
        with _translated(), self._pool.connection() as conn:
            try:
                conn.execute(
                    "INSERT INTO collabs (collab_id, created_by) VALUES (%s, %s)",
                    (collab_id, genesis.body.actor_id),
                )
            except psycopg.errors.UniqueViolation as exc:
                raise AlreadyExists("that collab exists already") from exc
            b = genesis.body
            _copy_events(
                conn,
                [(collab_id, 1, genesis.event_id, b.actor_id, b.kind, b.ts, genesis.signed.body,
                  genesis.signed.sig, chain)],
            )  # fmt: skip
            _write_projection(conn, membership)
        return chainmod.Head(1, chain)

    def member(self, collab_id: str, account_id: str) -> tuple[str, tuple[str, ...]] | None:
        """(kind, capabilities) of a member as projected, None if not a member."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT kind, caps FROM collab_members WHERE collab_id = %s AND account_id = %s",
                (collab_id, account_id),
            ).fetchone()
        return None if r is None else (str(r[0]), tuple(r[1]))

    def members(self, collab_id: str) -> tuple[int, dict[str, tuple[str, str]]] | None:
        """The projected (epoch, {account: (role, kind)}) of a collab, None if it does not exist."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute("SELECT epoch FROM collabs WHERE collab_id = %s", (collab_id,))
            row = r.fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT account_id, role, kind FROM collab_members WHERE collab_id = %s",
                (collab_id,),
            ).fetchall()
        return int(row[0]), {a: (role, kind) for a, role, kind in rows}

    def collab_ids(self) -> list[str]:
        with _translated(), self._pool.connection() as conn:
            return [r[0] for r in conn.execute("SELECT collab_id FROM collabs ORDER BY 1")]

    def membership(self, collab_id: str) -> Membership | None:
        """Fold the collab's `mgmt` events from the ledger (None if it has none)."""
        with _translated(), self._pool.connection() as conn:
            return _fold_membership(conn, collab_id)

    def head_and_membership(self, collab_id: str) -> tuple[chainmod.Head, Membership | None]:
        """The collab's head and its membership folded from the ledger, from one snapshot.

        One REPEATABLE READ transaction, so both describe the same ledger: a change committed by
        anyone between the two reads cannot give a head past a change the fold did not see."""
        with _translated(), self._pool.connection() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            folded = _fold_membership(conn, collab_id)
            r = conn.execute(
                "SELECT seq, chain FROM events WHERE collab_id = %s ORDER BY seq DESC LIMIT 1",
                (collab_id,),
            ).fetchone()
        head = chainmod.start_of(collab_id) if r is None else chainmod.Head(r[0], bytes(r[1]))
        return head, folded

    def rebuild_projections(self, collab_ids: Sequence[str] | None = None) -> ProjectionReport:
        """Recompute membership, roles and epochs from the events; rewrite what differs.

        One transaction per collab, under the collab row's lock, so a concurrent membership
        change either lands before the fold or waits for it.
        """
        report = ProjectionReport()
        for collab_id in self.collab_ids() if collab_ids is None else collab_ids:
            with _translated(), self._pool.connection() as conn:
                conn.execute("SELECT 1 FROM collabs WHERE collab_id = %s FOR UPDATE", (collab_id,))
                folded = _fold_membership(conn, collab_id)
                if folded is None:
                    continue
                report.collabs += 1
                if _read_projection(conn, collab_id) != _projection_of(folded):
                    _write_projection(conn, folded)
                    report.repaired.append(collab_id)
        return report

    # --- events -------------------------------------------------------------------------------

    def head(self, collab_id: str) -> chainmod.Head:
        """The last sequenced position of a collab (the genesis head when it has no events)."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT seq, chain FROM events WHERE collab_id = %s ORDER BY seq DESC LIMIT 1",
                (collab_id,),
            ).fetchone()
        return chainmod.start_of(collab_id) if r is None else chainmod.Head(r[0], bytes(r[1]))

    def stored_at(self, event_ids: Sequence[bytes]) -> dict[bytes, StoredAt]:
        """Where each of `event_ids` that the ledger holds is stored (ids it lacks are absent).

        The identity lookup behind idempotent appends: a resent event is answered with its
        stored position whatever has changed since (relay/_sequencer.py, relay/_dispatch.py).
        """
        if not event_ids:
            return {}
        with _translated(), self._pool.connection() as conn:
            return {
                bytes(r[0]): StoredAt(r[1], r[2], bytes(r[3]), r[4])
                for r in conn.execute(
                    "SELECT event_id, collab_id, seq, chain, actor_id FROM events"
                    " WHERE event_id = ANY(%s)",
                    (list(event_ids),),
                )
            }

    def append_batch(
        self, collab_id: str, head: chainmod.Head, events: Sequence[VerifiedEvent]
    ) -> tuple[chainmod.Head, list[Assignment]]:
        """`append_batches` for a single collab."""
        return self.append_batches([AppendRequest(collab_id, head, events)])[0]

    def append_batches(
        self, requests: Sequence[AppendRequest]
    ) -> list[tuple[chainmod.Head, list[Assignment]]]:
        """Sequence and persist batches of several collabs in one transaction (group commit).

        Ids the ledger already holds get their original position back (idempotent retries);
        new ids get contiguous seqs after their request's head. Returns, per request, the new
        head and one assignment per event, in order. Raises `SequencingConflict` naming the
        collabs whose head was stale (another writer got there first); then nothing at all was
        written and the caller may retry the other requests.
        """
        if len({r.collab_id for r in requests}) != len(requests):
            raise ValueError("append_batches takes at most one request per collab")
        if any(e.body.collab_id != r.collab_id for r in requests for e in r.events):
            raise ValueError("an event was routed to a collab other than the one it names")
        all_ids = [e.event_id for r in requests for e in r.events]
        results: list[tuple[chainmod.Head, list[Assignment]]] = []
        xid: str | None = None  # set once COMMIT is about to be sent
        try:
            with _translated(), self._pool.connection() as conn:
                # Fast path: assume no id is stored yet (retries are rare) and let the unique
                # index on event_id say otherwise; only then look the ids up and redo it. This
                # saves a round trip and an index probe per event on every group commit.
                rows = self._append_in(conn, requests, all_ids, results, lookup=False)
                if rows is None:
                    results.clear()
                    rows = self._append_in(conn, requests, all_ids, results, lookup=True)
                    assert rows is not None
                if rows:
                    # Remember this transaction's id before committing: if the connection drops
                    # while COMMIT is in flight, the outcome is unknown, and the id is how we
                    # find it out (below) instead of guessing.
                    r = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
                    assert r is not None
                    xid = str(r[0])
                    conn.commit()
        except LedgerUnavailable:
            if xid is None:
                raise  # failed before COMMIT was sent: the server rolls the transaction back
            self._settle_commit(xid, results)
        return results

    def _append_in(
        self,
        conn: psycopg.Connection[Any],
        requests: Sequence[AppendRequest],
        all_ids: list[bytes],
        results: list[tuple[chainmod.Head, list[Assignment]]],
        *,
        lookup: bool,
    ) -> list[tuple[object, ...]] | None:
        """`append_batches` inside its transaction: look up, assign, COPY (no commit).

        Returns the rows written. With ``lookup=False`` no stored id is looked up first; if
        one turns out to be stored (a retry), the transaction is rolled back and None returned,
        so the caller redoes it with the lookup.
        """
        rows: list[tuple[object, ...]] = []
        known: dict[bytes, tuple[int, bytes]] = {}
        if lookup:
            # event ids are globally unique (the body names its collab): one lookup serves all.
            known = {
                bytes(r[0]): (r[1], bytes(r[2]))
                for r in conn.execute(
                    "SELECT event_id, seq, chain FROM events WHERE event_id = ANY(%s)", (all_ids,)
                )
            }
        for req in requests:
            new_head, assignments = assign(req.head, [e.event_id for e in req.events], known)
            results.append((new_head, assignments))
            rows.extend(
                (req.collab_id, a.seq, a.event_id, e.body.actor_id, e.body.kind, e.body.ts,
                 e.signed.body, e.signed.sig, a.chain)
                for a, e in zip(assignments, req.events, strict=True)
                if not a.duplicate
            )  # fmt: skip
        if rows:
            try:
                _copy_events(conn, rows)
                for req in requests:
                    if req.membership is not None:
                        _write_projection(conn, req.membership)
            except psycopg.errors.UniqueViolation as exc:
                conn.rollback()
                if not lookup and exc.diag.constraint_name == _EVENT_ID_UNIQUE:
                    return None  # an id is stored already: redo with the lookup
                stale = _stale_collabs(conn, requests)
                raise SequencingConflict(
                    f"collabs {stale} were appended to by another writer", stale
                ) from exc
        return rows

    def _settle_commit(
        self, xid: str, results: list[tuple[chainmod.Head, list[Assignment]]]
    ) -> None:
        """The connection failed while COMMIT was in flight: did transaction `xid` commit?

        The server may have committed and lost only its reply (a backend terminated during
        commit, a network cut), or never committed. Acking on a guess would either lose an
        acked event or refuse a stored one, so ask Postgres (``pg_xact_status``, on another
        connection; a transaction still in progress is waited for, up to SETTLE_SECONDS), then
        read the new rows back by event id. Returns normally only when every row of `results`
        is stored where it was assigned; raises `LedgerUnavailable` when it was not committed
        or the outcome cannot be learnt now (the caller refuses; the author's retry is
        idempotent, and the sequencer re-reads its head from the ledger before writing again).
        """
        new = {
            a.event_id: (a.seq, a.chain)
            for _, assignments in results
            for a in assignments
            if not a.duplicate
        }
        deadline = time.monotonic() + SETTLE_SECONDS
        try:
            with _translated(), self._pool.connection(timeout=SETTLE_SECONDS) as conn:
                while True:
                    r = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
                    status = None if r is None else r[0]
                    if status != "in progress" or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                found = {
                    bytes(r[0]): (int(r[1]), bytes(r[2]))
                    for r in conn.execute(
                        "SELECT event_id, seq, chain FROM events WHERE event_id = ANY(%s)",
                        (list(new),),
                    )
                }
        except LedgerUnavailable:
            status, found = None, {}
        if status == "committed" and found == new:
            return
        if status == "aborted" and not found:
            raise LedgerUnavailable(
                "the database connection failed while committing and nothing was stored; retry"
            )
        raise LedgerUnavailable(
            "the database connection failed while committing and whether the events were"
            f" stored could not be checked ({status or 'unreachable'}); retry them: appends"
            " are idempotent"
        )

    def read_range(self, collab_id: str, from_seq: int, limit: int) -> list[SequencedEvent]:
        """Events with ``seq >= from_seq`` in seq order, at most `limit` of them."""
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT seq, body, sig, chain, kind FROM events"
                " WHERE collab_id = %s AND seq >= %s ORDER BY seq LIMIT %s",
                (collab_id, from_seq, limit),
            ).fetchall()
        return [_sequenced(collab_id, r) for r in rows]

    def read_page(self, collab_id: str, from_seq: int, max_events: int, max_bytes: int) -> Page:
        """Events from ``from_seq`` on, in seq order: at most `max_events` of them, and no more
        than fit in `max_bytes` (an event's size is its body, signature and chain), except that
        the first event is always included however large. `Page.more` says whether the ledger
        held further events when it was read, so a reader knows it reached the head without
        another round trip.

        Only the page's own bodies are fetched: sizes come from a running sum in seq order
        (Postgres reads a TOASTed body's length without the body), and the one row past the
        page, which sets `more`, comes back without its body.
        """
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT seq,"
                "  CASE WHEN rn <= %(events)s AND (rn = 1 OR run <= %(bytes)s) THEN body END,"
                "  sig, chain, kind"
                " FROM ("
                "  SELECT seq, body, sig, chain, kind, octet_length(body) + 96 AS size,"
                "    row_number() OVER w AS rn, sum(octet_length(body) + 96) OVER w AS run"
                "  FROM events WHERE collab_id = %(collab)s AND seq >= %(from)s"
                "  WINDOW w AS (ORDER BY seq ROWS UNBOUNDED PRECEDING)"
                "  ORDER BY seq LIMIT %(events)s + 1"
                " ) AS page"
                # the page, and the one row after it (never the rows after that one)
                " WHERE rn <= 2 OR run - size <= %(bytes)s"
                " ORDER BY seq",
                {"collab": collab_id, "from": from_seq, "events": max_events, "bytes": max_bytes},
            ).fetchall()
        events = [_sequenced(collab_id, r) for r in rows if r[1] is not None]
        return Page(events, more=len(rows) > len(events))

    # --- integrity ----------------------------------------------------------------------------

    def verify_ledger(self, progress: Callable[[str, int], None] | None = None) -> LedgerReport:
        """Recompute every collab's chain, every event id and every author signature."""
        report = LedgerReport()
        with _translated(), self._pool.connection() as conn:
            keys = {
                r[0]: bytes(r[1]) for r in conn.execute("SELECT account_id, sign_pk FROM accounts")
            }
            collabs = [r[0] for r in conn.execute("SELECT collab_id FROM collabs ORDER BY 1")]
            for collab_id in collabs:
                report.collabs += 1
                head = chainmod.start_of(collab_id)
                with conn.cursor(name="verify_ledger") as cur:
                    cur.itersize = 2000
                    cur.execute(
                        "SELECT seq, event_id, actor_id, kind, ts, body, sig, chain FROM events"
                        " WHERE collab_id = %s ORDER BY seq",
                        (collab_id,),
                    )
                    state: Membership | None = None
                    for seq, eid, actor, kind, ts, body, sig, chain in cur:
                        report.events += 1
                        signed = SignedEvent(bytes(body), bytes(sig))
                        problem = _check_row(
                            collab_id, head, seq, bytes(eid), actor, kind, ts, signed,
                            bytes(chain), _pinned_key(state, actor, kind, signed, keys),
                        )  # fmt: skip
                        if problem:
                            report.problems.append(f"{collab_id} seq {seq}: {problem}")
                        elif kind == KIND_MANAGEMENT:
                            state = _folded(state, signed, head)
                        head = chainmod.Head(seq, bytes(chain))
                if progress is not None:
                    progress(collab_id, head.seq)
            conn.rollback()
        return report


def _fold_membership(conn: psycopg.Connection[Any], collab_id: str) -> Membership | None:
    rows = conn.execute(
        "SELECT e.seq, e.body, e.sig, p.seq, p.chain FROM events e"
        " LEFT JOIN events p ON p.collab_id = e.collab_id AND p.seq = e.seq - 1"
        " WHERE e.collab_id = %s AND e.kind = 'mgmt' ORDER BY e.seq",
        (collab_id,),
    ).fetchall()
    state: Membership | None = None
    for _seq, body, sig, prev_seq, prev_chain in rows:
        placed_after = (
            chainmod.start_of(collab_id)
            if prev_seq is None
            else chainmod.Head(int(prev_seq), bytes(prev_chain))
        )
        signed = SignedEvent(bytes(body), bytes(sig))
        decoded = decode_body(signed.body)
        proof = proof_of(decoded)
        verify_event(signed, signer_key(state, proof), decoded=decoded)
        state = apply(state, proof, placed_after, actor_id=decoded.actor_id)
    return state


Projection = tuple[int, dict[str, tuple[str, str, tuple[str, ...]]]]


def _projection_of(m: Membership) -> Projection:
    return m.epoch, {a: (x.role.value, x.kind.value, x.caps) for a, x in m.members.items()}


def _read_projection(conn: psycopg.Connection[Any], collab_id: str) -> Projection:
    r = conn.execute("SELECT epoch FROM collabs WHERE collab_id = %s", (collab_id,)).fetchone()
    rows = conn.execute(
        "SELECT account_id, role, kind, caps FROM collab_members WHERE collab_id = %s",
        (collab_id,),
    ).fetchall()
    return (0 if r is None else int(r[0])), {
        str(a): (str(ro), str(k), tuple(c)) for a, ro, k, c in rows
    }


def _write_projection(conn: psycopg.Connection[Any], m: Membership) -> None:
    conn.execute("UPDATE collabs SET epoch = %s WHERE collab_id = %s", (m.epoch, m.collab_id))
    conn.execute("DELETE FROM collab_members WHERE collab_id = %s", (m.collab_id,))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO collab_members (collab_id, account_id, role, kind, caps)"
            " VALUES (%s, %s, %s, %s, %s)",
            [
                (m.collab_id, x.account_id, x.role.value, x.kind.value, list(x.caps))
                for x in m.members.values()
            ],
        )


def _copy_events(
    conn: psycopg.Connection[tuple[object, ...]], rows: list[tuple[object, ...]]
) -> None:
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY events (collab_id, seq, event_id, actor_id, kind, ts, body, sig, chain)"
            " FROM STDIN (FORMAT BINARY)"
        ) as copy,
    ):
        copy.set_types(["text", "int8", "bytea", "text", "text", "int8", "bytea", "bytea", "bytea"])
        for row in rows:
            copy.write_row(row)


def _stale_collabs(
    conn: psycopg.Connection[tuple[object, ...]], requests: Sequence[AppendRequest]
) -> list[str]:
    stale = []
    for req in requests:
        r = conn.execute(
            "SELECT seq FROM events WHERE collab_id = %s ORDER BY seq DESC LIMIT 1",
            (req.collab_id,),
        ).fetchone()
        if (0 if r is None else r[0]) != req.head.seq:
            stale.append(req.collab_id)
    return stale


def _pinned_key(
    state: Membership | None, actor: str, kind: str, signed: SignedEvent, keys: dict[str, bytes]
) -> bytes:
    """The key an event at this position must verify under: the one the collab's fold pins
    for its author there (a `rekey` changes it, ADR-0017), or for a management event the
    signer key of its proof; the directory's key only where the fold names none."""
    try:
        if kind == KIND_MANAGEMENT:
            return signer_key(state, proof_of(decode_body(signed.body)))
    except ModelError:
        return keys.get(actor, b"")
    member = None if state is None else state.members.get(actor)
    return member.sign_pk if member is not None else keys.get(actor, b"")


def _folded(
    state: Membership | None, signed: SignedEvent, head: chainmod.Head
) -> Membership | None:
    """The membership after a verified `mgmt` event (unchanged if the fold refuses it: that is
    reported by the signature or chain checks, or by rebuild-projections)."""
    try:
        body = decode_body(signed.body)
        return apply(state, proof_of(body), head, actor_id=body.actor_id)
    except ModelError:
        return state


def _check_row(
    collab_id: str,
    head: chainmod.Head,
    seq: int,
    eid: bytes,
    actor: str,
    kind: str,
    ts: int,
    signed: SignedEvent,
    chain: bytes,
    key: bytes,
) -> str | None:
    if event_id(signed) != eid:
        return "event id is not the hash of the stored event"
    try:
        chainmod.advance(head, seq, eid, chain)
        body = decode_body(signed.body)
        if (body.collab_id, body.actor_id, body.kind, body.ts) != (collab_id, actor, kind, ts):
            return "routing columns disagree with the signed body"
        verify_event(signed, key)
    except ModelError as exc:
        return str(exc)
    return None


def _sequenced(collab_id: str, row: tuple[Any, ...]) -> SequencedEvent:
    """An events row read as (seq, body, sig, chain, kind)."""
    seq, body, sig, chain, kind = row
    return SequencedEvent(
        collab_id,
        seq,
        SignedEvent(bytes(body), bytes(sig)),
        bytes(chain),
        # Only DMs have a narrower audience; their bodies were checked on the way in.
        audience_of(decode_body(bytes(body))) if kind == KIND_DM else (),
    )
