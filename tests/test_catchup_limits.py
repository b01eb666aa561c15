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

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from clientkit._transport import FrameReader
from fanout import BATCH_BYTES, CatchupLimits
from model import wire
from model.envelope import SignedEvent, seal_event
from relay._connection import WRITE_BYTES
from relay.embedded import free_port
from tests.fault_harness import RelayProcess
from tests.relay_harness import User, session, sign_up
from tests.test_ops import metrics
from tests.test_overload import stalling_socket

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.usefixtures("database_url")

MiB = 1024 * 1024
LIMITS = CatchupLimits()  # the relay's defaults, which the memory test runs with
# What one stalled catch-up may pin: its page, its share of the outbox and one message over
# it, and what the connection's writer holds while the socket does not take it (a chunk of
# about WRITE_BYTES, plus the message that crossed it).
PER_CATCHUP_BYTES = LIMITS.page_bytes + LIMITS.outbox_bytes + WRITE_BYTES + 2 * BATCH_BYTES
MARGIN_BYTES = 64 * MiB  # fifty connections' own state, allocator slack
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
    relay's resident memory grows by at most 50 x PER_CATCHUP_BYTES (3.5 MiB) plus a fixed
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
