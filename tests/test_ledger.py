"""The Postgres ledger contract, against a real Postgres (one fresh database per test)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg
import psycopg.errors
import pytest

import ledger as ledger_pkg
from ledger import (
    AlreadyExists,
    AppendRequest,
    HandleTaken,
    Ledger,
    LedgerError,
    SchemaNotReady,
    SchemaTooNew,
    SequencingConflict,
)
from ledger._migrations import MIGRATIONS
from model import chain
from model._crypto import domain_hash
from model.envelope import DOMAIN_EVENT_ID, verify_event
from model.errors import BadSignature
from model.ids import new_id
from model.membership import Membership, apply, proof_of
from tests.helpers import (
    Actor,
    genesis_of,
    make_account,
    make_collab,
    make_events,
    make_verified,
    new_actor,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from model.envelope import VerifiedEvent


@contextmanager
def sql(database_url: str) -> Iterator[psycopg.Connection]:
    """A direct autocommit connection, as an operator (or a database thief) would have."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


# Every collab starts with its genesis event at seq 1 (ADR-0010); content follows it.
G = 1


def count_events(database_url: str, collab_id: str | None = None) -> int:
    with sql(database_url) as conn:
        if collab_id is None:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
        else:
            row = conn.execute(
                "SELECT count(*) FROM events WHERE collab_id = %s", (collab_id,)
            ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def alice(ledger: Ledger) -> Actor:
    return make_account(ledger, "alice")


@pytest.fixture
def collab(ledger: Ledger, alice: Actor) -> tuple[str, bytes]:
    return make_collab(ledger, alice)


def append(ledger: Ledger, collab_id: str, events: list[VerifiedEvent]) -> chain.Head:
    head, _ = ledger.append_batch(collab_id, ledger.head(collab_id), events)
    return head


# --- migrations -----------------------------------------------------------------------------


def test_migrate_applies_every_migration_once_and_records_it(empty_database_url: str) -> None:
    known = [v for v, _, _ in MIGRATIONS]
    assert ledger_pkg.migrate(empty_database_url) == known
    assert ledger_pkg.migrate(empty_database_url) == []
    with sql(empty_database_url) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert rows == [(v, name) for v, name, _ in MIGRATIONS]


def test_migrate_is_a_no_op_on_a_migrated_database(database_url: str) -> None:
    assert ledger_pkg.migrate(database_url) == []


def test_concurrent_migrations_apply_each_version_once(empty_database_url: str) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(ledger_pkg.migrate, [empty_database_url] * 3))
    assert sorted(results, key=len) == [[], [], [v for v, _, _ in MIGRATIONS]]


def test_newer_schema_is_refused(database_url: str) -> None:
    unknown = max(v for v, _, _ in MIGRATIONS) + 1
    with sql(database_url) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'from the future')",
            (unknown,),
        )
    with pytest.raises(SchemaTooNew, match=str(unknown)):
        ledger_pkg.migrate(database_url)


def test_opening_an_unmigrated_database_says_to_migrate(empty_database_url: str) -> None:
    store = Ledger(empty_database_url)
    try:
        with pytest.raises(SchemaNotReady, match="migrate"):
            store.open()
    finally:
        store.close()


# --- append-only ----------------------------------------------------------------------------


@pytest.mark.objective("SO-3")
@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("UPDATE events SET kind = 'rewritten' WHERE seq = 2", id="update-kind"),
        pytest.param("UPDATE events SET body = body || '\\x00'::bytea", id="update-body"),
        pytest.param("UPDATE events SET received_at = now()", id="update-received-at"),
        pytest.param("DELETE FROM events WHERE seq = 3", id="delete-one"),
        pytest.param("DELETE FROM events", id="delete-all"),
        pytest.param("TRUNCATE events", id="truncate"),
        pytest.param("TRUNCATE events CASCADE", id="truncate-cascade"),
    ],
)
def test_stored_events_cannot_be_changed_or_removed(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes], statement: str
) -> None:
    collab_id, ck = collab
    append(ledger, collab_id, make_events(alice, collab_id, ck, 3))
    before = ledger.read_range(collab_id, 1, 10)
    with (
        sql(database_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
    ):
        conn.execute(statement)
    assert ledger.read_range(collab_id, 1, 10) == before
    assert ledger.verify_ledger().ok


# --- appending ------------------------------------------------------------------------------


def test_a_new_collabs_head_is_its_genesis_event(ledger: Ledger, alice: Actor) -> None:
    genesis, _ = genesis_of(alice)
    collab_id = genesis.body.collab_id
    start = chain.start_of(collab_id)
    membership = apply(None, proof_of(genesis.body), start, actor_id=alice.account_id)
    head = ledger.create_collab(genesis, membership)
    assert head == ledger.head(collab_id) == chain.advance(start, 1, genesis.event_id, head.chain)
    [stored] = ledger.read_range(collab_id, 1, 10)
    assert stored.event == genesis.signed
    assert ledger.membership(collab_id) == membership
    with pytest.raises(AlreadyExists):
        ledger.create_collab(genesis, membership)
    assert ledger.read_range(collab_id, 1, 10) == [stored]


def test_append_assigns_contiguous_seqs_and_a_valid_chain(
    ledger: Ledger, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    first = make_events(alice, collab_id, ck, 5)
    head1, out1 = ledger.append_batch(collab_id, ledger.head(collab_id), first)
    second = make_events(alice, collab_id, ck, 4, ts=2_000_000_000_000)
    head2, out2 = ledger.append_batch(collab_id, head1, second)

    assert [a.seq for a in out1 + out2] == list(range(G + 1, G + 10))
    assert not any(a.duplicate for a in out1 + out2)
    assert [a.event_id for a in out1 + out2] == [e.event_id for e in first + second]
    assert head2 == ledger.head(collab_id) == chain.Head(G + 9, out2[-1].chain)
    # A client recomputing the chain from genesis agrees with every stored position.
    client_head = chain.start_of(collab_id)
    for stored in ledger.read_range(collab_id, 1, 100):
        eid = verify_event(stored.event, alice.sign_pk).event_id
        client_head = chain.advance(client_head, stored.seq, eid, stored.chain)
    assert client_head == head2


def test_retry_returns_original_positions_and_writes_nothing(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    events = make_events(alice, collab_id, ck, 6)
    head, original = ledger.append_batch(collab_id, ledger.head(collab_id), events)

    again_head, again = ledger.append_batch(collab_id, head, events)
    assert again_head == head
    assert all(a.duplicate for a in again)
    assert [(a.seq, a.event_id, a.chain) for a in again] == [
        (a.seq, a.event_id, a.chain) for a in original
    ]
    assert count_events(database_url) == G + 6

    # A retry mixed with new events: old ones keep their place, new ones go after the head.
    fresh = make_events(alice, collab_id, ck, 2, ts=2_000_000_000_000)
    mixed = [events[4], fresh[0], events[0], fresh[1], fresh[0]]
    _, out = ledger.append_batch(collab_id, head, mixed)
    assert [(a.seq, a.duplicate) for a in out] == [
        (G + 5, True),
        (G + 7, False),
        (G + 1, True),
        (G + 8, False),
        (G + 7, True),
    ]
    assert count_events(database_url) == G + 8
    assert ledger.verify_ledger().ok


def test_duplicate_within_a_batch_is_stored_once(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    event = make_verified(alice, collab_id, ck)
    _, out = ledger.append_batch(collab_id, ledger.head(collab_id), [event, event, event])
    assert [(a.seq, a.duplicate) for a in out] == [(G + 1, False), (G + 1, True), (G + 1, True)]
    assert count_events(database_url) == G + 1


def test_a_batch_of_500_lands_in_one_call(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    events = make_events(alice, collab_id, ck, 500)
    head, out = ledger.append_batch(collab_id, ledger.head(collab_id), events)
    assert head.seq == G + 500
    assert [a.seq for a in out] == list(range(G + 1, G + 501))
    assert count_events(database_url, collab_id) == G + 500
    report = ledger.verify_ledger()
    assert report.ok, report.problems
    assert report.events == G + 500


def test_concurrent_batches_for_different_collabs_all_land(ledger: Ledger, alice: Actor) -> None:
    collabs = [make_collab(ledger, alice) for _ in range(6)]
    batches = {
        cid: [make_events(alice, cid, ck, 15, ts=1_000 * b) for b in range(4)]
        for cid, ck in collabs
    }
    start = threading.Barrier(len(collabs))

    def writer(collab_id: str) -> chain.Head:
        # One writer per collab (the relay's single-sequencer rule), all collabs at once.
        start.wait(timeout=10)
        head = ledger.head(collab_id)
        for batch in batches[collab_id]:
            head, _ = ledger.append_batch(collab_id, head, batch)
        return head

    with ThreadPoolExecutor(max_workers=len(collabs)) as pool:
        heads = dict(zip(batches, pool.map(writer, batches), strict=True))

    for collab_id, head in heads.items():
        assert head == ledger.head(collab_id)
        assert head.seq == G + 60
        stored = ledger.read_range(collab_id, G + 1, 100)
        assert [s.event for s in stored] == [e.signed for b in batches[collab_id] for e in b]
    report = ledger.verify_ledger()
    assert report.ok, report.problems
    assert (report.collabs, report.events) == (6, 6 * (G + 60))


def test_stale_head_is_a_sequencing_conflict_and_writes_nothing(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    stale = ledger.head(collab_id)
    current = append(ledger, collab_id, make_events(alice, collab_id, ck, 3))
    late = make_events(alice, collab_id, ck, 4, ts=2_000_000_000_000)
    with pytest.raises(SequencingConflict):
        ledger.append_batch(collab_id, stale, late)
    assert count_events(database_url) == G + 3
    assert ledger.head(collab_id) == current
    # The sequencer recovers by re-reading the head.
    head, out = ledger.append_batch(collab_id, ledger.head(collab_id), late)
    assert [a.seq for a in out] == [G + 4, G + 5, G + 6, G + 7]
    assert head.seq == G + 7


def test_a_pipelined_append_hands_its_connection_back_transactional(
    database_url: str, alice: Actor
) -> None:
    """Small groups are written in autocommit + pipeline mode (ledger/_events.py); the pooled
    connection must come back out of autocommit whatever happened (a fresh append, a retry
    met by the unique index, a stale head), or every later multi-statement write through
    that pool would commit statement by statement."""
    store = ledger_pkg.Ledger(database_url, max_connections=1)  # one connection: the same one
    store.open()
    try:
        collab_id, ck = make_collab(store, alice)
        first = make_events(alice, collab_id, ck, 2)
        stale = store.head(collab_id)
        append(store, collab_id, first)  # fresh
        _, again = store.append_batch(collab_id, store.head(collab_id), first)  # a retry
        assert all(a.duplicate for a in again)
        with pytest.raises(SequencingConflict):  # a stale head
            store.append_batch(collab_id, stale, make_events(alice, collab_id, ck, 2, ts=2))
        with store._pool.connection() as conn:
            assert conn.autocommit is False
        assert count_events(database_url, collab_id) == G + 2
    finally:
        store.close()


def test_two_writers_racing_on_one_collab_cannot_both_win(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    head = ledger.head(collab_id)
    batches = [make_events(alice, collab_id, ck, 10, ts=1_000 * i) for i in range(2)]
    start = threading.Barrier(2)

    def writer(batch: list[VerifiedEvent]) -> str:
        start.wait(timeout=10)
        try:
            ledger.append_batch(collab_id, head, batch)
        except SequencingConflict:
            return "conflict"
        return "ok"

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = sorted(pool.map(writer, batches))
    assert outcomes == ["conflict", "ok"]
    assert count_events(database_url) == G + 10
    assert ledger.verify_ledger().ok


def test_append_batches_commits_several_collabs_in_one_transaction(
    ledger: Ledger, database_url: str, alice: Actor
) -> None:
    collabs = [make_collab(ledger, alice) for _ in range(3)]
    append(ledger, collabs[0][0], make_events(alice, *collabs[0], 2))
    requests = [
        AppendRequest(cid, ledger.head(cid), make_events(alice, cid, ck, n, ts=5_000))
        for (cid, ck), n in zip(collabs, (3, 1, 4), strict=True)
    ]
    results = ledger.append_batches(requests)
    assert [[a.seq - G for a in out] for _, out in results] == [[3, 4, 5], [1], [1, 2, 3, 4]]
    assert [head for head, _ in results] == [ledger.head(cid) for cid, _ in collabs]
    assert count_events(database_url) == 3 * G + 2 + 8
    assert ledger.verify_ledger().ok


def test_a_retry_in_one_collab_of_a_group_leaves_the_others_batches_intact(
    ledger: Ledger, database_url: str, alice: Actor
) -> None:
    # The group is first written on the guess that no id is stored; the retried id makes the
    # unique index refuse that, and the group is redone with the lookup, in one call.
    (retry_id, retry_ck), (other_id, other_ck) = (
        make_collab(ledger, alice),
        make_collab(ledger, alice),
    )
    stored = make_events(alice, retry_id, retry_ck, 2)
    head, original = ledger.append_batch(retry_id, ledger.head(retry_id), stored)
    fresh = make_events(alice, retry_id, retry_ck, 1, ts=7_000)
    results = ledger.append_batches(
        [
            AppendRequest(retry_id, head, [fresh[0], stored[1]]),
            AppendRequest(
                other_id, ledger.head(other_id), make_events(alice, other_id, other_ck, 2, ts=8)
            ),
        ]
    )
    (_, retry_out), (_, other_out) = results
    assert [(a.seq - G, a.duplicate) for a in retry_out] == [(3, False), (2, True)]
    assert retry_out[1].chain == original[1].chain
    assert [(a.seq - G, a.duplicate) for a in other_out] == [(1, False), (2, False)]
    assert [head for head, _ in results] == [ledger.head(retry_id), ledger.head(other_id)]
    assert count_events(database_url) == 2 * G + 5
    assert ledger.verify_ledger().ok


def test_append_batches_names_the_stale_collab_and_writes_nothing(
    ledger: Ledger, database_url: str, alice: Actor
) -> None:
    (fresh_id, fresh_ck), (stale_id, stale_ck) = (
        make_collab(ledger, alice),
        make_collab(ledger, alice),
    )
    stale_head = ledger.head(stale_id)
    append(ledger, stale_id, make_events(alice, stale_id, stale_ck, 2))
    fresh_req = AppendRequest(
        fresh_id, ledger.head(fresh_id), make_events(alice, fresh_id, fresh_ck, 3)
    )
    stale_req = AppendRequest(stale_id, stale_head, make_events(alice, stale_id, stale_ck, 3, ts=9))
    with pytest.raises(SequencingConflict) as info:
        ledger.append_batches([fresh_req, stale_req])
    assert info.value.collab_ids == [stale_id]
    assert count_events(database_url) == 2 * G + 2  # not even the fresh collab's events
    # The caller retries the requests that were not stale.
    [(head, _)] = ledger.append_batches([fresh_req])
    assert head.seq == G + 3


def test_collabs_have_independent_sequences(ledger: Ledger, alice: Actor) -> None:
    (c1, k1), (c2, k2) = make_collab(ledger, alice), make_collab(ledger, alice)
    append(ledger, c1, make_events(alice, c1, k1, 3))
    append(ledger, c2, make_events(alice, c2, k2, 2))
    assert (ledger.head(c1).seq, ledger.head(c2).seq) == (G + 3, G + 2)
    assert ledger.head(c1).chain != ledger.head(c2).chain


# --- reading --------------------------------------------------------------------------------


def test_read_range_pages_in_seq_order(
    ledger: Ledger, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    events = make_events(alice, collab_id, ck, 25)
    _, out = ledger.append_batch(collab_id, ledger.head(collab_id), events)

    pages, from_seq = [], G + 1
    while page := ledger.read_range(collab_id, from_seq, 10):
        pages.append(page)
        from_seq = page[-1].seq + 1
    assert [len(p) for p in pages] == [10, 10, 5]
    stored = [s for p in pages for s in p]
    assert [s.seq for s in stored] == list(range(G + 1, G + 26))
    assert [s.event for s in stored] == [e.signed for e in events]
    assert [s.chain for s in stored] == [a.chain for a in out]
    assert {s.collab_id for s in stored} == {collab_id}

    assert [s.seq for s in ledger.read_range(collab_id, 0, 3)] == [1, 2, 3]
    assert [s.seq for s in ledger.read_range(collab_id, G + 24, 10)] == [G + 24, G + 25]
    assert ledger.read_range(collab_id, G + 26, 10) == []
    assert ledger.read_range(collab_id, 1, 0) == []
    assert ledger.read_range(new_id("c"), 1, 10) == []


def test_read_page_is_bounded_in_events_and_bytes_and_says_whether_more_follow(
    ledger: Ledger, alice: Actor, collab: tuple[str, bytes]
) -> None:
    """Catch-up pages (issue 13, item 6): at most `max_events` events and `max_bytes` bytes
    (body + signature + chain), the first event always, and `more` exactly when the ledger
    holds events after the page."""
    collab_id, ck = collab
    append(ledger, collab_id, make_events(alice, collab_id, ck, 25))
    everything = ledger.read_range(collab_id, 1, 100)
    sizes = {e.seq: len(e.event.body) + 96 for e in everything}

    def pages(max_events: int, max_bytes: int) -> list[list[int]]:
        out, from_seq, more = [], 1, True
        while more:
            page = ledger.read_page(collab_id, from_seq, max_events, max_bytes)
            assert page.events, "a page that says more followed is never empty"
            seqs = [e.seq for e in page.events]
            out.append(seqs)
            assert len(seqs) <= max_events
            assert len(seqs) == 1 or sum(sizes[s] for s in seqs) <= max_bytes
            from_seq, more = seqs[-1] + 1, page.more
        return out

    by_count = pages(10, 1 << 30)
    assert [len(p) for p in by_count] == [10, 10, 6]
    one = sizes[2]  # every event here has about the same size
    by_bytes = pages(500, 3 * one + 40)
    assert all(len(p) <= 3 for p in by_bytes)
    assert [s for p in by_bytes for s in p] == list(range(1, G + 26))
    assert all(len(p) == 1 for p in pages(500, 1))  # one event even when it alone is too big
    last = ledger.read_page(collab_id, G + 25, 10, 1 << 30)
    assert [e.seq for e in last.events] == [G + 25]
    assert not last.more
    assert ledger.read_page(collab_id, G + 26, 10, 1 << 30) == ([], False)
    assert ledger.read_page(collab_id, 1, 100, 1 << 30).events == everything
    # Parameters of every integer width: a page from a seq past 2**15 (or 2**31) with a count
    # that takes it past the next width. The seq range's bound once added them as sent (two
    # smallints), and the catch-up of every collab longer than 32,767 - 4,096 events failed.
    for from_seq, count in ((32_000, 4096), (2**31 - 10, 4096), (1, 60_000)):
        assert ledger.read_page(collab_id, from_seq, count, 1 << 30).events == (
            everything if from_seq == 1 else []
        )
        assert ledger.read_frames(collab_id, from_seq, count, 1 << 30).more is False


# --- verify_ledger --------------------------------------------------------------------------


def test_verify_ledger_passes_honest_data(ledger: Ledger, alice: Actor) -> None:
    bob = make_account(ledger, "bob")
    (c1, k1), (c2, k2), (c3, _) = (make_collab(ledger, alice) for _ in range(3))
    append(ledger, c1, make_events(alice, c1, k1, 7))
    append(ledger, c2, [make_verified(bob, c2, k2, ts=i) for i in range(3)])
    seen: list[tuple[str, int]] = []
    report = ledger.verify_ledger(progress=lambda cid, seq: seen.append((cid, seq)))
    assert report.ok
    assert report.problems == []
    assert (report.collabs, report.events) == (3, 3 * G + 10)
    assert sorted(seen) == sorted([(c1, G + 7), (c2, G + 3), (c3, G)])


def _seed_for_tampering(ledger: Ledger, alice: Actor, collab_id: str, ck: bytes) -> None:
    append(ledger, collab_id, make_events(alice, collab_id, ck, 5))
    assert ledger.verify_ledger().ok


@contextmanager
def thief(database_url: str) -> Iterator[psycopg.Connection]:
    """A superuser with the database in hand: switches the append-only trigger off, edits rows."""
    with sql(database_url) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER events_no_update")
        try:
            yield conn
        finally:
            conn.execute("ALTER TABLE events ENABLE TRIGGER events_no_update")


_TAMPERING = {
    "body-ciphertext-byte": "UPDATE events SET body = set_byte(body, length(body) - 1,"
    " get_byte(body, length(body) - 1) # 1) WHERE seq = 3",
    "body-routing-byte": "UPDATE events SET body = set_byte(body, 3, get_byte(body, 3) # 1) WHERE seq = 3",
    "sig-byte": "UPDATE events SET sig = set_byte(sig, 10, get_byte(sig, 10) # 128) WHERE seq = 3",
    "chain": "UPDATE events SET chain = set_byte(chain, 0, get_byte(chain, 0) # 1) WHERE seq = 3",
    "event-id": "UPDATE events SET event_id = set_byte(event_id, 0, get_byte(event_id, 0) # 1)"
    " WHERE seq = 3",
    "kind-column": "UPDATE events SET kind = 'other' WHERE seq = 3",
    "ts-column": "UPDATE events SET ts = ts + 1 WHERE seq = 3",
    "deleted-row": "DELETE FROM events WHERE seq = 3",
    "swapped-bodies": "UPDATE events SET body = (SELECT body FROM events WHERE seq = 4) WHERE seq = 3",
}


@pytest.mark.objective("SO-3")
@pytest.mark.parametrize("tampering", sorted(_TAMPERING))
def test_verify_ledger_reports_tampered_rows(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes], tampering: str
) -> None:
    collab_id, ck = collab
    _seed_for_tampering(ledger, alice, collab_id, ck)
    with thief(database_url) as conn:
        conn.execute(_TAMPERING[tampering])
    report = ledger.verify_ledger()
    assert not report.ok
    # The first problem names the collab and the damaged position (or, for a deleted row, the
    # position right after the gap).
    expected = 4 if tampering == "deleted-row" else 3
    assert report.problems[0].startswith(f"{collab_id} seq {expected}:"), report.problems


@pytest.mark.objective("SO-3")
def test_tampered_stored_event_fails_client_verification(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    _seed_for_tampering(ledger, alice, collab_id, ck)
    with thief(database_url) as conn:
        conn.execute(_TAMPERING["body-ciphertext-byte"])
    delivered = ledger.read_range(collab_id, 1, 10)
    for stored in delivered:
        if stored.seq == 3:
            with pytest.raises(BadSignature):
                verify_event(stored.event, alice.sign_pk)
        else:
            verify_event(stored.event, alice.sign_pk)


@pytest.mark.objective("SO-3")
def test_rehashing_thief_is_still_caught_by_the_signature(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes]
) -> None:
    # A thief who flips a content byte and then recomputes the event id and every later chain
    # hash leaves a ledger whose hashes all check out — only the author's signature catches it.
    collab_id, ck = collab
    _seed_for_tampering(ledger, alice, collab_id, ck)
    with thief(database_url) as conn:
        rows = conn.execute(
            "SELECT seq, body, sig FROM events WHERE collab_id = %s ORDER BY seq", (collab_id,)
        ).fetchall()
        head = chain.start_of(collab_id)
        for seq, body, sig in rows:
            body = bytes(body)
            if seq == 3:
                body = body[:-1] + bytes([body[-1] ^ 1])
            eid = domain_hash(DOMAIN_EVENT_ID, body, bytes(sig))
            head = chain.Head(seq, chain.next_head(head.chain, eid))
            conn.execute(
                "UPDATE events SET body = %s, event_id = %s, chain = %s WHERE collab_id = %s AND seq = %s",
                (body, eid, head.chain, collab_id, seq),
            )
    report = ledger.verify_ledger()
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{collab_id} seq 3:")
    assert "signature" in report.problems[0]


@pytest.mark.objective("SO-3")
def test_event_stored_under_the_wrong_collab_is_refused_or_reported(
    ledger: Ledger, database_url: str, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, ck = collab
    other_id, _ = make_collab(ledger, alice)
    foreign = make_verified(alice, collab_id, ck)  # signed for `collab_id`...
    with pytest.raises(ValueError, match="routed to a collab other"):
        ledger.append_batch(other_id, ledger.head(other_id), [foreign])  # ...filed elsewhere
    assert ledger.read_range(other_id, G + 1, 10) == []
    # A database thief can still file it there by hand; verify-ledger names the row.
    link = chain.next_head(ledger.head(other_id).chain, foreign.event_id)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO events (collab_id, seq, event_id, actor_id, kind, ts, body, sig, chain)"
            " VALUES (%s, 2, %s, %s, 'msg', %s, %s, %s, %s)",
            (other_id, foreign.event_id, alice.account_id, foreign.body.ts,
             foreign.signed.body, foreign.signed.sig, link),
        )  # fmt: skip
    report = ledger.verify_ledger()
    assert report.problems == [f"{other_id} seq 2: routing columns disagree with the signed body"]


# --- accounts and membership ----------------------------------------------------------------


def test_accounts_round_trip(ledger: Ledger) -> None:
    actor = new_actor("carol")
    ledger.create_account(actor.row)
    assert ledger.account_by_handle("carol") == actor.row
    assert ledger.account_by_id(actor.account_id) == actor.row
    assert ledger.account_by_handle("nobody") is None
    assert ledger.account_by_id(new_id("a")) is None
    assert "password" not in repr(actor.row)


def test_duplicate_handle_is_handle_taken(ledger: Ledger, alice: Actor) -> None:
    impostor = new_actor("alice")
    with pytest.raises(HandleTaken, match="alice"):
        ledger.create_account(impostor.row)
    assert issubclass(HandleTaken, LedgerError)
    assert ledger.account_by_handle("alice") == alice.row
    assert ledger.account_by_id(impostor.account_id) is None


def test_member_is_the_projection_of_the_genesis(
    ledger: Ledger, alice: Actor, collab: tuple[str, bytes]
) -> None:
    collab_id, _ = collab
    bob = make_account(ledger, "bob")
    assert ledger.member(collab_id, alice.account_id) == ("human", ())
    assert ledger.member(collab_id, bob.account_id) is None
    assert ledger.member(new_id("c"), alice.account_id) is None
    bobs_collab, _ = make_collab(ledger, bob)
    assert ledger.member(bobs_collab, bob.account_id) == ("human", ())
    assert ledger.member(bobs_collab, alice.account_id) is None


# --- driver errors stay inside the ledger ---------------------------------------------------


@pytest.mark.parametrize("case", ["unknown-actor", "unknown-collab", "duplicate-collab"])
def test_integrity_errors_are_ledger_errors(
    ledger: Ledger, alice: Actor, collab: tuple[str, bytes], case: str
) -> None:
    collab_id, ck = collab
    ghost = new_id("c")
    stranger = new_actor()  # never stored
    attempts = {
        "unknown-actor": lambda: ledger.append_batch(
            collab_id, ledger.head(collab_id), [make_verified(stranger, collab_id, ck)]
        ),
        "unknown-collab": lambda: ledger.append_batch(
            ghost, ledger.head(ghost), [make_verified(alice, ghost, ck)]
        ),
        "duplicate-collab": lambda: ledger.create_collab(*_genesis_and_state(alice, collab_id)),
    }
    with pytest.raises(LedgerError):
        attempts[case]()


def _genesis_and_state(owner: Actor, collab_id: str) -> tuple[VerifiedEvent, Membership]:
    genesis, _ = genesis_of(owner, collab_id)
    start = chain.start_of(collab_id)
    return genesis, apply(None, proof_of(genesis.body), start, actor_id=owner.account_id)


def test_artifact_pieces_are_paged_in_bytes_whatever_the_piece_sizes(ledger: Ledger) -> None:
    """A download holds one page while its client reads: the page is bounded in bytes, so an
    uploader's choice of large pieces cannot make each stalled download pin more."""
    owner = make_account(ledger)
    collab_id, _ = make_collab(ledger, owner)
    upload = "p" * 20
    ledger.start_upload(upload, owner.account_id, collab_id)
    sizes = [300_000, 10, 10, 200_000, 60_000, 60_000, 5]
    for index, size in enumerate(sizes):
        ledger.put_upload_piece(upload, owner.account_id, index, bytes([index]) * size, quota=2**40)
    read = [len(p) for p in ledger.artifact_pieces(upload, 0, 16, 250_000)]
    assert read == [300_000]  # the first piece always comes, however large
    read = [len(p) for p in ledger.artifact_pieces(upload, 1, 16, 250_000)]
    assert read == [10, 10, 200_000]  # the next one would pass the bound
    read = [len(p) for p in ledger.artifact_pieces(upload, 4, 16, 250_000)]
    assert read == [60_000, 60_000, 5]
    assert [len(p) for p in ledger.artifact_pieces(upload, 1, 2, 250_000)] == [10, 10]
