"""Overload over real sockets: a stalled subscriber, an append flood, too many connections.

Each test drives the real relay (same Trio loop, real Postgres) over loopback WebSockets and
checks the bounds by the relay's own `statistics()`, not by the process's memory.
"""

from __future__ import annotations

import dataclasses
import socket
import statistics as stats
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import trio
import trio_websocket

import relay._connection as connection_module
import relay._sequencer as sequencer_module
from clientkit import Client, RelayRefused, connect
from clientkit._transport import FrameReader, open_websocket
from fanout import LAG_CLOSE_CODE
from ledger import Ledger
from model import wire
from tests.relay_harness import PASSWORD, User, relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from relay._server import Relay

pytestmark = pytest.mark.usefixtures("database_url")

G = 1  # the genesis event


@pytest.fixture
async def alice(relay: Relay) -> User:
    return await sign_up(relay.url, "alice")


def stored_seqs(database_url: str, collab_id: str) -> list[int]:
    store = Ledger(database_url)
    store.open()
    try:
        return [e.seq for e in store.read_range(collab_id, 1, 1_000_000)]
    finally:
        store.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while True:
            if condition():
                return
            await trio.sleep(0.02)


@asynccontextmanager
async def authed(
    url: str, user: User
) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, FrameReader]]:
    async with trio.open_nursery() as nursery, open_websocket(url, nursery) as ws:
        frames = FrameReader(ws)
        assert isinstance(await frames.next(), wire.Welcome)
        await ws.send_message(wire.encode(wire.Authenticate(rid=0, token=user.token)))
        assert isinstance(await frames.next(), wire.Authenticated)
        yield ws, frames
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def stalling_socket(url: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A client whose TCP receive window is tiny and whose WebSocket reader queue holds one
    message: once the test stops calling `get_message`, it stops reading the socket at all."""
    host, port = url.removeprefix("ws://").split(":")
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery, stream, host, "/", message_queue_size=1, max_message_size=wire.WS_HARD_LIMIT
        )
        try:
            yield ws
        finally:
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def test_a_stalled_subscriber_is_dropped_with_its_reason_and_others_keep_their_latency(
    relay: Relay, alice: User
) -> None:
    """One subscriber stops reading its socket (TCP-level stall) while three healthy ones
    follow a stream of ~12 KB events. With the default limits the stalled one's outbox fills
    (OUTBOX_BYTES), it is dropped with 4008 and a reason, and resumes from the ledger; the
    healthy ones see every event, in order, with low append→delivery latency."""
    text = "x" * 12_000
    sent_at: dict[int, float] = {}  # seq -> when its append was sent
    seen_at: dict[str, dict[int, float]] = {}
    dropped = trio.Event()
    stalled_seen: list[int] = []
    closed: list[trio_websocket.CloseReason] = []
    samples: list[int] = []  # the relay's total outbox bytes, sampled while the stall grows

    async def healthy(name: str, ready: trio.Event) -> None:
        got = seen_at.setdefault(name, {})
        async with session(relay.url, alice) as client:
            async with client.subscribe(alice.collab_id) as frames:
                async for frame in frames:
                    if isinstance(frame, wire.CaughtUp):
                        ready.set()
                    elif isinstance(frame, wire.Event):
                        got[frame.seq] = trio.current_time()

    async def stalled(ready: trio.Event) -> None:
        async with stalling_socket(relay.url) as ws:
            frames = FrameReader(ws)
            assert isinstance(await frames.next(), wire.Welcome)
            await ws.send_message(wire.encode(wire.Authenticate(rid=1, token=alice.token)))
            assert isinstance(await frames.next(), wire.Authenticated)
            await ws.send_message(wire.encode(wire.Subscribe(rid=2, collab_id=alice.collab_id)))
            while not isinstance(await frames.next(), wire.CaughtUp):
                pass
            ready.set()
            await dropped.wait()  # read nothing at all until the relay has given up on us
            try:
                while True:
                    frame = await frames.next()
                    if isinstance(frame, wire.Event):
                        stalled_seen.append(frame.seq)
            except trio_websocket.ConnectionClosed as exc:
                closed.append(exc.reason)

    async def watch_relay() -> None:
        while relay.fanout.statistics().lagging_disconnects == 0:
            samples.append(relay.statistics().outbox_bytes)
            await trio.sleep(0.01)
        dropped.set()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            readies = [trio.Event() for _ in range(4)]
            for i in range(3):
                nursery.start_soon(healthy, f"healthy-{i}", readies[i])
            nursery.start_soon(stalled, readies[3])
            for r in readies:
                await r.wait()
            nursery.start_soon(watch_relay)
            async with authed(relay.url, alice) as (ws, frames):
                rid, after_drop = 100, 0
                while after_drop < 100:
                    window: dict[int, float] = {}
                    for _ in range(32):
                        rid += 1
                        window[rid] = trio.current_time()
                        event = alice.event(text, ts=1_700_000_000_000 + rid)
                        await ws.send_message(wire.encode(wire.Append(rid=rid, event=event)))
                    for _ in window:
                        ack = await frames.next()
                        assert isinstance(ack, wire.Appended), ack
                        sent_at[ack.seq] = window[ack.rid]
                    if dropped.is_set():
                        after_drop += len(window)
                    assert rid < 100 + 5000, "the stalled subscriber was never dropped"
            last = max(sent_at)
            await wait_until(lambda: bool(closed) and all(last in g for g in seen_at.values()))
            nursery.cancel_scope.cancel()
    head = max(sent_at)
    # The healthy subscribers saw everything, in order, fast.
    latencies = []
    for name, got in seen_at.items():
        assert list(got) == list(range(1, head + 1)), name
        latencies += [got[s] - sent_at[s] for s in sent_at]
    latencies.sort()
    p50, p99 = stats.median(latencies), latencies[int(len(latencies) * 0.99)]
    print(f"\nstall: {head - G} events; healthy append->delivery p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; stalled one got "
          f"{len(stalled_seen)} before the drop; peak outbox bytes {max(samples)}")  # fmt: skip
    assert p99 < 2.0, f"healthy subscribers slowed down: p99 {p99:.3f} s"
    # The stalled one was dropped with the documented code and reason, after a bounded queue.
    assert closed, "the stalled subscriber's connection did not end"
    assert closed[0].code == LAG_CLOSE_CODE
    assert "reconnect and resume after the last seq you received" in (closed[0].reason or "")
    assert max(samples) <= connection_module.OUTBOX_BYTES * 4  # four subscribers' outboxes
    assert stalled_seen == list(range(G + 1, G + 1 + len(stalled_seen)))
    assert len(stalled_seen) < head - G
    # It resumes from the ledger after the last event it received: the rest, exactly once.
    async with authed(relay.url, alice) as (ws, frames):
        resume = G + len(stalled_seen) + 1
        await ws.send_message(
            wire.encode(
                wire.Subscribe(rid=5, collab_id=alice.collab_id, from_seq=resume, follow=False)
            )
        )
        resumed: list[int] = []
        while True:
            frame = await frames.next()
            if isinstance(frame, wire.Event):
                resumed.append(frame.seq)
            elif isinstance(frame, wire.CaughtUp):
                break
    assert resumed == list(range(resume, head + 1))
    await wait_until(lambda: relay.statistics().connections == 0)


async def test_an_append_flood_is_shed_with_overloaded_and_other_connections_are_unaffected(
    relay: Relay, alice: User, database_url: str
) -> None:
    """Four connections pipeline appends as fast as they can write (default limits): the
    excess gets typed `overloaded` errors at once, every queue the relay reports stays within
    its bound, and another account's pings and appends keep flowing."""
    bob = await sign_up(relay.url, "bob")
    per_conn, flooders = 6000, 4
    replies: dict[str, int] = {"appended": 0, "overloaded": 0}
    peak = {"inbox": 0, "in_flight": 0, "outbox": 0}
    bob_latency: list[float] = []
    flooding = trio.Event()

    async def flood(k: int) -> None:
        events = [alice.event(f"f{k}-{i}", ts=1_700_000_000_000 + i) for i in range(per_conn)]
        async with authed(relay.url, alice) as (ws, frames), trio.open_nursery() as nursery:

            async def read() -> None:
                for _ in events:
                    reply = await frames.next()
                    if isinstance(reply, wire.Appended):
                        replies["appended"] += 1
                    else:
                        assert isinstance(reply, wire.Error), reply
                        assert reply.code is wire.ErrorCode.OVERLOADED, reply
                        assert "retry" in reply.message
                        replies["overloaded"] += 1

            nursery.start_soon(read)
            flooding.set()
            frames_out = [
                wire.encode(wire.Append(rid=i + 1, event=ev)) for i, ev in enumerate(events)
            ]
            for batch in batches_that_fit(frames_out):
                await ws.send_message(batch)

    async def sample() -> None:
        while True:
            s = relay.statistics()
            peak["inbox"] = max([peak["inbox"], *(q.inbox for q in s.sequencers)])
            peak["in_flight"] = max(peak["in_flight"], s.appends_in_flight)
            peak["outbox"] = max(peak["outbox"], s.outbox_frames_max)
            await trio.sleep(0.005)

    async def bystander() -> None:
        await flooding.wait()
        async with session(relay.url, bob) as client:
            for i in range(20):
                t0 = trio.current_time()
                await ping(client)
                await client.append(bob.event(f"calm-{i}", ts=1_700_000_000_000 + i))
                bob_latency.append(trio.current_time() - t0)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            async with trio.open_nursery() as work:
                for k in range(flooders):
                    work.start_soon(flood, k)
                work.start_soon(bystander)
            nursery.cancel_scope.cancel()
        await wait_until(lambda: relay.statistics().appends_in_flight == 0)
    total = per_conn * flooders
    print(f"\nflood: {total} appends, {replies['appended']} stored, {replies['overloaded']} "
          f"overloaded; peak inbox {peak['inbox']}, in flight {peak['in_flight']}, fullest "
          f"outbox {peak['outbox']} frames; bystander ping+append max "
          f"{max(bob_latency) * 1000:.0f} ms")  # fmt: skip
    assert replies["appended"] + replies["overloaded"] == total
    assert replies["overloaded"] > 0, "the flood was never shed"
    assert peak["inbox"] <= sequencer_module.INBOX_SIZE
    assert peak["in_flight"] <= flooders * connection_module.MAX_APPENDS_IN_FLIGHT
    assert peak["outbox"] <= connection_module.OUTBOX_FRAMES
    assert relay.statistics().overloaded_total == replies["overloaded"]
    # Exactly what was acked is stored, contiguously; bob's collab was not held up.
    assert stored_seqs(database_url, alice.collab_id) == list(range(1, G + replies["appended"] + 1))
    assert stored_seqs(database_url, bob.collab_id) == list(range(1, G + 20 + 1))
    assert max(bob_latency) < 5.0


async def test_a_full_collab_inbox_refuses_at_once_instead_of_stalling_the_reader(
    relay: Relay, alice: User, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 32-slot inbox, one batch of as many appends as a frame holds (handled without
    yielding) overflows it: the rest are refused with `overloaded` while the same connection's
    ping is answered at once."""
    monkeypatch.setattr(sequencer_module, "INBOX_SIZE", 32)  # before the collab's actor starts
    one = len(wire.encode(wire.Append(rid=1, event=alice.event("b0"))))
    fits = min(wire.MAX_BATCH_FRAMES, (wire.MAX_FRAME_BYTES - 64) // (one + 8)) - 1
    assert fits > 64, "the test needs a batch well over the 32-slot inbox"
    events = [alice.event(f"b{i}", ts=1_700_000_000_000 + i) for i in range(fits)]
    with trio.fail_after(30):
        async with authed(relay.url, alice) as (ws, frames):
            batch = [wire.encode(wire.Append(rid=i + 1, event=ev)) for i, ev in enumerate(events)]
            await ws.send_message(wire.batch([*batch, wire.encode(wire.Ping(rid=9999))]))
            got: dict[int, wire.Reply] = {}
            while len(got) < len(events) + 1:
                reply = await frames.next()
                assert isinstance(reply, (wire.Appended, wire.Error, wire.Pong)), reply
                assert reply.rid is not None
                got[reply.rid] = reply
    codes = [got[i + 1] for i in range(len(events))]
    stored = [r for r in codes if isinstance(r, wire.Appended)]
    refused = [r for r in codes if isinstance(r, wire.Error)]
    assert {r.code for r in refused} == {wire.ErrorCode.OVERLOADED}
    assert len(stored) >= 32
    assert refused, f"a {fits}-append batch did not overflow a 32-slot inbox"
    assert stored_seqs(database_url, alice.collab_id) == list(range(1, G + len(stored) + 1))


async def ping(client: Client) -> None:
    await client.request(lambda rid: wire.Ping(rid=rid), wire.Pong)


async def test_a_connection_that_switches_account_frees_its_slot(
    database_url: str, tmp_path: Path
) -> None:
    # Connections are counted per account (an index kept on bind); a rebind moves the
    # connection from one account's count to the other's.
    config = dataclasses.replace(
        relay_config(database_url, tmp_path), max_connections_per_account=2
    )
    with trio.fail_after(60):
        async with running_relay(config) as relay:
            alice = await sign_up(relay.url, "alice")
            bob = await sign_up(relay.url, "bob")
            async with (
                session(relay.url, alice),
                session(relay.url, alice) as switching,
                connect(relay.url) as extra,
                session(relay.url, bob),
            ):
                with pytest.raises(RelayRefused) as full:
                    await extra.authenticate(alice.token)
                assert full.value.code is wire.ErrorCode.TOO_MANY_CONNECTIONS
                await switching.authenticate(bob.token)  # bob now holds 2, alice 1
                await extra.authenticate(alice.token)
                assert (await extra.append(alice.event("a freed slot"))).seq == G + 1
                async with connect(relay.url) as third_bob:
                    with pytest.raises(RelayRefused) as bob_full:
                        await third_bob.authenticate(bob.token)
                    assert bob_full.value.code is wire.ErrorCode.TOO_MANY_CONNECTIONS


async def test_an_account_holds_at_most_its_connection_limit(
    database_url: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(
        relay_config(database_url, tmp_path), max_connections_per_account=3
    )
    with trio.fail_after(60):
        async with running_relay(config) as relay:
            alice = await sign_up(relay.url, "alice")
            bob = await sign_up(relay.url, "bob")
            async with (
                session(relay.url, alice),
                session(relay.url, alice),
                session(relay.url, bob) as bobs,
                connect(relay.url) as extra,
            ):
                async with session(relay.url, alice) as third:
                    with pytest.raises(RelayRefused) as refused:
                        await extra.authenticate(alice.token)
                    assert refused.value.code is wire.ErrorCode.TOO_MANY_CONNECTIONS
                    assert "at most 3" in refused.value.message
                    with pytest.raises(RelayRefused) as by_login:
                        await extra.login(alice.handle, PASSWORD)
                    assert by_login.value.code is wire.ErrorCode.TOO_MANY_CONNECTIONS
                    await ping(extra)  # the refused connection stays open, unauthenticated
                    await ping(bobs)  # other accounts are not affected
                    assert relay.statistics().connection_limit_refusals == 2
                    # Re-authenticating a connection already bound does not count it twice.
                    await third.authenticate(alice.token)
                await wait_until(lambda: relay.statistics().connections == 4)
                await extra.authenticate(alice.token)  # a slot is free again
                assert (await extra.append(alice.event("now it works"))).seq == G + 1


def batches_that_fit(frames: list[bytes]) -> list[bytes]:
    """`frames` as `batch` messages within both of the relay's limits (frames and bytes)."""
    out: list[bytes] = []
    run: list[bytes] = []
    size = 64  # the batch's own envelope, generously
    for frame in frames:
        if run and (
            len(run) == wire.MAX_BATCH_FRAMES or size + len(frame) + 8 > wire.MAX_FRAME_BYTES
        ):
            out.append(wire.batch(run))
            run, size = [], 64
        run.append(frame)
        size += len(frame) + 8
    if run:
        out.append(wire.batch(run))
    return out
