"""`cozy bench append`: a real relay (its own process) on a real Postgres, driven over WebSockets.

The load generator runs in this process and the relay in a child process, so they do not share
a GIL; Postgres is a third process. All three share this machine's cores, as in the issue's
targets. Events are signed before the clock starts (signing is the client's cost, not the
relay's); the relay verifies every signature, sequences, group-commits and acks.

Prints one JSON document on stdout and a short human summary on stderr.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nacl.public
import nacl.signing
import trio

from clientkit import connect
from clientkit._transport import FrameReader, open_websocket
from ledger import migrate
from model import content as contentmod
from model import wire
from model._crypto import random_bytes
from model.envelope import SignedEvent, event_id, seal_event
from relay.embedded import embedded_postgres, free_port, wait_until_listening

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator

    import trio_websocket

BODY_BYTES = 512
WINDOW = 512
PASSWORD = "bench password that is long enough"  # noqa: S105 — throwaway bench accounts


class BenchError(Exception):
    """The benchmark could not run as designed (a refusal where none was expected)."""


@dataclass
class Actor:
    handle: str
    account_id: str
    signing_key: nacl.signing.SigningKey
    token: str
    collabs: list[str] = field(default_factory=list)


def main(args: argparse.Namespace) -> int:
    result = trio.run(_bench_append, args)
    print(json.dumps(result, indent=2))
    s = result["scenarios"]
    print(
        f"append, 1 collab:    {s['append_1_collab']['events_per_s']:>9,.0f} events/s\n"
        f"append, 100 collabs: {s['append_100_collabs']['events_per_s']:>9,.0f} events/s\n"
        f"append→delivery at {s['latency']['offered_per_s']} events/s: "
        f"p50 {s['latency']['p50_ms']:.2f} ms, p99 {s['latency']['p99_ms']:.2f} ms",
        file=sys.stderr,
    )
    return 0


async def _bench_append(args: argparse.Namespace) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cozy-bench-")))
        url = args.database_url or await stack.enter_async_context(embedded_postgres(tmp / "pg"))
        await trio.to_thread.run_sync(migrate, url)
        relay_url = await stack.enter_async_context(_relay_process(url, tmp / "relay"))
        n = args.events
        one = await _setup(relay_url, accounts=1, collabs_each=1, tag="one")
        many = await _setup(relay_url, accounts=10, collabs_each=10, tag="many")
        lat = await _setup(relay_url, accounts=1, collabs_each=1, tag="lat")
        return {
            "benchmark": "append",
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "body_bytes": BODY_BYTES,
            "window_per_connection": WINDOW,
            "appends_per_client_message": args.client_batch,
            "scenarios": {
                "append_1_collab": await _throughput(relay_url, one, n, args.client_batch),
                "append_100_collabs": await _throughput(relay_url, many, n, args.client_batch),
                "latency": await _latency(relay_url, lat[0], rate=1000, seconds=3.0),
            },
        }


async def _setup(relay_url: str, *, accounts: int, collabs_each: int, tag: str) -> list[Actor]:
    actors = []
    suffix = random_bytes(3).hex()
    for i in range(accounts):
        sign = nacl.signing.SigningKey.generate()
        box = nacl.public.PrivateKey.generate()
        handle = f"bench-{tag}-{suffix}-{i}"
        async with connect(relay_url) as client:
            account_id = await client.signup(handle, PASSWORD, sign, bytes(box.public_key))
            login = await client.login(handle, PASSWORD)
            actor = Actor(handle, account_id, sign, login.token)
            for _ in range(collabs_each):
                collab_id, _key = await client.create_collab(sign, bytes(box.public_key))
                actor.collabs.append(collab_id)
        actors.append(actor)
    return actors


def _presign(actor: Actor, count: int) -> list[SignedEvent]:
    key = random_bytes(32)
    # Pad the plaintext so the sealed body is about BODY_BYTES.
    text = "x" * (BODY_BYTES - 170)
    data = contentmod.encode_content(contentmod.Message(text=text))
    now = int(time.time() * 1000)
    return [
        seal_event(
            signing_key=actor.signing_key,
            collab_key=key,
            collab_id=actor.collabs[i % len(actor.collabs)],
            actor_id=actor.account_id,
            kind="msg",
            ts=now + i,
            content=data,
        )
        for i in range(count)
    ]


async def _throughput(
    relay_url: str, actors: list[Actor], total: int, client_batch: int
) -> dict[str, object]:
    per_actor = total // len(actors)
    batches = [await trio.to_thread.run_sync(_presign, a, per_actor) for a in actors]
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for actor, events in zip(actors, batches, strict=True):
            nursery.start_soon(_pump, relay_url, actor, events, client_batch)
    elapsed = time.perf_counter() - started
    sent = per_actor * len(actors)
    return {
        "collabs": sum(len(a.collabs) for a in actors),
        "connections": len(actors),
        "events": sent,
        "seconds": round(elapsed, 3),
        "events_per_s": round(sent / elapsed, 1),
    }


async def _authed(ws: trio_websocket.WebSocketConnection, token: str) -> FrameReader:
    frames = FrameReader(ws)
    await frames.next()  # Welcome
    await ws.send_message(wire.encode(wire.Authenticate(rid=0, token=token)))
    reply = await frames.next()
    if not isinstance(reply, wire.Authenticated):
        raise BenchError(f"bench login failed: {reply}")
    return frames


async def _pump(relay_url: str, actor: Actor, events: list[SignedEvent], client_batch: int) -> None:
    """Keep WINDOW appends in flight on one connection until every one is acked.

    Appends go out `client_batch` to a WebSocket message (a `Batch` frame), as a pipelining
    client would send what it has queued.
    """
    window = trio.Semaphore(WINDOW)
    async with trio.open_nursery() as nursery, open_websocket(relay_url, nursery) as ws:
        frames = await _authed(ws, actor.token)

        async def read_acks() -> None:
            for _ in events:
                reply = await frames.next()
                if not isinstance(reply, wire.Appended):
                    raise BenchError(f"bench append refused: {reply}")
                window.release()

        async with trio.open_nursery() as inner:
            inner.start_soon(read_acks)
            encoded = [wire.encode(wire.Append(rid=i, event=ev)) for i, ev in enumerate(events, 1)]
            for start in range(0, len(encoded), client_batch):
                chunk = encoded[start : start + client_batch]
                for _ in chunk:
                    await window.acquire()
                await ws.send_message(wire.batch(chunk))


async def _latency(relay_url: str, actor: Actor, *, rate: int, seconds: float) -> dict[str, object]:
    """Offer `rate` events/s for `seconds` and time each from send to delivery to a subscriber."""
    count = int(rate * seconds)
    events = await trio.to_thread.run_sync(_presign, actor, count)
    sent_at: dict[bytes, float] = {}
    delays: list[float] = []
    async with (
        trio.open_nursery() as nursery,
        open_websocket(relay_url, nursery) as sub,
        open_websocket(relay_url, nursery) as pub,
    ):
        sub_frames = await _authed(sub, actor.token)
        pub_frames = await _authed(pub, actor.token)
        collab = actor.collabs[0]
        await sub.send_message(wire.encode(wire.Subscribe(rid=1, collab_id=collab, from_seq=1)))

        async def receive() -> None:
            while len(delays) < count:
                frame = await sub_frames.next()
                if isinstance(frame, wire.Event):
                    t = sent_at.get(event_id(frame.event))
                    if t is not None:
                        delays.append(time.perf_counter() - t)

        async def drain_acks() -> None:
            for _ in range(count):
                await pub_frames.next()

        async with trio.open_nursery() as inner:
            inner.start_soon(receive)
            inner.start_soon(drain_acks)
            start = time.perf_counter()
            for i, ev in enumerate(events):
                target = start + i / rate
                await trio.sleep_until(trio.current_time() + max(0.0, target - time.perf_counter()))
                sent_at[event_id(ev)] = time.perf_counter()
                await pub.send_message(wire.encode(wire.Append(rid=i + 1, event=ev)))
    delays.sort()
    return {
        "offered_per_s": rate,
        "events": count,
        "p50_ms": round(statistics.median(delays) * 1000, 3),
        "p99_ms": round(delays[int(len(delays) * 0.99) - 1] * 1000, 3),
        "max_ms": round(delays[-1] * 1000, 3),
    }


@asynccontextmanager
async def _relay_process(database_url: str, data_dir: Path) -> AsyncIterator[str]:
    """`cozy relay serve` in a child process; its log goes to relay.log beside `data_dir`."""
    port = free_port()
    env = dict(os.environ, DATABASE_URL=database_url)
    command = [sys.executable, "-m", "cozy.cli", "relay", "serve"]
    command += ["--port", str(port), "--data-dir", str(data_dir)]
    with (data_dir.parent / "relay.log").open("wb") as log_file:
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                partial(trio.run_process, command, env=env, stderr=log_file, check=False)
            )
            await wait_until_listening(port, proc, "the benchmark relay")
            try:
                yield f"ws://127.0.0.1:{port}"
            finally:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
                nursery.cancel_scope.cancel()
