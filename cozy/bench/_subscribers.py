"""Subscriber load generator: a separate process holding many real WebSocket subscribers.

Run by the bench as ``python -m cozy.bench._subscribers SPEC_JSON``, one or more at once, so
the relay's fan-out is measured at subscribers that have their own interpreters (and the relay
is not starved by a load generator sharing its GIL). The conversation on stdin/stdout, one
JSON document per line:

1. the child opens ``count`` connections, authenticates each with ``token`` and subscribes to
   ``collab_id`` from ``from_seq``; once every subscription is caught up it prints
   ``{"ready": N, "failed": K}``;
2. the parent publishes and writes ``{"t0": T, "rate": R, "base_seq": B, "timeout": S}``
   (T on the machine-wide monotonic clock, when event seq B was due to be sent);
3. each subscriber reads until it has ``expect`` events from seq B on, is dropped (counted
   in ``dropped``), or ``timeout`` seconds after T passed; the child prints the counts and, when
   ``samples_path`` is set, writes each delivery's latency (receipt - the event's scheduled
   send time T + (seq - B)/R, in seconds) to that file as native doubles.

Times are `time.monotonic()` (CLOCK_MONOTONIC, shared by every process on the machine), not
Trio's clock, which carries a per-run offset.
"""

from __future__ import annotations

import array
import json
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed

from clientkit._transport import open_websocket
from cozy.bench._common import authed, raise_nofile_limit
from model import wire

OPEN_CONCURRENCY = 64


@dataclass
class _Sub:
    received: list[tuple[int, float]] = field(default_factory=list)
    dropped: bool = False


async def _subscriber(
    spec: dict[str, Any],
    sub: _Sub,
    opening: trio.Semaphore,
    ready: trio.MemorySendChannel[bool],
    all_done: trio.Event,
    remaining: list[int],
) -> None:
    expect: int = spec["expect"]
    base: int = spec["from_seq"]
    readied = False
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        try:
            async with opening:
                ws = await stack.enter_async_context(open_websocket(spec["url"], nursery))
                frames = await authed(ws, spec["token"])
                request = wire.Subscribe(rid=1, collab_id=spec["collab_id"], from_seq=base)
                await ws.send_message(wire.encode(request))
                while not isinstance(await frames.next(), wire.CaughtUp):
                    pass
            readied = True
            await ready.send(True)
            received = sub.received
            while len(received) < expect:
                frame = await frames.next()
                if isinstance(frame, wire.Event) and frame.seq >= base:
                    received.append((frame.seq, time.monotonic()))
        except (ConnectionClosed, OSError, trio.TooSlowError):
            sub.dropped = True
            if not readied:
                await ready.send(False)
        remaining[0] -= 1
        if remaining[0] == 0:
            all_done.set()


async def _main(spec: dict[str, Any]) -> None:
    count: int = spec["count"]
    subs = [_Sub() for _ in range(count)]
    opening = trio.Semaphore(OPEN_CONCURRENCY)
    all_done = trio.Event()
    remaining = [count]
    ready_send, ready_recv = trio.open_memory_channel[bool](count)
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    async with trio.open_nursery() as nursery:
        for sub in subs:
            nursery.start_soon(_subscriber, spec, sub, opening, ready_send, all_done, remaining)
        ok = failed = 0
        for _ in range(count):
            if await ready_recv.receive():
                ok += 1
            else:
                failed += 1
        _emit({"ready": ok, "failed": failed})
        go = json.loads(await _read_line(stdin))
        deadline = go["t0"] + go["timeout"]
        with trio.move_on_after(max(0.0, deadline - time.monotonic())):
            await all_done.wait()
        nursery.cancel_scope.cancel()
    t0, rate, base = go["t0"], go["rate"], go["base_seq"]
    times = [t for s in subs for _, t in s.received]
    if spec.get("samples_path"):
        samples = array.array(
            "d", (t - (t0 + (seq - base) / rate) for s in subs for seq, t in s.received)
        )
        with open(spec["samples_path"], "wb") as f:  # noqa: ASYNC230 — the loop is finished
            samples.tofile(f)
    _emit(
        {
            "deliveries": len(times),
            "complete": sum(len(s.received) >= spec["expect"] for s in subs),
            "dropped": sum(s.dropped for s in subs),
            "first": min(times, default=0.0),
            "last": max(times, default=0.0),
        }
    )


async def _read_line(stream: trio.lowlevel.FdStream) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError("the bench closed our stdin before saying go")
        buf += chunk
    return buf.decode()


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise_nofile_limit()
    trio.run(_main, json.loads(sys.argv[1]))
