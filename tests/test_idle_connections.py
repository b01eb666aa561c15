"""What an idle subscriber costs the relay (issue 17, target 4; docs/performance.md).

An idle, authenticated, subscribed connection used to keep five Trio tasks of its own asleep in
the relay (the writer, the session-expiry watch, the login deadline, the subscription's
heartbeat loop, besides trio-websocket's handler and reader), about 2.7 KiB each. Now its
timers live in one relay-wide task (relay/_timers.py), its writer runs only while there is
something to send, and the relay's own WebSocket server (relay/_wsraw.py) reads the socket in
the request loop's task, so what is left per connection is that one task. The relay's tasks
are told from the test's clients by their ancestry (under `run_relay`'s serving task).

The second test looks at what an idle connection's objects still refer to: no upgrade request
or parser, no message channel, no outbox, no Event or lock made before it was needed.

That the behaviours those tasks carried still hold (expiry ends a quiet subscription, the
login deadline closes, heartbeats arrive, a lagging client is dropped) is tested where they
are: tests/test_session_end.py, tests/test_front_door.py, tests/test_checkpoints.py,
tests/test_overload.py.
"""

from __future__ import annotations

import collections
import gc
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from clientkit._transport import FrameReader, open_websocket
from model import wire
from tests.relay_harness import relay_config, running_relay, sign_up

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from relay._server import Relay
    from tests.relay_harness import User

SUBSCRIBERS = 12
# The connection's task: the relay's request loop, which also reads the socket.
TASKS_PER_IDLE_SUBSCRIBER = 1


def _relay_tasks() -> collections.Counter[str]:
    """Every task the relay runs (those under `run_relay`'s serving task), by name."""
    out: collections.Counter[str] = collections.Counter()
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [(root, False)]
    while stack:
        task, relays = stack.pop()
        relays = relays or task.name.endswith("serve_then_stop")
        if relays:
            out[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend((child, relays) for child in nursery.child_tasks)
    assert out, "the relay's serving task was not found (renamed in relay/_run.py?)"
    return out


async def _hold_idle(
    url: str, user: User, done: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    """One more connection: authenticated, subscribed, caught up, then left alone until
    `done`."""
    async with trio.open_nursery() as nursery, open_websocket(url, nursery) as ws:
        frames = FrameReader(ws)
        assert isinstance(await frames.next(), wire.Welcome)
        await ws.send_message(wire.encode(wire.Authenticate(rid=1, token=user.token)))
        assert isinstance(await frames.next(), wire.Authenticated)
        subscribe = wire.Subscribe(rid=2, collab_id=user.collab_id, from_seq=1)
        await ws.send_message(wire.encode(subscribe))
        while not isinstance(frame := await frames.next(), wire.CaughtUp):
            assert not isinstance(frame, wire.Error), frame
        task_status.started()
        await done.wait()
        nursery.cancel_scope.cancel()


async def _settle(quiet: Callable[[], bool]) -> None:
    """Wait (at most 10 s) until `quiet()`; the caller's assertions then say what is wrong."""
    for _ in range(200):
        if quiet():
            return
        await trio.sleep(0.05)


@asynccontextmanager
async def _idle_subscribers(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[Relay, Callable[[], Awaitable[None]]]]:
    """A relay, and `hold()` to open one more idle subscriber on it (`_hold_idle`); all of
    them are let go when the block ends (within 60 s)."""
    async with running_relay(relay_config(database_url, tmp_path / "relay")) as relay:
        user = await sign_up(relay.url)
        done = trio.Event()
        with trio.fail_after(60):
            async with trio.open_nursery() as clients:

                async def hold() -> None:
                    await clients.start(_hold_idle, relay.url, user, done)

                try:
                    yield relay, hold
                finally:
                    done.set()


async def test_an_idle_subscriber_keeps_no_task_of_its_own_in_the_relay(
    database_url: str, tmp_path: Path
) -> None:
    async with _idle_subscribers(database_url, tmp_path) as (_, hold):
        await hold()  # warm: first-use state
        before = _relay_tasks()
        for _ in range(SUBSCRIBERS):
            await hold()
        # Each connection's last reply (`caught_up`) may still be on its way out: wait for the
        # relay to go quiet (a writer task ends once its outbox is empty).
        allowed = TASKS_PER_IDLE_SUBSCRIBER * SUBSCRIBERS
        await _settle(lambda: _relay_tasks().total() - before.total() <= allowed)
        after = _relay_tasks()
        extra = {
            name: (after[name] - before[name]) / SUBSCRIBERS
            for name in after
            if after[name] > before[name]
        }
        assert after.total() - before.total() <= allowed, f"tasks per idle subscriber: {extra}"


# What an idle connection must not keep: the upgrade (its request and HTTP parser), a message
# channel or a second task's plumbing, or an Event, lock or queue made before it was needed.
NOT_KEPT_WHEN_IDLE = frozenset(
    {
        "H11Handshake",
        "WSConnection",
        "WebSocketRequest",
        "UpgradeRequest",
        "Request",
        "MemorySendChannel",
        "MemoryReceiveChannel",
        "MemoryChannelState",
        "Event",
        "StrictFIFOLock",
        "ParkingLot",
        "deque",
    }
)


def _kept(obj: object, depth: int) -> set[str]:
    """The type names of what `obj` refers to, up to `depth` references deep; a dict (such as
    an object's `__dict__`) is looked through at no cost in depth. (wsproto's parser keeps a
    deque of parsed events two levels down: its own business, out of reach at depth 2.)"""
    names: set[str] = set()

    def walk(item: object, depth: int) -> None:
        for ref in gc.get_referents(item):
            if isinstance(ref, type):
                continue
            if isinstance(ref, dict):
                walk(ref, depth)
                continue
            names.add(type(ref).__name__)
            if depth > 1:
                walk(ref, depth - 1)

    walk(obj, depth)
    return names


async def test_an_idle_connection_keeps_no_upgrade_state_channel_or_early_made_objects(
    database_url: str, tmp_path: Path
) -> None:
    async with _idle_subscribers(database_url, tmp_path) as (relay, hold):
        for _ in range(3):
            await hold()
        idle = [c for c in relay._connections if c.subscriptions]
        # until each one's last reply was written
        await _settle(lambda: all(c.outbox_frames == 0 and c._writer_done is None for c in idle))
        kept = {
            "connection": set().union(*(_kept(c, 1) for c in idle)),
            "websocket": set().union(*(_kept(c.ws, 2) for c in idle)),
        }
        assert len(idle) == 3
        assert {k: v & NOT_KEPT_WHEN_IDLE for k, v in kept.items()} == {
            "connection": set(),
            "websocket": set(),
        }
