"""Catch-up costs bounded memory, and concurrent catch-ups are capped (SO-6, issue 13 item 6).

The attack: a cheap client subscribes to a large collab from seq 1 and then stops reading its
socket. Before the fix the relay read a 500-event page (up to ~32 MiB) per catch-up and held
it until the client read; fifty such clients took a relay to gigabytes. Now a catch-up reads
the ledger in pages bounded in bytes and queues them through the connection's bounded outbox,
so a client that stops reading pins at most one page plus its share of the outbox.

The memory test runs the relay as an operator does (`cozy relay serve`, a child process) so
its resident memory can be read from /proc, and fills a collab with large events first.
"""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio_websocket

from clientkit._transport import FrameReader
from fanout import BATCH_BYTES, LAG_CLOSE_CODE, PAGES_HELD, CatchupLimits
from model import wire
from model.envelope import SignedEvent, seal_event
from relay._connection import WRITE_BYTES
from relay.embedded import free_port
from tests.fault_harness import RelayProcess
from tests.relay_harness import User, relay_config, running_relay, session, sign_up
from tests.test_ops import metrics
from tests.test_overload import authed, stalling_socket, wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from relay._server import Relay

pytestmark = pytest.mark.usefixtures("database_url")

MiB = 1024 * 1024
LIMITS = CatchupLimits()  # the relay's defaults, which the memory test runs with
# What one stalled catch-up may pin: its pages (the one it queues, the two it read ahead), its
# share of the outbox and one message over it, and what the connection's writer holds while
# the socket does not take it (a chunk of about WRITE_BYTES, plus the message that crossed it).
PER_CATCHUP_BYTES = (
    PAGES_HELD * LIMITS.page_bytes + LIMITS.outbox_bytes + WRITE_BYTES + 2 * BATCH_BYTES
)
MARGIN_BYTES = 64 * MiB  # fifty connections' own state, allocator slack
G = 1  # the genesis event
STALLED = 50
BIG_EVENTS = 640  # more than one 500-event page of the old code
BIG_CONTENT = 60_000  # each event's body is just under the 64 KiB limit


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of process `pid` from /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> None:
    """Make VmHWM (peak resident memory) start again from the current VmRSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def big_event(user: User, i: int, size: int) -> SignedEvent:
    """An event whose sealed content is `size` bytes: the relay cannot see what it holds (a
    client would never make it, an attacker can), so only its size matters here."""
    return seal_event(
        signing_key=user.signing_key,
        collab_key=user.collab_key,
        collab_id=user.collab_id,
        actor_id=user.account_id,
        kind="msg",
        ts=1_700_000_000_000 + i,
        content=bytes(size),
    )


async def fill(url: str, user: User, events: int, size: int) -> int:
    """Append `events` events of about `size` bytes each to the user's collab; the new head."""
    acks: list[wire.Appended] = []
    async with session(url, user) as client:
        for start in range(0, events, 64):
            batch = [big_event(user, i, size) for i in range(start, min(events, start + 64))]
            acks += await client.append_many(batch)
    return max(a.seq for a in acks)


async def stall_after_first_event(
    url: str,
    user: User,
    collab_id: str,
    stalled: trio.Event,
    release: trio.Event,
    seen: list[int],
    done: trio.Event,
) -> None:
    """Subscribe from seq 1, read up to the first event, then read nothing until `release`;
    then read everything (into `seen`) up to `caught_up`, and set `done`."""
    async with stalling_socket(url) as ws:
        frames = FrameReader(ws)
        assert isinstance(await frames.next(), wire.Welcome)
        await ws.send_message(wire.encode(wire.Authenticate(rid=1, token=user.token)))
        assert isinstance(await frames.next(), wire.Authenticated)
        await ws.send_message(wire.encode(wire.Subscribe(rid=2, collab_id=collab_id)))
        while True:
            frame = await frames.next()
            if isinstance(frame, wire.Event):
                seen.append(frame.seq)
                break
            assert isinstance(frame, wire.Subscribed), frame
        stalled.set()
        await release.wait()
        while not isinstance(frame := await frames.next(), wire.CaughtUp):
            assert isinstance(frame, wire.Event), frame
            seen.append(frame.seq)
        done.set()


async def settle(sample: Callable[[], int], *, quiet: float = 3.0, limit: float = 90.0) -> None:
    """Wait until `sample()` stops growing by more than 1 MiB for `quiet` seconds (at most
    `limit` seconds): the stalled catch-ups have filled whatever they are going to fill."""
    with trio.move_on_after(limit):
        while True:
            base = sample()
            await trio.sleep(quiet)
            if sample() - base < 1024:
                return


@pytest.mark.objective("SO-6")
async def test_fifty_stalled_catchups_keep_the_relay_under_its_memory_bound(
    database_url: str, tmp_path: Path
) -> None:
    """Fifty connections subscribe from seq 1 to a ~38 MiB collab and stop reading. The
    relay's resident memory grows by at most 50 x PER_CATCHUP_BYTES (5.5 MiB) plus a fixed
    margin; and one of them, once it reads again, gets every event once and in order, then
    `caught_up`. Before the fix: +1903 MiB (88 MiB before, 1990 MiB peak)."""
    ops_port = free_port()
    relay = RelayProcess(database_url, tmp_path / "relay")
    await relay.start(
        COZY_OPS_PORT=str(ops_port),
        # Caps high enough to let every one of the fifty in: this measures what each costs.
        COZY_MAX_CONNECTIONS_PER_ACCOUNT=str(STALLED + 4),
        COZY_CATCHUPS_PER_CONNECTION="1",
        COZY_CATCHUPS_PER_ACCOUNT=str(STALLED),
        COZY_CATCHUPS_PER_RELAY=str(STALLED),
    )
    ops_url = f"http://127.0.0.1:{ops_port}"
    try:
        with trio.fail_after(600):
            alice = await sign_up(relay.url, "alice")
            head = await fill(relay.url, alice, BIG_EVENTS, BIG_CONTENT)
            before = rss_kib(relay.pid)
            reset_peak(relay.pid)
            release, done = trio.Event(), trio.Event()
            seen: list[list[int]] = [[] for _ in range(STALLED)]
            async with trio.open_nursery() as nursery:
                stalled = [trio.Event() for _ in range(STALLED)]
                for i in range(STALLED):
                    nursery.start_soon(
                        stall_after_first_event,
                        relay.url,
                        alice,
                        alice.collab_id,
                        stalled[i],
                        release if i == 0 else trio.Event(),  # only the first reads again
                        seen[i],
                        done,
                    )
                for s in stalled:
                    await s.wait()
                await settle(lambda: rss_kib(relay.pid))
                catching_up = (await metrics(ops_url))['cozy_subscriptions{state="catching_up"}']
                peak = rss_kib(relay.pid, "VmHWM")
                release.set()
                await done.wait()
                nursery.cancel_scope.cancel()
    finally:
        await relay.stop()
    growth = (peak - before) * 1024
    bound = STALLED * PER_CATCHUP_BYTES + MARGIN_BYTES
    print(
        f"\n{STALLED} stalled catch-ups over {head} events (~{head * BIG_CONTENT // MiB} MiB): relay"
        f" RSS {before // 1024} MiB before, peak {peak // 1024} MiB, growth"
        f" {growth / MiB:.0f} MiB; bound {bound / MiB:.0f} MiB"
    )
    assert catching_up == STALLED  # every one was held mid-catch-up while measured
    assert seen[0] == list(range(1, head + 1))
    assert growth <= bound, f"{growth / MiB:.0f} MiB for {STALLED} stalled catch-ups"


# --- caps, stalls and the hand-over, on a relay in this process --------------------------------


@asynccontextmanager
async def relay_with(
    database_url: str, tmp_path: Path, limits: CatchupLimits
) -> AsyncIterator[Relay]:
    config = dataclasses.replace(relay_config(database_url, tmp_path), catchup=limits)
    async with running_relay(config) as relay:
        yield relay


@asynccontextmanager
async def stalled_catchup(url: str, user: User, collab_id: str) -> AsyncIterator[FrameReader]:
    """A connection whose subscription from seq 1 started catching up and then stopped reading."""
    async with stalling_socket(url) as ws:
        frames = FrameReader(ws)
        assert isinstance(await frames.next(), wire.Welcome)
        await ws.send_message(wire.encode(wire.Authenticate(rid=1, token=user.token)))
        assert isinstance(await frames.next(), wire.Authenticated)
        await ws.send_message(wire.encode(wire.Subscribe(rid=2, collab_id=collab_id)))
        assert isinstance(await frames.next(), wire.Subscribed)
        assert isinstance(await frames.next(), wire.Event)
        yield frames


async def answer(frames: FrameReader, collab_id: str, rid: int) -> wire.Reply:
    """Subscribe to `collab_id` and return the answer, reading past any catch-up queued ahead."""
    await frames.ws.send_message(wire.encode(wire.Subscribe(rid=rid, collab_id=collab_id)))
    while True:
        frame = await frames.next()
        if getattr(frame, "rid", None) == rid:
            return frame


# Bigger than what the kernel's socket buffers and the relay's bounds absorb, so a client that
# stops reading leaves its catch-up running: ~9 MiB.
HELD_EVENTS = 150


@pytest.mark.objective("SO-6")
async def test_catchups_over_a_cap_are_refused_with_overloaded_and_say_what_to_do(
    database_url: str, tmp_path: Path
) -> None:
    """One connection, one account and the whole relay each run at most their cap of
    catch-ups; the next subscribe is refused with `overloaded` naming the cap and what to do,
    and the slots come back when the catch-ups end. The client kit retries such a refusal
    until a slot is free."""
    limits = CatchupLimits(per_connection=1, per_account=2, per_relay=2)
    async with relay_with(database_url, tmp_path, limits) as relay:
        with trio.fail_after(120):
            alice = await sign_up(relay.url, "alice")
            bob = await sign_up(relay.url, "bob")
            await fill(relay.url, alice, HELD_EVENTS, BIG_CONTENT)
            async with session(relay.url, alice) as client:
                other, _ = await client.create_collab(
                    alice.signing_key, bytes(alice.box_key.public_key)
                )
            kit_caught_up = trio.Event()

            async def bob_with_the_client_kit() -> None:
                """Refused at first; the client kit retries until a slot is free."""
                async with session(relay.url, bob) as kit, kit.subscribe(bob.collab_id) as pushed:
                    async for frame in pushed:
                        if isinstance(frame, wire.CaughtUp):
                            kit_caught_up.set()
                            return

            async with authed(relay.url, bob) as (_, bobs), trio.open_nursery() as nursery:
                async with (
                    stalled_catchup(relay.url, alice, alice.collab_id) as first,
                    stalled_catchup(relay.url, alice, alice.collab_id),
                ):
                    assert relay.fanout.statistics().catchups == 2
                    # A third connection of the same account: the per-account cap.
                    async with authed(relay.url, alice) as (_, third):
                        by_account = await answer(third, other, 11)
                    # Another account: the relay's cap.
                    by_relay = await answer(bobs, bob.collab_id, 12)
                    # The first connection, another collab: the per-connection cap (decided on
                    # arrival; the answer queues behind the catch-up the client did not read).
                    by_connection = await answer(first, other, 10)
                    nursery.start_soon(bob_with_the_client_kit)
                    await wait_until(lambda: relay.fanout.statistics().catchup_refusals > 3)
                # The stalled connections closed: their slots are back, and bob gets in.
                await wait_until(lambda: relay.fanout.statistics().catchups == 0)
                assert await answer(bobs, bob.collab_id, 13) == wire.Subscribed(
                    rid=13, collab_id=bob.collab_id, from_seq=1
                )
                while not isinstance(await bobs.next(), wire.CaughtUp):
                    pass
                await kit_caught_up.wait()
                assert relay.fanout.statistics().catchups == 0  # live now: the slot is back
            exported = await metrics(relay.ops_url)
    for refused, rid, says in [
        (by_connection, 10, "1 subscriptions are already catching up on this connection"),
        (by_account, 11, "this account already has 2 subscriptions catching up"),
        (by_relay, 12, "the relay is serving 2 catch-ups"),
    ]:
        assert isinstance(refused, wire.Error), refused
        assert (refused.rid, refused.code) == (rid, wire.ErrorCode.OVERLOADED)
        assert says in refused.message
    assert "wait for `caught_up` on one of them, then subscribe again" in by_account.message
    assert "retry in a few seconds" in by_relay.message
    stats = relay.statistics()
    assert stats.fanout is not None
    refusals = stats.fanout.catchup_refusals  # three here, the client kit's retries
    assert refusals > 3
    assert stats.overloaded_total == refusals
    assert exported["cozy_catchup_refusals_total"] == refusals
    assert exported["cozy_catchups"] == 0


@pytest.mark.objective("SO-6")
async def test_a_catchup_that_finds_no_room_is_disconnected_and_frees_its_slot(
    database_url: str, tmp_path: Path
) -> None:
    """A client that stops reading mid catch-up does not hold its slot for ever: after
    `stall_seconds` without room it is closed with 4008 and a reason to resume."""
    limits = CatchupLimits(per_relay=1, stall_seconds=1)
    async with relay_with(database_url, tmp_path, limits) as relay:
        with trio.fail_after(120):
            alice = await sign_up(relay.url, "alice")
            await fill(relay.url, alice, HELD_EVENTS, BIG_CONTENT)
            async with stalled_catchup(relay.url, alice, alice.collab_id) as frames:
                await wait_until(lambda: relay.fanout.statistics().catchup_stalls == 1)
                assert relay.fanout.statistics().catchups == 0
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await frames.next()
            # The slot is free: a reading client catches up.
            async with session(relay.url, alice) as client:
                seqs = []
                async with client.subscribe(alice.collab_id, follow=False) as pushed:
                    async for frame in pushed:
                        if isinstance(frame, wire.CaughtUp):
                            break
                        assert isinstance(frame, wire.Event)
                        seqs.append(frame.seq)
    assert seqs == list(range(1, G + HELD_EVENTS + 1))
    assert closed.value.reason.code == LAG_CLOSE_CODE
    assert "subscriber stalled on " + alice.collab_id in (closed.value.reason.reason or "")
    assert "reconnect and resume after the last seq you received (at most" in (
        closed.value.reason.reason or ""
    )


async def test_a_catchup_of_many_small_pages_hands_over_to_live_without_gap_or_duplicate(
    database_url: str, tmp_path: Path
) -> None:
    """Pages of three events (and a few hundred bytes) while an author keeps appending: the
    subscriber sees every seq exactly once, in order, across the pages, the backlog and live."""
    limits = CatchupLimits(page_events=3, page_bytes=600)
    async with relay_with(database_url, tmp_path, limits) as relay:
        with trio.fail_after(120):
            alice = await sign_up(relay.url, "alice")
            async with session(relay.url, alice) as poster, session(relay.url, alice) as reader:
                await poster.append_many(
                    [alice.event(f"before-{i}", ts=1_700_000_000_000 + i) for i in range(60)]
                )
                got: list[int] = []
                async with reader.subscribe(alice.collab_id) as frames, trio.open_nursery() as n:

                    async def more() -> None:
                        for i in range(60):
                            await poster.append(alice.event(f"after-{i}", ts=1_700_000_100_000 + i))

                    n.start_soon(more)
                    async for frame in frames:
                        if isinstance(frame, wire.Event):
                            got.append(frame.seq)
                            if frame.seq == G + 120:
                                break
    assert got == list(range(1, G + 121))


async def test_pages_read_ahead_at_a_wrong_guess_are_read_again_without_gap_or_duplicate(
    database_url: str, tmp_path: Path
) -> None:
    """Two pages are read ahead, the second from where the first should end; events whose sizes
    jump (short runs, then long ones) make pages end early, so guesses go wrong. Every seq
    still arrives exactly once, in order, and the wrong reads were seen and dropped."""
    limits = CatchupLimits(page_events=64, page_bytes=4000)
    async with relay_with(database_url, tmp_path, limits) as relay:
        with trio.fail_after(120):
            alice = await sign_up(relay.url, "alice")
            async with session(relay.url, alice) as poster, session(relay.url, alice) as reader:
                texts = [("x" * (900 if (i // 7) % 2 else 10)) + str(i) for i in range(150)]
                await poster.append_many(
                    [alice.event(t, ts=1_700_000_000_000 + i) for i, t in enumerate(texts)]
                )
                got: list[int] = []
                async with reader.subscribe(alice.collab_id, follow=False) as frames:
                    async for frame in frames:
                        if isinstance(frame, wire.Event):
                            got.append(frame.seq)
                        elif isinstance(frame, wire.CaughtUp):
                            break
    assert got == list(range(1, G + 151))
    assert relay.fanout.statistics().catchup_reads_dropped > 0
