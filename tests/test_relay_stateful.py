"""Property test of the whole event path: random schedules against one real relay.

Hypothesis generates schedules of pipelined posts from several devices (every step on a new
connection, so each is also a reconnect), retries of already-sequenced events mixed into
pipelines of new ones, concurrent bursts from all devices, and subscribers that join at
random seqs. After each schedule the collab's history must be:
contiguous from 1, free of duplicates, every ack must name the event's one position, each
connection's events must keep their send order, and every subscriber — whatever seq it joined
at — must have seen exactly the ledger's events from there on, each verified by the client kit,
including the evidence every device seals into its events (its stream counter and previous
event, the newest head it learnt from an ack): honest schedules never raise an ordering alarm.

The relay runs once for the module in a background thread (its own Trio loop); each example
drives it from a fresh Trio loop with fresh accounts and a fresh collab.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import hypothesis.strategies as st
import msgspec
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings

from clientkit._transport import FrameReader, open_websocket
from model import wire
from model.chain import Head, start_of
from model.content import Evidence
from model.envelope import SignedEvent, event_id
from tests.helpers import create_database, drop_database, with_dbname
from tests.relay_harness import User, relay_config, relay_in_thread, session, sign_up

if TYPE_CHECKING:
    from collections.abc import Iterator

DEVICES = 3


class Post(msgspec.Struct, frozen=True):
    device: int
    count: int


class Retry(msgspec.Struct, frozen=True):
    """Send an already-sequenced event again, amid `with_new` new ones on one connection."""

    device: int
    back: int  # how many of this device's events ago
    with_new: int


class Burst(msgspec.Struct, frozen=True):
    count: int  # every device posts `count` at once


class Join(msgspec.Struct, frozen=True):
    at_fraction: float  # join at this fraction of the current head (0 = from seq 1)


Step = Post | Retry | Burst | Join

steps = st.one_of(
    st.builds(Post, st.integers(0, DEVICES - 1), st.integers(1, 25)),
    st.builds(Retry, st.integers(0, DEVICES - 1), st.integers(0, 30), st.integers(0, 5)),
    st.builds(Burst, st.integers(1, 15)),
    st.builds(Join, st.floats(0, 1)),
)


@pytest.fixture(scope="module")
def relay_url(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    name = create_database(pg_admin_url, "cozy_stateful", template=template_database)
    config = relay_config(with_dbname(pg_admin_url, name), tmp_path_factory.mktemp("relay"))
    try:
        with relay_in_thread(config, name="stateful-relay", start_timeout=30) as served:
            yield served.url
    finally:
        drop_database(pg_admin_url, name)


@dataclass
class View:
    """What one subscriber saw, from the seq it joined at."""

    from_seq: int
    seqs: list[int] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    target: int | None = None  # set once the schedule is over: the final head
    reached: trio.Event = field(default_factory=trio.Event)

    def check_reached(self) -> None:
        last = self.seqs[-1] if self.seqs else self.from_seq - 1
        if self.target is not None and last >= self.target:
            self.reached.set()


@dataclass
class Run:
    """What one schedule did, for the final checks."""

    user: User
    sent: dict[int, list[bytes]] = field(default_factory=lambda: {d: [] for d in range(DEVICES)})
    events: dict[bytes, SignedEvent] = field(default_factory=dict)
    acks: dict[bytes, set[int]] = field(default_factory=dict)
    views: list[View] = field(default_factory=list)
    head: int = 1  # the collab's genesis event
    counter: int = 0
    # Each device's stream (counter, last event id) and the newest head it learnt from an ack:
    # the evidence it seals into every event, which every watcher checks (SO-4).
    streams: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    seen: dict[int, Head] = field(default_factory=dict)

    def new_event(self, device: int) -> SignedEvent:
        self.counter += 1
        count, last = self.streams.get(device, (0, b""))
        seen = self.seen.get(device) or start_of(self.user.collab_id)
        evidence = Evidence(f"device-{device}", count + 1, last, seen.seq, seen.chain, self.counter)
        ev = self.user.event(
            f"d{device}-{self.counter}-{secrets.token_hex(4)}",
            ts=1_700_000_000_000 + self.counter,
            evidence=evidence,
        )
        self.streams[device] = (count + 1, event_id(ev))
        self.events[event_id(ev)] = ev
        self.sent[device].append(event_id(ev))
        return ev


async def pipeline(url: str, user: User, events: list[SignedEvent], run: Run, device: int) -> None:
    """Send every event without waiting, then collect every ack (one connection)."""
    async with trio.open_nursery() as nursery, open_websocket(url, nursery) as ws:
        frames = FrameReader(ws)
        assert isinstance(await frames.next(), wire.Welcome)
        await ws.send_message(wire.encode(wire.Authenticate(rid=0, token=user.token)))
        assert isinstance(await frames.next(), wire.Authenticated)
        for rid, ev in enumerate(events, start=1):
            await ws.send_message(wire.encode(wire.Append(rid=rid, event=ev)))
        for _ in events:
            ack = await frames.next()
            assert isinstance(ack, wire.Appended), ack
            eid = event_id(events[ack.rid - 1])
            assert ack.event_id == eid
            run.acks.setdefault(eid, set()).add(ack.seq)
            run.head = max(run.head, ack.seq)
            if ack.seq > run.seen.get(device, start_of(user.collab_id)).seq:
                run.seen[device] = Head(ack.seq, ack.chain)


async def watch(url: str, run: Run, view: View, until: trio.Event) -> None:
    """A subscriber joining at `view.from_seq`, verified by the client kit, until `until`."""
    async with session(url, run.user) as client:
        # Verification starts at the genesis: read up to the join point, then follow from there
        # with the view this client built itself.
        start = None
        if view.from_seq > 1:
            async with client.history(run.user.collab_id, run.user.box_key) as upto:
                async for d in upto:
                    if d.seq == view.from_seq - 1:
                        break
            assert upto.head.seq == view.from_seq - 1
            start = upto.view
        async with (
            client.history(run.user.collab_id, run.user.box_key, view=start, follow=True) as events,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(_cancel_when, until, nursery.cancel_scope)
            async for d in events:
                view.seqs.append(d.seq)
                view.ids.append(d.event_id)
                view.check_reached()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def run_schedule(url: str, schedule: list[Step]) -> Run:
    run = Run(await sign_up(url))
    done = trio.Event()
    async with trio.open_nursery() as watchers:
        for step in schedule:
            match step:
                case Post(device, count):
                    await pipeline(
                        url, run.user, [run.new_event(device) for _ in range(count)], run, device
                    )
                case Burst(count):
                    async with trio.open_nursery() as burst:
                        for device in range(DEVICES):
                            evs = [run.new_event(device) for _ in range(count)]
                            burst.start_soon(pipeline, url, run.user, evs, run, device)
                case Retry(device, back, with_new) if run.sent[device]:
                    eid = run.sent[device][max(0, len(run.sent[device]) - 1 - back)]
                    fresh = [run.new_event(device) for _ in range(with_new)]
                    mixed = [*fresh[: with_new // 2], run.events[eid], *fresh[with_new // 2 :]]
                    await pipeline(url, run.user, mixed, run, device)
                case Join(fraction):
                    view = View(from_seq=1 + int(fraction * run.head))
                    run.views.append(view)
                    watchers.start_soon(watch, url, run, view, done)
                case Retry():
                    pass  # nothing sent by that device yet
        # Let every watcher reach the final head, then stop them.
        with trio.fail_after(30):
            for view in run.views:
                view.target = run.head
                view.check_reached()
                await view.reached.wait()
        done.set()
    return run


@pytest.mark.objective("SO-4")
@settings(
    max_examples=40,
    deadline=None,
    # Each example drives a real relay (~1 s); a failing schedule of ≤ 12 steps reads fine
    # unshrunk, and shrinking one could take many minutes of CI.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=st.lists(steps, min_size=1, max_size=12))
def test_any_schedule_gives_one_contiguous_history_that_every_subscriber_sees(
    relay_url: str, schedule: list[Step]
) -> None:
    run = trio.run(run_schedule, relay_url, schedule)
    # Every event was acked at exactly one position, retries included.
    assert set(run.acks) == set(run.events)
    positions = {eid: seqs.pop() for eid, seqs in run.acks.items() if len(seqs) == 1}
    assert len(positions) == len(run.events), "an event was acked at two different seqs"
    # Contiguous after the genesis (seq 1), no duplicates: the positions are exactly 2..N+1.
    assert sorted(positions.values()) == list(range(2, len(run.events) + 2))
    # Each device's events keep their send order (first sends; retries reuse the same id).
    for device, ids in run.sent.items():
        first_sends = list(dict.fromkeys(ids))
        order = [positions[eid] for eid in first_sends]
        assert order == sorted(order), f"device {device} was reordered"
    # Every subscriber saw the ledger's history from where it joined, exactly once, verified.
    by_seq = {seq: eid for eid, seq in positions.items()}
    for view in run.views:
        assert view.seqs == list(range(view.from_seq, run.head + 1))
        posts = [(s, eid) for s, eid in zip(view.seqs, view.ids, strict=True) if s > 1]
        assert posts == [(s, by_seq[s]) for s, _ in posts]  # seq 1 is the genesis
