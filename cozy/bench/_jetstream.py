"""The peer: NATS JetStream doing the relay's jobs with the same signed payloads.

Run by the bench as ``python -m cozy.bench._jetstream SPEC_JSON``; prints one JSON document.
nats-py is asyncio, so it lives in its own process (never beside Trio in one thread). This
process starts the real `nats-server` binary with JetStream on a file store with
``sync_interval: always`` (an fsync per write, the closest match to the relay's
``synchronous_commit=on``), one stream over ``collab.>`` and one subject per collab.

Scenarios mirror the relay's: publish throughput awaiting each ack (sequential) and with many
in flight (pipelined); fan-out to N ordered consumers; latency from each message's scheduled
send time (open loop) to its delivery at 100 ordered consumers; idle ordered consumers (one
connection each) and the server's resident memory per consumer; an ordered consumer
replaying a stream from the start. Unlike the relay's scenarios, publisher and consumers share
this one process (and its event loop), which handicaps JetStream's delivery figures a little.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import psutil  # type: ignore[import-untyped]  # no stubs in the venv
from nats.js.api import DeliverPolicy, StorageType, StreamConfig

from cozy.bench._common import load_payloads, percentiles, raise_nofile_limit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

STREAM = "COLLABS"
CONSUMERS_PER_CONNECTION = 50
OPEN_CONCURRENCY = 64
# Seconds a JetStream API request (an ordered consumer's creation) may take: nats-py's 5 s
# default timed out creating 10,000 idle consumers on the shared 2-core machine.
JS_API_TIMEOUT = 60.0
MAX_CONSUMERS = 100_000


@contextlib.asynccontextmanager
async def _nats_server(binary: str, work: Path) -> AsyncIterator[tuple[str, psutil.Process]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = work / "jetstream"
    conf = work / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        "max_payload: 1MB\n"
        f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: always\n}}\n'
    )
    log = (work / "nats-server.log").open("wb")
    proc = await asyncio.create_subprocess_exec(binary, "-js", "-c", str(conf), stderr=log)
    try:
        url = f"nats://127.0.0.1:{port}"
        async with asyncio.timeout(30):
            while True:
                try:
                    _r, w = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    if proc.returncode is not None:
                        raise RuntimeError(f"nats-server exited with {proc.returncode}") from None
                    await asyncio.sleep(0.1)
                else:
                    w.close()
                    break
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def _fresh_stream(js: JetStreamContext) -> None:
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(STREAM)
    # nats-server 2.15 caps a stream at 1000 consumers unless the stream sets its own limit
    # (and a value <= 0 means "the default", not "unlimited").
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=["collab.>"],
            storage=StorageType.FILE,
            max_consumers=MAX_CONSUMERS,
        )
    )


async def _publish_sequential(js: JetStreamContext, pairs: list[tuple[int, bytes]]) -> float:
    started = time.perf_counter()
    for collab, payload in pairs:
        await js.publish(f"collab.c{collab}", payload)
    return len(pairs) / (time.perf_counter() - started)


async def _publish_pipelined(js: JetStreamContext, pairs: list[tuple[int, bytes]]) -> float:
    started = time.perf_counter()
    futures = [await js.publish_async(f"collab.c{c}", p) for c, p in pairs]
    await asyncio.gather(*futures)
    return len(pairs) / (time.perf_counter() - started)


async def _append(js: JetStreamContext, spec: dict[str, Any]) -> dict[str, Any]:
    pairs = load_payloads(spec["payload_file"])
    await _fresh_stream(js)
    sequential = await _publish_sequential(js, pairs[: spec["sequential_max"]])
    await _fresh_stream(js)
    pipelined = await _publish_pipelined(js, pairs)
    return {
        "sequential_msgs_per_s": round(sequential, 1),
        "sequential_msgs": min(len(pairs), spec["sequential_max"]),
        "pipelined_msgs_per_s": round(pipelined, 1),
        "pipelined_msgs": len(pairs),
    }


class _Counter:
    """Counts deliveries to a group of consumers; `done` when all expected have arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.last = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        self.last = time.monotonic()
        if self.count >= self.expected:
            self.done.set()


async def _connections(url: str, n: int, stack: contextlib.AsyncExitStack) -> list[Client]:
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> Client:
        async with gate:
            nc = await nats.connect(url, max_reconnect_attempts=0, pending_size=64 * 1024 * 1024)
        stack.push_async_callback(nc.close)
        return nc

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _ordered_consumers(
    url: str, subject: str, n: int, per_connection: int, stack: contextlib.AsyncExitStack, cb: Any
) -> None:
    conns = await _connections(url, -(-n // per_connection), stack)
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            await (
                conns[i // per_connection]
                .jetstream(timeout=JS_API_TIMEOUT)
                .subscribe(
                    subject, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, cb=cb(i)
                )
            )

    await asyncio.gather(*(one(i) for i in range(n)))


async def _fanout(url: str, js: JetStreamContext, spec: dict[str, Any]) -> dict[str, Any]:
    pairs = load_payloads(spec["payload_file"])
    n = spec["subscribers"]
    await _fresh_stream(js)
    counter = _Counter(n * len(pairs))

    def cb(_i: int) -> Any:
        async def on_msg(_msg: Msg) -> None:
            counter.hit()

        return on_msg

    async with contextlib.AsyncExitStack() as stack:
        await _ordered_consumers(url, "collab.fan", n, CONSUMERS_PER_CONNECTION, stack, cb)
        started = time.monotonic()
        futures = [await js.publish_async("collab.fan", p) for _c, p in pairs]
        await asyncio.gather(*futures)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(spec["timeout"]):
                await counter.done.wait()
    elapsed = max(counter.last - started, 1e-9)
    return {
        "subscribers": n,
        "events": len(pairs),
        "deliveries": counter.count,
        "deliveries_per_s": round(counter.count / elapsed, 1),
    }


async def _latency(url: str, js: JetStreamContext, spec: dict[str, Any]) -> dict[str, Any]:
    pairs = load_payloads(spec["payload_file"])
    n, rate = spec["subscribers"], spec["rate"]
    await _fresh_stream(js)
    delays: list[float] = []
    expected = n * len(pairs)
    all_in = asyncio.Event()
    t0 = 0.0

    def cb(_i: int) -> Any:
        k = 0

        async def on_msg(_msg: Msg) -> None:
            nonlocal k
            delays.append(time.monotonic() - (t0 + k / rate))
            k += 1
            if len(delays) >= expected:
                all_in.set()

        return on_msg

    async with contextlib.AsyncExitStack() as stack:
        await _ordered_consumers(url, "collab.lat", n, CONSUMERS_PER_CONNECTION, stack, cb)
        t0 = time.monotonic() + 0.2
        futures = []
        for i, (_c, payload) in enumerate(pairs):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            futures.append(await js.publish_async("collab.lat", payload))
        await asyncio.gather(*futures)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(spec["timeout"]):
                await all_in.wait()
    return {"subscribers": n, "offered_per_s": rate, "deliveries": len(delays)} | percentiles(
        delays
    )


async def _subscribers(
    url: str, js: JetStreamContext, server: psutil.Process, spec: dict[str, Any]
) -> dict[str, Any]:
    n = spec["count"]
    await _fresh_stream(js)
    counter = _Counter(n)

    def cb(_i: int) -> Any:
        async def on_msg(_msg: Msg) -> None:
            counter.hit()

        return on_msg

    before = server.memory_info().rss
    async with contextlib.AsyncExitStack() as stack:
        await _ordered_consumers(url, "collab.idle", n, 1, stack, cb)
        await asyncio.sleep(1.0)
        after = server.memory_info().rss
        await js.publish("collab.idle", b"probe")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(spec["timeout"]):
                await counter.done.wait()
    return {
        "opened": n,
        "held": counter.count,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_subscriber": round((after - before) / max(n, 1), 1),
    }


async def _catchup(url: str, js: JetStreamContext, spec: dict[str, Any]) -> dict[str, Any]:
    pairs = load_payloads(spec["payload_file"])
    await _fresh_stream(js)
    futures = [await js.publish_async("collab.up", p) for _c, p in pairs]
    await asyncio.gather(*futures)
    counter = _Counter(len(pairs))

    async def on_msg(_msg: Msg) -> None:
        counter.hit()

    async with contextlib.AsyncExitStack() as stack:
        (nc,) = await _connections(url, 1, stack)
        started = time.monotonic()
        await nc.jetstream().subscribe(
            "collab.up", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=on_msg
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(spec["timeout"]):
                await counter.done.wait()
    elapsed = max(counter.last - started, 1e-9)
    return {
        "events": counter.count,
        "seconds": round(elapsed, 3),
        "events_per_s": round(counter.count / elapsed, 1),
    }


async def _main(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"server": "nats-server", "sync_interval": "always"}
    work = Path(spec["work_dir"])
    if "subscribers" in spec:
        # Its own fresh server, so the RSS difference is not absorbed by memory that earlier
        # scenarios' consumers left for the Go runtime to reuse.
        (work / "idle").mkdir(exist_ok=True)
        async with (
            _nats_server(spec["nats_server"], work / "idle") as (url, server),
            _jetstream(url) as js,
        ):
            out["subscribers"] = await _subscribers(url, js, server, spec["subscribers"])
    async with _nats_server(spec["nats_server"], work) as (url, _server), _jetstream(url) as js:
        if "append" in spec:
            out["append"] = {s["name"]: await _append(js, s) for s in spec["append"]}
        if "fanout" in spec:
            out["fanout"] = [await _fanout(url, js, s) for s in spec["fanout"]]
        if "latency" in spec:
            out["latency"] = await _latency(url, js, spec["latency"])
        if "catchup" in spec:
            out["catchup"] = await _catchup(url, js, spec["catchup"])
    return out


@contextlib.asynccontextmanager
async def _jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    """The publishing connection's JetStream context, closed on exit."""
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        yield nc.jetstream(publish_async_max_pending=4096)
    finally:
        await nc.close()


if __name__ == "__main__":
    raise_nofile_limit()
    print(json.dumps(asyncio.run(_main(json.loads(sys.argv[1])))))
