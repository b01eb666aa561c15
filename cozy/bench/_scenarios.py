"""The relay's scenarios, each against the running relay child process.

Each returns its raw measurements and records, in `Peer`, what JetStream should be asked to do
with the same signed payloads, so the peer runs the same work later in the same run.
"""

from __future__ import annotations

import array
import contextlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped]  # no stubs in the venv
import trio

from clientkit._transport import open_websocket
from cozy.bench import _stagetimes
from cozy.bench._common import (
    Actor,
    BenchError,
    authed,
    percentiles,
    presign,
    pump,
    pump_all,
    save_payloads,
    setup_actors,
)
from model import wire

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from cozy.bench._common import RelayProcess
    from cozy.bench._subscribers import LeanSocket
    from model.envelope import SignedEvent

BODY_SIZES = {"512B": 512, "4KiB": 4096}


@dataclass
class Sizes:
    """How big each scenario is; `quick()` is a smoke run of about a minute."""

    append_events: int = 20_000
    client_batch: int = 32
    fanout_subscribers: tuple[int, ...] = (1, 100, 1000)
    fanout_deliveries: int = 300_000  # per subscriber count; events = deliveries / subscribers
    fanout_min_events: int = 200
    latency_rate: int = 1000
    latency_seconds: float = 5.0
    latency_subscribers: int = 100
    idle_subscribers: int = 5000
    catchup_events: int = 100_000
    client_events: int = 10_000  # `bench client`; --events there sets it (issue 17: 100000)
    baseline_events: int = 5000
    jetstream_sequential: int = 5000
    loadgen_procs: int = 2
    # A fresh relay process per scenario, so nothing one leaves behind colours the next. A
    # quick run shares one (latency keeps its own, which stamps stage times): it checks that
    # every scenario runs, not what it measures, and a relay start is seconds of a loaded CI
    # machine.
    relay_per_scenario: bool = True

    @classmethod
    def quick(cls) -> Sizes:
        """A smoke run: every scenario and reference, at sizes that only prove they run."""
        return cls(
            append_events=100,
            fanout_subscribers=(1, 10),
            fanout_deliveries=300,
            fanout_min_events=20,
            latency_seconds=0.2,
            latency_subscribers=5,
            idle_subscribers=10,
            catchup_events=100,
            client_events=100,
            baseline_events=50,
            jetstream_sequential=50,
            loadgen_procs=1,
            relay_per_scenario=False,
        )


@dataclass
class Peer:
    """What the JetStream process will be asked to run (payload files and sizes)."""

    work: Path
    spec: dict[str, Any] = field(default_factory=dict)
    _files: int = 0

    def payload_file(self, events: Sequence[SignedEvent], collab_index: Sequence[int]) -> str:
        """Write the relay's exact Append frames as JetStream payloads; return the path."""
        self._files += 1
        path = self.work / f"payloads-{self._files}.msgpack"
        pairs = [
            (c, wire.encode(wire.Append(rid=i, event=ev)))
            for i, (c, ev) in enumerate(zip(collab_index, events, strict=True), 1)
        ]
        save_payloads(path, pairs)
        return str(path)


# --- append ---------------------------------------------------------------------------------


async def append(
    relay: RelayProcess,
    sizes: Sizes,
    peer: Peer,
    samples: dict[str, tuple[list[SignedEvent], bytes]],
) -> dict[str, Any]:
    """Events/s sequenced+persisted for 1 and 100 collabs, 512 B and 4 KiB bodies."""
    layouts = {
        "1_collab": await setup_actors(relay.url, accounts=1, collabs_each=1, tag="one"),
        "100_collabs": await setup_actors(relay.url, accounts=10, collabs_each=10, tag="many"),
    }
    out: dict[str, Any] = {}
    peer.spec["append"] = []
    for size_name, body in BODY_SIZES.items():
        for layout, actors in layouts.items():
            per_actor = sizes.append_events // len(actors)
            batches = [await trio.to_thread.run_sync(presign, a, per_actor, body) for a in actors]
            relay_cpu = _process_cpu(relay.pid)
            elapsed = await pump_all(relay.url, actors, batches, sizes.client_batch)
            relay_cpu = _process_cpu(relay.pid) - relay_cpu
            sent = per_actor * len(actors)
            name = f"{layout}_{size_name}"
            out[name] = {
                "collabs": sum(len(a.collabs) for a in actors),
                "connections": len(actors),
                "body_bytes": len(batches[0][0].body),
                "events": sent,
                "seconds": round(elapsed, 3),
                "events_per_s": round(sent / elapsed, 1),
                # What each event cost the relay (every thread), whatever else the machine ran:
                # steadier from run to run than events/s on a shared machine.
                "relay_cpu_us_per_event": round(relay_cpu / sent * 1e6, 1),
            }
            # The same events, interleaved across collabs as they were offered.
            flat, index = _interleave(actors, batches)
            if len(actors) == 1:
                samples[size_name] = (flat[: sizes.baseline_events], actors[0].public_key)
            peer.spec["append"].append(
                {
                    "name": name,
                    "payload_file": peer.payload_file(flat, index),
                    "sequential_max": sizes.jetstream_sequential,
                }
            )
    return out


def _interleave(
    actors: Sequence[Actor], batches: Sequence[list[SignedEvent]]
) -> tuple[list[SignedEvent], list[int]]:
    flat: list[SignedEvent] = []
    index: list[int] = []
    for j in range(max(len(b) for b in batches)):
        for a, (actor, batch) in enumerate(zip(actors, batches, strict=True)):
            if j < len(batch):
                flat.append(batch[j])
                index.append(a * len(actor.collabs) + j % len(actor.collabs))
    return flat, index


async def reference_events(relay: RelayProcess, sizes: Sizes) -> tuple[list[SignedEvent], bytes]:
    """512 B events (and their author's key) for the references when `append` did not run."""
    (actor,) = await setup_actors(relay.url, accounts=1, collabs_each=1, tag="ref")
    events = await trio.to_thread.run_sync(presign, actor, sizes.baseline_events, 512)
    return events, actor.public_key


# --- subscriber processes -------------------------------------------------------------------


@dataclass
class _Loadgen:
    procs: list[subprocess.Popen[bytes]]
    count: int

    @classmethod
    def start(
        cls, relay: RelayProcess, actor: Actor, collab: str, count: int, from_seq: int,
        expect: int, procs: int, samples_dir: Path | None = None,
    ) -> _Loadgen:  # fmt: skip
        """Spawn up to `procs` subscriber processes sharing `count` subscribers."""
        n = max(1, min(procs, count))
        children = []
        for k in range(n):
            share = count // n + (1 if k < count % n else 0)
            spec = {
                "url": relay.url,
                "token": actor.token,
                "collab_id": collab,
                "count": share,
                "from_seq": from_seq,
                "expect": expect,
                "samples_path": str(samples_dir / f"lat-{k}.bin") if samples_dir else "",
                "receipts_path": str(samples_dir / f"recv-{k}.bin") if samples_dir else "",
            }
            children.append(
                subprocess.Popen(  # noqa: S603 — our own interpreter and module
                    [sys.executable, "-m", "cozy.bench._subscribers", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        return cls(children, count)

    async def ready(self) -> tuple[int, int]:
        """(ready, failed) subscribers. Raises `BenchError` unless every one of them is ready:
        a figure measured with missing subscribers would be quietly wrong."""
        docs = [await trio.to_thread.run_sync(_read_json, p) for p in self.procs]
        ready, failed = sum(d["ready"] for d in docs), sum(d["failed"] for d in docs)
        if ready != self.count:
            raise BenchError(
                f"only {ready} of {self.count} subscribers got ready ({failed} failed); the"
                " relay refused or dropped them: check its log and the open-files limit"
            )
        return ready, failed

    def go(self, *, t0: float, rate: float, base_seq: int, timeout: float) -> None:
        line = json.dumps({"t0": t0, "rate": rate, "base_seq": base_seq, "timeout": timeout})
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(line.encode() + b"\n")
            p.stdin.flush()

    async def results(self) -> dict[str, Any]:
        docs = [await trio.to_thread.run_sync(_read_json, p) for p in self.procs]
        for p in self.procs:
            await trio.to_thread.run_sync(p.wait)
        if errors := sum(d["seq_errors"] for d in docs):
            raise BenchError(
                f"{errors} deliveries came out of order (not the seq after the previous one):"
                " the relay's fan-out lost or reordered events"
            )
        return {
            "deliveries": sum(d["deliveries"] for d in docs),
            "complete": sum(d["complete"] for d in docs),
            "dropped": sum(d["dropped"] for d in docs),
            "last": max(d["last"] for d in docs),
            "cpu_seconds": round(sum(d["cpu_seconds"] for d in docs), 3),
            "cpu_seconds_timed": round(sum(d["cpu_seconds_timed"] for d in docs), 3),
        }

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _read_json(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise BenchError(f"a subscriber process exited early (code {proc.wait()})")
    doc: dict[str, Any] = json.loads(line)
    return doc


# --- fan-out --------------------------------------------------------------------------------


async def fanout(relay: RelayProcess, sizes: Sizes, peer: Peer) -> dict[str, Any]:
    """Deliveries/s counted at N real WebSocket subscribers in separate processes."""
    counts = sizes.fanout_subscribers
    (actor,) = await setup_actors(relay.url, accounts=1, collabs_each=len(counts), tag="fan")
    out: dict[str, Any] = {}
    peer.spec["fanout"] = []
    for n, collab in zip(counts, actor.collabs, strict=True):
        events_n = max(sizes.fanout_min_events, min(20_000, sizes.fanout_deliveries // n))
        events = await trio.to_thread.run_sync(presign, actor, events_n, 512, [collab])
        timeout = 60.0 + events_n * n / 10_000
        gen = _Loadgen.start(relay, actor, collab, n, 2, events_n, sizes.loadgen_procs)
        try:
            ready, failed = await gen.ready()
            t0 = time.monotonic()
            gen.go(t0=t0, rate=1.0, base_seq=2, timeout=timeout)
            await pump(relay.url, actor, events, sizes.client_batch)
            res = await gen.results()
        finally:
            gen.kill()
        elapsed = max(res["last"] - t0, 1e-9)
        out[f"{n}_subscribers"] = {
            "subscribers": n,
            "ready": ready,
            "failed": failed,
            "events": events_n,
            "deliveries": res["deliveries"],
            "expected_deliveries": n * events_n,
            "dropped_subscribers": res["dropped"],
            "loadgen_cpu_seconds": res["cpu_seconds"],
            "seconds": round(elapsed, 3),
            "deliveries_per_s": round(res["deliveries"] / elapsed, 1),
        }
        peer.spec["fanout"].append(
            {
                "subscribers": n,
                "payload_file": peer.payload_file(events, [0] * len(events)),
                "timeout": timeout,
            }
        )
    return out


# --- latency --------------------------------------------------------------------------------


async def latency(relay: RelayProcess, sizes: Sizes, peer: Peer, work: Path) -> dict[str, Any]:
    """Append->delivery at a fixed offered load, open loop, measured at the subscribers.

    Event i is due at t0 + i/rate whatever happened to earlier ones; its latency is counted
    from that due time, so a stall in the publisher or the relay shows up in the tail instead
    of silently lowering the offered load.
    """
    rate, n = sizes.latency_rate, sizes.latency_subscribers
    count = max(1, int(rate * sizes.latency_seconds))
    (actor,) = await setup_actors(relay.url, accounts=1, collabs_each=1, tag="lat")
    collab = actor.collabs[0]
    events = await trio.to_thread.run_sync(presign, actor, count, 512)
    gen = _Loadgen.start(relay, actor, collab, n, 2, count, sizes.loadgen_procs, work)
    behind = 0.0
    try:
        ready, failed = await gen.ready()
        t0 = time.monotonic() + 0.3
        gen.go(t0=t0, rate=rate, base_seq=2, timeout=sizes.latency_seconds + 30)
        cpu_before = _cpu_seconds()
        relay_cpu_before = _process_cpu(relay.pid)
        behind = await _paced_publish(relay, actor, events, t0, rate)
        publisher_cpu = _cpu_seconds() - cpu_before
        res = await gen.results()  # every delivery made (or the timeout)
        relay_cpu = _process_cpu(relay.pid) - relay_cpu_before
    finally:
        gen.kill()
    delays = await trio.to_thread.run_sync(_read_samples, work)
    stages: dict[str, Any] = {}
    if relay.ops_url:
        doc = await trio.to_thread.run_sync(_stagetimes.fetch, relay.ops_url)
        stages = await trio.to_thread.run_sync(
            partial(
                _stagetimes.breakdown, doc, work, t0=t0, rate=rate, base_seq=2, collab_id=collab
            )
        )
    # The load generator's share of a core over the measured phase (publish start to the last
    # delivery): what it took from the two cores the relay and Postgres also run on.
    window = max(res["last"] - t0, 1e-9)
    peer.spec["latency"] = {
        "subscribers": n,
        "rate": rate,
        "payload_file": peer.payload_file(events, [0] * len(events)),
        "timeout": sizes.latency_seconds + 30,
    }
    return {
        "offered_per_s": rate,
        "events": count,
        "subscribers": n,
        "ready": ready,
        "failed": failed,
        "deliveries": res["deliveries"],
        "expected_deliveries": n * count,
        "dropped_subscribers": res["dropped"],
        "loadgen_cpu_seconds": res["cpu_seconds"],
        "subscribers_cpu_share": round(res["cpu_seconds_timed"] / window, 3),
        "publisher_cpu_share": round(publisher_cpu / window, 3),
        # CPU per event and per delivery: what each side costs, whatever else the machine ran.
        "relay_cpu_us_per_event": round(relay_cpu / count * 1e6, 1),
        "subscribers_cpu_us_per_delivery": round(
            res["cpu_seconds_timed"] / max(res["deliveries"], 1) * 1e6, 2
        ),
        "publisher_max_behind_ms": round(behind * 1000, 3),
        "stage_times": stages,
    } | percentiles(delays)


def _cpu_seconds() -> float:
    """This process's CPU time so far (the publisher is the only thing it runs meanwhile)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of the process `pid` and its children so far:
    the relay's signature-check workers (ADR-0022) do part of its work, and one it replaced
    counts once reaped (`children_*`)."""
    proc = psutil.Process(pid)
    times = proc.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return float(total)


def _read_samples(work: Path) -> array.array[float]:
    delays = array.array("d")
    for path in sorted(work.glob("lat-*.bin")):
        delays.frombytes(path.read_bytes())
    return delays


async def _paced_publish(
    relay: RelayProcess, actor: Actor, events: list[SignedEvent], t0: float, rate: float
) -> float:
    """Send event i at t0 + i/rate, one Append per message; the worst lateness, in seconds."""
    behind = 0.0
    async with trio.open_nursery() as nursery, open_websocket(relay.url, nursery) as ws:
        frames = await authed(ws, actor.token)

        async def drain_acks() -> None:
            for _ in events:
                reply = await frames.next()
                if not isinstance(reply, wire.Appended):
                    raise BenchError(f"bench append refused: {reply}")

        async with trio.open_nursery() as inner:
            inner.start_soon(drain_acks)
            for i, ev in enumerate(events):
                due = t0 + i / rate
                now = time.monotonic()
                if due > now:
                    await trio.sleep(due - now)
                else:
                    behind = max(behind, now - due)
                await ws.send_message(wire.encode(wire.Append(rid=i + 1, event=ev)))
    return behind


# --- idle subscribers -----------------------------------------------------------------------


async def subscribers(relay: RelayProcess, sizes: Sizes, peer: Peer) -> dict[str, Any]:
    """Idle subscribers one relay holds, opened from separate processes; the relay's resident
    memory before and after gives bytes per subscriber. One probe event checks they are live."""
    n = sizes.idle_subscribers
    (actor,) = await setup_actors(relay.url, accounts=1, collabs_each=1, tag="idle")
    collab = actor.collabs[0]
    (probe,) = await trio.to_thread.run_sync(presign, actor, 1, 512)
    relay_proc = psutil.Process(relay.pid)
    await trio.sleep(0.5)
    before = relay_proc.memory_info().rss
    opened_at = time.monotonic()
    gen = _Loadgen.start(relay, actor, collab, n, 2, 1, sizes.loadgen_procs)
    try:
        ready, failed = await gen.ready()
        open_seconds = time.monotonic() - opened_at
        await trio.sleep(1.0)
        after = relay_proc.memory_info().rss
        # Said now too: the probe below can fail on a busy machine, and this is the figure.
        print(
            f"cozy bench: subscribers: {ready} ready, relay RSS {before} -> {after} B,"
            f" {(after - before) / max(ready, 1):.0f} B per subscriber",
            file=sys.stderr,
        )
        gen.go(t0=time.monotonic(), rate=1.0, base_seq=2, timeout=30.0)
        await pump(relay.url, actor, [probe], 1)
        res = await gen.results()
    finally:
        gen.kill()
    peer.spec["subscribers"] = {"count": n, "timeout": 30.0}
    return {
        "opened": n,
        "ready": ready,
        "failed": failed,
        "open_seconds": round(open_seconds, 3),
        "held": res["complete"],
        "relay_rss_before_bytes": before,
        "relay_rss_after_bytes": after,
        "bytes_per_subscriber": round((after - before) / max(ready, 1), 1),
    }


# --- catch-up -------------------------------------------------------------------------------


async def catchup(relay: RelayProcess, sizes: Sizes, peer: Peer) -> dict[str, Any]:
    """Events/s of one subscriber replaying a collab's ledger from seq 1 to its head.

    The subscriber reads with `LeanSocket` (the fan-out subscribers' reader: frame headers
    walked by hand, each frame's `t` and `seq` decoded, bodies skipped) and checks that the
    seqs it receives are 1, 2, 3, … up to `caught_up`, so the figure counts only events the
    relay delivered in order. Its CPU time is reported (`reader_cpu_seconds`): decoding every
    event fully, as the bench once did, made the reader the thing measured.
    """
    # Imported here: `python -m cozy.bench._subscribers` imports this package first, and a
    # module-level import would load that module twice (runpy warns).
    from cozy.bench._subscribers import LeanSocket, expect_frame

    total = sizes.catchup_events
    (actor,) = await setup_actors(relay.url, accounts=1, collabs_each=1, tag="up")
    events = await trio.to_thread.run_sync(presign, actor, total, 512)
    preload = await pump_all(relay.url, [actor], [events], sizes.client_batch)
    sock = await LeanSocket.connect(relay.url)
    try:
        await expect_frame(sock, "welcome")
        await sock.send(wire.encode(wire.Authenticate(rid=0, token=actor.token)))
        await expect_frame(sock, "authenticated")
        cpu, started = time.process_time(), time.perf_counter()
        request = wire.Subscribe(rid=1, collab_id=actor.collabs[0], from_seq=1, follow=False)
        await sock.send(wire.encode(request))
        received = await _replay(sock)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        await sock.aclose()
    peer.spec["catchup"] = {
        "payload_file": peer.payload_file(events, [0] * len(events)),
        "timeout": 120.0,
    }
    return {
        "events": received,  # the collab's genesis event is replayed too
        "preload_events_per_s": round(total / preload, 1),
        "seconds": round(elapsed, 3),
        "events_per_s": round(received / elapsed, 1),
        "reader_cpu_seconds": round(cpu, 3),
    }


async def _replay(sock: LeanSocket) -> int:
    """Read a catch-up from seq 1 until `caught_up`; how many events arrived, in order."""
    received = 0
    while True:
        for frame in await sock.frames():
            if frame.t in ("event", "withheld"):
                if frame.seq != received + 1:
                    raise BenchError(f"catch-up broke its order: seq {frame.seq} after {received}")
                received += 1
            elif frame.t == "caught_up":
                if frame.seq != received:
                    raise BenchError(f"caught_up at {frame.seq} after {received} events")
                return received
            elif frame.t == "error":
                raise BenchError(f"catch-up refused: {frame.code}: {frame.message}")
