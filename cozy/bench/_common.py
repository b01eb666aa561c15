"""What every `cozy bench` scenario shares: the relay child process, bench accounts, presigned
events, the append pump, percentiles and the figure format.

A *figure* is one measured number with its references, each measured in the same run and
given as a ratio (figure / reference), so a reader on another machine compares ratios, not
absolute numbers:

    {"value": 6100.0, "unit": "events/s", "better": "higher",
     "refs": {"per_event_commit": {"value": 1900.0, "unit": "events/s", "ratio": 3.21}, ...}}
"""

from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import nacl.public
import nacl.signing
import trio

from clientkit import connect
from clientkit._transport import FrameReader, open_websocket
from model import content as contentmod
from model import wire
from model._crypto import random_bytes
from model.envelope import SignedEvent, seal_event
from relay.embedded import EmbeddedServiceError, free_port, wait_until_listening

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    import trio_websocket

WINDOW: Final = 512
PASSWORD: Final = "bench password that is long enough"  # noqa: S105 — throwaway bench accounts
# Sealing adds this much around the plaintext (header, nonce, tag, msgpack framing).
_SEAL_OVERHEAD: Final = 170


class BenchError(Exception):
    """The benchmark could not run as designed (a refusal where none was expected)."""


@dataclass
class Actor:
    handle: str
    account_id: str
    signing_key: nacl.signing.SigningKey
    token: str
    collabs: list[str] = field(default_factory=list)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (children inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def figure(value: float, unit: str, better: str, refs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A measured number with its same-run references, each as figure / reference."""
    return {
        "value": round(value, 3),
        "unit": unit,
        "better": better,
        "refs": {
            name: dict(ref, ratio=round(value / ref["value"], 3) if ref["value"] else None)
            for name, ref in refs.items()
        },
    }


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p99/p999/max in milliseconds of `samples` (seconds). Empty input gives zeros."""
    if not samples:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0}
    s = sorted(samples)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": at(1.0)}


def load_payloads(path: str) -> list[tuple[int, bytes]]:
    """(collab index, payload) pairs written by the bench with msgspec msgpack."""
    return msgspec.msgpack.decode(Path(path).read_bytes(), type=list[tuple[int, bytes]])


def save_payloads(path: Path, pairs: list[tuple[int, bytes]]) -> None:
    path.write_bytes(msgspec.msgpack.encode(pairs))


async def setup_actors(
    relay_url: str, *, accounts: int, collabs_each: int, tag: str
) -> list[Actor]:
    """Sign up `accounts` bench accounts, each creating `collabs_each` collabs."""
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


def presign(
    actor: Actor, count: int, body_bytes: int, collabs: Sequence[str] | None = None
) -> list[SignedEvent]:
    """`count` message events of about `body_bytes` sealed bytes, round-robin over `collabs`
    (default: the actor's). Signing is the client's cost: it happens before any clock starts."""
    key = random_bytes(32)
    targets = list(actor.collabs if collabs is None else collabs)
    data = contentmod.encode_content(contentmod.Message(text="x" * (body_bytes - _SEAL_OVERHEAD)))
    now = int(time.time() * 1000)
    return [
        seal_event(
            signing_key=actor.signing_key,
            collab_key=key,
            collab_id=targets[i % len(targets)],
            actor_id=actor.account_id,
            kind="msg",
            ts=now + i,
            content=data,
        )
        for i in range(count)
    ]


async def authed(ws: trio_websocket.WebSocketConnection, token: str) -> FrameReader:
    """Read the Welcome, authenticate with `token`; the reader for what follows."""
    frames = FrameReader(ws)
    await frames.next()  # Welcome
    await ws.send_message(wire.encode(wire.Authenticate(rid=0, token=token)))
    reply = await frames.next()
    if not isinstance(reply, wire.Authenticated):
        raise BenchError(f"bench login failed: {reply}")
    return frames


async def pump(relay_url: str, actor: Actor, events: list[SignedEvent], client_batch: int) -> None:
    """Keep WINDOW appends in flight on one connection until every one is acked.

    Appends go out `client_batch` to a WebSocket message (a `Batch` frame), as a pipelining
    client would send what it has queued.
    """
    window = trio.Semaphore(WINDOW)
    async with trio.open_nursery() as nursery, open_websocket(relay_url, nursery) as ws:
        frames = await authed(ws, actor.token)

        async def read_acks() -> None:
            for _ in events:
                reply = await frames.next()
                if not isinstance(reply, wire.Appended):
                    raise BenchError(f"bench append refused: {reply}")
                window.release()

        async with trio.open_nursery() as inner:
            inner.start_soon(read_acks)
            encoded = [wire.encode(wire.Append(rid=i, event=ev)) for i, ev in enumerate(events, 1)]
            for chunk in _chunks(encoded, client_batch):
                for _ in chunk:
                    await window.acquire()
                await ws.send_message(wire.batch(chunk))


def _chunks(frames: list[bytes], most: int) -> list[list[bytes]]:
    """Runs of at most `most` frames whose batch stays under the relay's frame limit."""
    limit = wire.MAX_FRAME_BYTES - 1024  # room for the batch's own framing
    out: list[list[bytes]] = []
    run: list[bytes] = []
    size = 0
    for frame in frames:
        if run and (len(run) >= most or size + len(frame) > limit):
            out.append(run)
            run, size = [], 0
        run.append(frame)
        size += len(frame)
    if run:
        out.append(run)
    return out


async def pump_all(
    relay_url: str, actors: Sequence[Actor], batches: Sequence[list[SignedEvent]], client_batch: int
) -> float:
    """Pump every actor's events at once (one connection each); seconds until all acked."""
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for actor, events in zip(actors, batches, strict=True):
            nursery.start_soon(pump, relay_url, actor, events, client_batch)
    return time.perf_counter() - started


@dataclass
class RelayProcess:
    url: str
    pid: int
    ops_url: str = ""  # its ops listener, when stage times are on (relay/_stages.py)


# How often to pick another port when the one `free_port` found was taken before the child bound
# it (the bench's own thousands of client connections use ephemeral ports from the same range).
PORT_ATTEMPTS = 3


@asynccontextmanager
async def relay_process(
    database_url: str, data_dir: Path, *, stage_times: bool = False
) -> AsyncIterator[RelayProcess]:
    """`cozy relay serve` in a child process; its log goes to relay.log beside `data_dir`.

    The child inherits this process's raised open-file limit (see `raise_nofile_limit`).
    With `stage_times`, the relay stamps each append's path (relay/_stages.py) and its ops
    listener, on a port picked here, serves them at /debug/stages.
    """
    # One bench account stands in for many clients, so lift the per-account connection cap
    # (an operator setting) to what the idle-subscriber scenario opens, and the front door's
    # limits that charge one address (connections not yet authenticated, sign-ups) and the
    # catch-up caps per account and relay, since
    # every bench client connects from loopback at once. The ops listener takes a free port,
    # so two benches (or a bench and a relay) on one machine do not collide on 9465.
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        COZY_MAX_CONNECTIONS_PER_ACCOUNT="100000",
        # Its one session outlasts opening 10,000 idle subscribers on a busy machine.
        COZY_SESSION_TTL="86400",
        COZY_MAX_UNAUTHENTICATED_CONNECTIONS="100000",
        COZY_SIGNUPS_PER_CALLER_PER_HOUR="100000",
        # Hundreds of its subscribers catch up at once (from an empty collab, so briefly).
        COZY_CATCHUPS_PER_ACCOUNT="100000",
        COZY_CATCHUPS_PER_RELAY="100000",
        COZY_OPS_PORT="0",
    )
    ops_url = ""
    if stage_times:
        ops_port = free_port()
        env |= {"COZY_STAGE_TIMES": "1", "COZY_OPS_PORT": str(ops_port)}
        ops_url = f"http://127.0.0.1:{ops_port}"
    log_path = data_dir.parent / "relay.log"
    with log_path.open("wb") as log_file:
        async with trio.open_nursery() as nursery:
            for attempt in range(1, PORT_ATTEMPTS + 1):
                port = free_port()
                command = [sys.executable, "-m", "cozy.cli", "relay", "serve"]
                command += ["--port", str(port), "--data-dir", str(data_dir)]
                proc: trio.Process = await nursery.start(
                    partial(trio.run_process, command, env=env, stderr=log_file, check=False)
                )
                try:
                    await wait_until_listening(port, proc, "the benchmark relay")
                    break
                except EmbeddedServiceError as exc:
                    log_file.flush()
                    tail = log_path.read_bytes()[-2000:].decode(errors="replace")
                    if "Address already in use" in tail and attempt < PORT_ATTEMPTS:
                        continue  # someone took the port between free_port and the bind
                    raise BenchError(f"{exc}; the end of its log:\n{tail}") from None
            try:
                yield RelayProcess(f"ws://127.0.0.1:{port}", proc.pid, ops_url)
            finally:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
                nursery.cancel_scope.cancel()
