"""Collab events: group-commit appends, reads by position and by id, and each collab's head.

`Events` is a mixin of `ledger.Ledger`; each method blocks, runs one transaction and raises
only `ledger.errors` (`append_batches` also `ValueError` for a misrouted batch). Appends are
idempotent by event id, and a commit whose reply was lost is settled by asking Postgres
(`_settle_commit`) instead of guessing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
import psycopg.errors

from ledger._db import _translated
from ledger._frames import event_prefix, frame_sql
from ledger._projection import _fold_membership, _write_projection
from ledger.errors import LedgerUnavailable, SequencingConflict
from model import chain as chainmod
from model.envelope import KIND_DM, SequencedEvent, SignedEvent, audience_of, decode_body
from model.sequencer import Assignment, assign

if TYPE_CHECKING:
    from collections.abc import Sequence

    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool

    from model.envelope import VerifiedEvent
    from model.membership import Membership

# How long a commit whose reply was lost may take to settle before the append is refused.
SETTLE_SECONDS = 5.0
_EVENT_ID_UNIQUE = "events_event_id_key"  # the UNIQUE (event_id) of migration 1
# A group commit of at most this many events is written in pipeline mode: its whole
# transaction in two round trips (BEGIN, the INSERTs and the transaction id; then COMMIT)
# instead of five (BEGIN, COPY's start and end, the id, COMMIT). Each round trip is also a
# GIL hand-back for the writer's thread, which waits behind the busy Trio loop, so at a
# steady trickle of appends this is most of an append's commit time (docs/performance.md,
# "Where the latency goes"). Larger groups COPY: per row, COPY costs a fraction of an INSERT.
PIPELINED_EVENTS = 16
_INSERT_EVENT = (
    "INSERT INTO events (collab_id, seq, event_id, actor_id, kind, ts, body, sig, chain)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
# Sent as text every time (never a prepared statement): the commit-fault harness
# (tests/fault_harness.py) recognises a transaction that wrote events by it.
_XACT_ID = "SELECT pg_current_xact_id()::text"

# What an event costs in a page besides its body: its signature and chain (`read_page`), or
# in a frame also the keys and headers after the per-collab prefix (`read_frames`).
_ROW_BYTES = 96
_FRAME_BYTES = 128
_IN_PAGE = "rn <= %(events)s AND (rn = 1 OR run <= %(bytes)s)"
# One page of a collab from a seq: the rows whose running size (`overhead` per row plus the
# body) fits `bytes` (and always the first), at most `events` of them, with `{columns}`
# (which return the page's bodies only `_IN_PAGE`); and the one row after the page, whose
# body is never read, to say the ledger held more.
# The seq range is bounded as well as LIMITed: a collab's seqs are dense (each event extends
# the chain by one, `model.chain.advance`), so the page and the row after it lie in
# [from, from + events], and no plan reads more. Without the bound, statistics taken while a
# collab was small (a fresh ledger, before autovacuum's ANALYZE) made Postgres pick a bitmap
# scan of every row from `from` to the head plus an on-disk sort, for every page: the first
# catch-up of 100k fresh events spent ~5 s of Postgres CPU instead of ~0.3 s.
_PAGE_SQL = (
    "SELECT seq, {columns} FROM ("
    "  SELECT seq, body, sig, chain, kind, octet_length(body) + %(overhead)s AS size,"
    "    row_number() OVER w AS rn, sum(octet_length(body) + %(overhead)s) OVER w AS run"
    "  FROM events WHERE collab_id = %(collab)s AND seq >= %(from)s"
    "    AND seq <= %(from)s::bigint + %(events)s"
    "  WINDOW w AS (ORDER BY seq ROWS UNBOUNDED PRECEDING)"
    "  ORDER BY seq LIMIT %(events)s + 1"
    " ) AS page"
    " WHERE rn <= 2 OR run - size <= %(bytes)s"
    " ORDER BY seq"
)


class Page(NamedTuple):
    """One page of a collab's events (`Ledger.read_page`); `more`: the ledger held more."""

    events: list[SequencedEvent]
    more: bool


class FramePage(NamedTuple):
    """One page of a collab's events as `event` frames (`Ledger.read_frames`): each item is
    (seq, frame), or (seq, SequencedEvent) for a DM; `more`: the ledger held more."""

    items: list[tuple[int, bytes | SequencedEvent]]
    more: bool


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


class Events:
    _pool: ConnectionPool[psycopg.Connection[TupleRow]]

    def head(self, collab_id: str) -> chainmod.Head:
        """The last sequenced position of a collab (the genesis head when it has no events)."""
        with _translated(), self._pool.connection() as conn:
            return _head_in(conn, collab_id)

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
        # This transaction's id, learnt before COMMIT is sent: if the connection drops while
        # COMMIT is in flight, the outcome is unknown, and the id is how we find it out
        # (`_settle_commit`) instead of guessing.
        xid: list[str] = []
        try:
            with _translated(), self._pool.connection() as conn:
                # Fast path: assume no id is stored yet (retries are rare) and let the unique
                # index on event_id say otherwise; only then look the ids up and redo it. This
                # saves a round trip and an index probe per event on every group commit.
                if len(all_ids) <= PIPELINED_EVENTS and self._append_pipelined(
                    conn, requests, results, xid
                ):
                    return results
                results.clear()
                rows = self._append_in(conn, requests, all_ids, results, lookup=False)
                if rows is None:
                    results.clear()
                    rows = self._append_in(conn, requests, all_ids, results, lookup=True)
                    assert rows is not None
                if rows:
                    r = conn.execute(_XACT_ID, prepare=False).fetchone()
                    assert r is not None
                    xid.append(str(r[0]))
                    conn.commit()
        except LedgerUnavailable:
            if not xid:
                raise  # failed before COMMIT was sent: the server rolls the transaction back
            self._settle_commit(xid[0], results)
        return results

    def _append_pipelined(
        self,
        conn: psycopg.Connection[Any],
        requests: Sequence[AppendRequest],
        results: list[tuple[chainmod.Head, list[Assignment]]],
        xid: list[str],
    ) -> bool:
        """`append_batches`'s fast path for a small group, committed in two round trips
        (`PIPELINED_EVENTS`). False when an id turned out to be stored already (a retry):
        nothing was written and the caller redoes the group with the lookup.

        Autocommit with an explicit BEGIN, so that psycopg queues BEGIN in the pipeline
        instead of waiting for it; the connection goes back to the pool as it came (or is
        closed, so the pool drops it, when it cannot be reset).
        """
        rows = _assign_rows(requests, {}, results)
        conn.autocommit = True
        try:
            with conn.pipeline() as pipe:
                conn.execute("BEGIN", prepare=False)
                with conn.cursor() as cur:
                    cur.executemany(_INSERT_EVENT, rows)
                _write_projections(conn, requests)
                ask = conn.execute(_XACT_ID, prepare=False)
                pipe.sync()  # round trip 1: BEGIN, the INSERTs, the id
                r = ask.fetchone()
                assert r is not None
                xid.append(str(r[0]))
                conn.execute("COMMIT", prepare=False)  # round trip 2: sent as the pipeline ends
        except psycopg.errors.UniqueViolation as exc:
            _refused_write(conn, requests, exc, retry=True)
            return False  # an id is stored already: redo with the lookup
        finally:
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.close()  # broken or mid-transaction: not fit to go back to the pool
            else:
                conn.autocommit = False
        return True

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
        # event ids are globally unique (the body names its collab): one lookup serves all.
        known = _positions_of(conn, all_ids) if lookup else {}
        rows = _assign_rows(requests, known, results)
        if rows:
            try:
                _copy_events(conn, rows)
                _write_projections(conn, requests)
            except psycopg.errors.UniqueViolation as exc:
                _refused_write(conn, requests, exc, retry=not lookup)
                return None  # an id is stored already: redo with the lookup
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
                found = _positions_of(conn, list(new))
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

    def event_ids(self, collab_id: str) -> list[bytes]:
        """Every event id of a collab in seq order: the leaves of its tree (ADR-0020)."""
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT event_id FROM events WHERE collab_id = %s ORDER BY seq", (collab_id,)
            ).fetchall()
        return [bytes(r[0]) for r in rows]

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
        rows = self._page_rows(
            _PAGE_SQL.format(columns=f"CASE WHEN {_IN_PAGE} THEN body END, sig, chain, kind"),
            {"collab": collab_id, "from": from_seq, "events": max_events, "bytes": max_bytes,
             "overhead": _ROW_BYTES},
        )  # fmt: skip
        events = [_sequenced(collab_id, r) for r in rows if r[1] is not None]
        return Page(events, more=len(rows) > len(events))

    def read_frames(
        self, collab_id: str, from_seq: int, max_events: int, max_bytes: int
    ) -> FramePage:
        """`read_page` for a catch-up: each event comes as (seq, its `event` frame, built by
        Postgres: ledger/_frames.py), except a DM, which comes as (seq, SequencedEvent) so the
        caller decides per subscriber who sees its body. `max_bytes` bounds the frames' bytes.
        """
        prefix = event_prefix(collab_id)
        dm = f"kind = '{KIND_DM}'"
        rows = self._page_rows(
            _PAGE_SQL.format(
                columns=f"CASE WHEN {_IN_PAGE} AND NOT {dm} THEN {frame_sql('%(prefix)s')} END,"
                f" CASE WHEN {_IN_PAGE} AND {dm} THEN body END,"
                f" CASE WHEN {dm} THEN sig END, CASE WHEN {dm} THEN chain END"
            ),
            {"collab": collab_id, "from": from_seq, "events": max_events, "bytes": max_bytes,
             "overhead": len(prefix) + _FRAME_BYTES, "prefix": prefix},
        )  # fmt: skip
        items: list[tuple[int, bytes | SequencedEvent]] = [
            (seq, frame)
            if frame is not None
            else (seq, _sequenced(collab_id, (seq, body, sig, chain, KIND_DM)))
            for seq, frame, body, sig, chain in rows
            if frame is not None or body is not None
        ]
        return FramePage(items, more=len(rows) > len(items))

    def _page_rows(self, sql: str, params: dict[str, object]) -> list[tuple[Any, ...]]:
        """Run one page query in a single round trip: BEGIN, the query and COMMIT go out
        together (pipeline mode), and results come back binary (no hex-encoded bodies)."""
        with _translated(), self._pool.connection() as conn:
            with conn.pipeline():
                cur = conn.execute(sql, params, binary=True)
                conn.commit()
            return cur.fetchall()

    def head_and_membership(self, collab_id: str) -> tuple[chainmod.Head, Membership | None]:
        """The collab's head and its membership folded from the ledger, from one snapshot.

        One REPEATABLE READ transaction, so both describe the same ledger: a change committed by
        anyone between the two reads cannot give a head past a change the fold did not see."""
        with _translated(), self._pool.connection() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            folded = _fold_membership(conn, collab_id)
            return _head_in(conn, collab_id), folded


def _head_in(conn: psycopg.Connection[Any], collab_id: str) -> chainmod.Head:
    """The collab's last stored position (the genesis head when it has no events)."""
    r = conn.execute(
        "SELECT seq, chain FROM events WHERE collab_id = %s ORDER BY seq DESC LIMIT 1",
        (collab_id,),
    ).fetchone()
    return chainmod.start_of(collab_id) if r is None else chainmod.Head(r[0], bytes(r[1]))


def _positions_of(
    conn: psycopg.Connection[Any], event_ids: list[bytes]
) -> dict[bytes, tuple[int, bytes]]:
    """(seq, chain) of each of `event_ids` the ledger holds (ids it lacks are absent)."""
    return {
        bytes(r[0]): (int(r[1]), bytes(r[2]))
        for r in conn.execute(
            "SELECT event_id, seq, chain FROM events WHERE event_id = ANY(%s)", (event_ids,)
        )
    }


def _event_row(collab_id: str, seq: int, ev: VerifiedEvent, chain: bytes) -> tuple[object, ...]:
    """The `events` row of `ev` stored at `seq`, in `_copy_events`'s column order."""
    b = ev.body
    return (collab_id, seq, ev.event_id, b.actor_id, b.kind, b.ts, ev.signed.body, ev.signed.sig,
            chain)  # fmt: skip


def _assign_rows(
    requests: Sequence[AppendRequest],
    known: dict[bytes, tuple[int, bytes]],
    results: list[tuple[chainmod.Head, list[Assignment]]],
) -> list[tuple[object, ...]]:
    """Assign each request's events their positions (`known`: ids stored already), append
    the new head and assignments to `results`, and return the rows to write: one per new id
    (an id twice in a group, or stored already, is a duplicate and written once)."""
    rows: list[tuple[object, ...]] = []
    for req in requests:
        new_head, assignments = assign(req.head, [e.event_id for e in req.events], known)
        results.append((new_head, assignments))
        rows.extend(
            _event_row(req.collab_id, a.seq, e, a.chain)
            for a, e in zip(assignments, req.events, strict=True)
            if not a.duplicate
        )
    return rows


def _write_projections(conn: psycopg.Connection[Any], requests: Sequence[AppendRequest]) -> None:
    for req in requests:
        if req.membership is not None:
            _write_projection(conn, req.membership)


def _refused_write(
    conn: psycopg.Connection[Any],
    requests: Sequence[AppendRequest],
    exc: psycopg.errors.UniqueViolation,
    *,
    retry: bool,
) -> None:
    """A group's write hit a unique index: roll it back. Returns when an event id was stored
    already and `retry` (the caller redoes the group with the lookup); otherwise another writer
    took a position first: raises `SequencingConflict` naming the collabs whose head moved."""
    conn.rollback()
    if retry and exc.diag.constraint_name == _EVENT_ID_UNIQUE:
        return
    stale = _stale_collabs(conn, requests)
    raise SequencingConflict(f"collabs {stale} were appended to by another writer", stale) from exc


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
    return [req.collab_id for req in requests if _head_in(conn, req.collab_id).seq != req.head.seq]


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
