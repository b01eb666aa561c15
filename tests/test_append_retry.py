"""The client under the relay's load limits: a window below the in-flight limit, `overloaded`
retried with backoff until a deadline, `too_many_connections` as a typed error with advice.

Real relay, real Postgres, loopback; overload is produced the way tests/test_overload.py does
it (a tiny collab inbox, or an in-flight limit of zero), and the ledger is the judge of
"stored exactly once".
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import pytest
import trio

import clientkit._client as client_module
import relay._connection as connection_module
import relay._sequencer as sequencer_module
from clientkit import RelayOverloaded, RelayRefused, TooManyConnections
from ledger import Ledger
from model import wire
from model.envelope import event_id
from tests.relay_harness import relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from pathlib import Path

    from model.envelope import SignedEvent
    from relay._server import Relay
    from tests.relay_harness import User

pytestmark = pytest.mark.usefixtures("database_url")

G = 1  # the genesis event


def stored(database_url: str, collab_id: str) -> list[tuple[int, bytes]]:
    """(seq, event id) of every stored event of the collab, in seq order."""
    store = Ledger(database_url)
    store.open()
    try:
        return [(e.seq, event_id(e.event)) for e in store.read_range(collab_id, 1, 1_000_000)]
    finally:
        store.close()


def events(user: User, n: int, tag: str) -> list[SignedEvent]:
    return [user.event(f"{tag}-{i}", ts=1_700_000_000_000 + i) for i in range(n)]


def assert_stored_exactly_once(
    database_url: str, user: User, sent: list[SignedEvent], acks: list[wire.Appended]
) -> None:
    rows = stored(database_url, user.collab_id)
    assert [seq for seq, _ in rows] == list(range(1, G + len(sent) + 1))  # contiguous
    where = dict((eid, seq) for seq, eid in rows)
    assert len(where) == len(rows)  # no id twice
    assert [ack.event_id for ack in acks] == [event_id(ev) for ev in sent]
    assert all(where[ack.event_id] == ack.seq for ack in acks)  # acked where stored
    assert not any(ack.duplicate for ack in acks)


async def test_append_many_stays_under_the_in_flight_limit(relay: Relay, database_url: str) -> None:
    """3 000 events in one call: more than the relay admits in flight per connection (2 048),
    yet with the client's window nothing is ever shed."""
    alice = await sign_up(relay.url, "alice")
    sent = events(alice, 3000, "w")
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, relay.statistics().appends_in_flight)
            await trio.sleep(0.002)

    with trio.fail_after(120):
        async with session(relay.url, alice) as client, trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            acks = await client.append_many(sent)
            nursery.cancel_scope.cancel()
    assert relay.statistics().overloaded_total == 0
    # The relay refuses beyond its own bound, so the check that means something is the
    # client's window: it never had more than APPEND_WINDOW appends outstanding.
    assert 0 < peak <= client_module.APPEND_WINDOW < connection_module.MAX_APPENDS_IN_FLIGHT
    assert_stored_exactly_once(database_url, alice, sent, acks)


async def test_overloaded_appends_are_retried_until_every_event_is_stored_once(
    relay: Relay, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 16-slot collab inbox sheds most of a 1 200-event call and of a second client's
    concurrent call; both retry the refused events (same signed bytes) and every event ends
    up stored exactly once, acked at its stored seq."""
    monkeypatch.setattr(sequencer_module, "INBOX_SIZE", 16)  # before the collab's actor starts
    alice = await sign_up(relay.url, "alice")
    first, second = events(alice, 1200, "a"), events(alice, 600, "b")
    acks: dict[str, list[wire.Appended]] = {}

    async def author(name: str, sent: list[SignedEvent]) -> None:
        async with session(relay.url, alice) as client:
            acks[name] = await client.append_many(sent)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(author, "first", first)
            nursery.start_soon(author, "second", second)
    assert relay.statistics().overloaded_total > 0, "the inbox never overflowed"
    rows = stored(database_url, alice.collab_id)
    assert [seq for seq, _ in rows] == list(range(1, G + len(first) + len(second) + 1))
    where = dict((eid, seq) for seq, eid in rows)
    assert len(where) == len(rows)
    for name, sent in (("first", first), ("second", second)):
        assert [a.event_id for a in acks[name]] == [event_id(ev) for ev in sent]
        assert all(where[a.event_id] == a.seq for a in acks[name])


async def test_a_relay_that_stays_overloaded_surfaces_after_the_deadline(
    relay: Relay, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await sign_up(relay.url, "alice")
    [signed] = events(alice, 1, "late")
    monkeypatch.setattr(connection_module, "MAX_APPENDS_IN_FLIGHT", 0)  # refuse every append
    with trio.fail_after(30):
        async with session(relay.url, alice) as client:
            started = time.monotonic()
            with pytest.raises(RelayOverloaded) as refused:
                await client.append(signed, retry_for=0.4)
            took = time.monotonic() - started
            assert 0.4 <= took < 3.0, took
            assert isinstance(refused.value, RelayRefused)
            assert refused.value.code is wire.ErrorCode.OVERLOADED
            assert (refused.value.stored, refused.value.pending) == (0, 1)
            assert "retry" in str(refused.value)
            assert relay.statistics().overloaded_total >= 3  # it did retry
            assert (
                stored(database_url, alice.collab_id) == stored(database_url, alice.collab_id)[:G]
            )
            # Once the relay has room, the very same signed event goes in, once.
            monkeypatch.setattr(connection_module, "MAX_APPENDS_IN_FLIGHT", 2048)
            ack = await client.append(signed)
    assert_stored_exactly_once(database_url, alice, [signed], [ack])


async def test_too_many_connections_is_a_typed_error_that_says_what_to_do(
    database_url: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(
        relay_config(database_url, tmp_path), max_connections_per_account=1
    )
    with trio.fail_after(60):
        async with running_relay(config) as relay:
            alice = await sign_up(relay.url, "alice")
            async with session(relay.url, alice):
                with pytest.raises(TooManyConnections) as refused:
                    async with session(relay.url, alice):
                        pass
    assert refused.value.code is wire.ErrorCode.TOO_MANY_CONNECTIONS
    assert "at most 1" in refused.value.message  # the relay's own words are kept
    assert "close another connection of this account" in str(refused.value)
    assert "max_connections_per_account" in str(refused.value)
