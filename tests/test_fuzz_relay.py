"""Fuzzing the relay's frame handling over a real socket (SPEC §9).

One real relay (its own thread and Trio loop, real Postgres) for the module. Hypothesis sends
each example's hostile message on a fresh connection in one of three states — no session, a
session of an account that belongs to no collab, or a member's session (tampered appends only)
— then a ping. Every reply before the pong must be a typed `error` (never `internal`), and a
probe connection in the relay's own loop keeps pinging and posting meanwhile. At the end:
nothing was persisted (row counts of the ledger's tables, the probe's own collab aside), the
relay holds no connection and no more Trio tasks than before, and the probe never failed.

Examples are derandomized with a fixed count: 400 per fuzz test by default (every kind in every
state many times over; CI's budget), `COZY_FUZZ_EXAMPLES=N` for a deeper run (20000 for a night:
`COZY_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_fuzz_relay.py`).
`--hypothesis-show-statistics` prints how many were tried and of which kind.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import hypothesis.strategies as st
import msgspec
import psycopg
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings

from clientkit._transport import FrameReader, open_websocket
from model import wire
from model.envelope import SignedEvent
from tests.helpers import create_database, drop_database, with_dbname
from tests.relay_harness import ThreadedRelay, User, relay_config, relay_in_thread, session, sign_up
from tests.test_model_wire import REQUEST_TYPES, frames_of

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relay._server import Relay

SENTINEL: Final = 2**40
TABLES: Final = ("accounts", "collabs", "collab_members", "events", "keystores", "artifacts",
                 "artifact_pieces")  # fmt: skip


@dataclass
class World:
    url: str = ""
    db: str = ""
    token: trio.lowlevel.TrioToken | None = None
    stop: trio.Event | None = None
    relay: Relay | None = None
    alice: User | None = None
    mallory: User | None = None
    probe_collab: str = ""
    probe_failures: list[str] = field(default_factory=list)
    probe_rounds: int = 0


def count_tasks() -> int:
    """Every live task in this Trio run (call inside the relay's loop)."""
    todo, n = [trio.lowlevel.current_root_task()], 0
    while todo:
        task = todo.pop()
        n += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return n


async def probe(world: World, user: User, stop: trio.Event) -> None:
    """A healthy member: pings and posts in its own collab for as long as the fuzz runs."""
    try:
        async with session(world.url, user) as client:
            i = 0
            while not stop.is_set():
                i += 1
                with trio.fail_after(5):
                    await client.request(lambda rid: wire.Ping(rid=rid), wire.Pong)
                    await client.append(user.event(f"probe-{i}", ts=1_700_000_000_000 + i))
                world.probe_rounds += 1
                with trio.move_on_after(0.05):
                    await stop.wait()
    except Exception as exc:  # reported by the test
        world.probe_failures.append(repr(exc))


@pytest.fixture(scope="module")
def world(
    pg_admin_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    name = create_database(pg_admin_url, "cozy_fuzz", template=template_database)
    w = World(db=with_dbname(pg_admin_url, name))
    config = relay_config(w.db, tmp_path_factory.mktemp("relay"))

    async def setup(served: ThreadedRelay, nursery: trio.Nursery) -> None:
        w.url, w.relay, w.token, w.stop = served.url, served.relay, served.token, served.stop
        w.alice = await sign_up(w.url, "alice")
        w.mallory = await sign_up(w.url, "mallory")
        carol = await sign_up(w.url, "carol")
        w.probe_collab = carol.collab_id
        # The member's collab has an actor already, so the baseline task count includes it.
        async with session(w.url, w.alice) as client:
            await client.append(w.alice.event("before the fuzz"))
        async with session(w.url, carol) as client:
            await client.append(carol.event("warm-up"))
        nursery.start_soon(probe, w, carol, served.stop)

    try:
        with relay_in_thread(config, setup, name="fuzz-relay"):
            yield w
    finally:
        drop_database(pg_admin_url, name)


def row_counts(world: World) -> dict[str, int]:
    with psycopg.connect(world.db) as conn:
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        counts["events"] = conn.execute(
            "SELECT count(*) FROM events WHERE collab_id <> %s", (world.probe_collab,)
        ).fetchone()[0]
    return counts


# --- what the fuzzer sends --------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    state: str  # "anonymous", "outsider" (in no collab), or "member" (tampered appends only)
    messages: tuple[bytes | str, ...]
    kind: str


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


# Requests any account may send about itself and that then succeed: no refusal to check.
ANSWERED_TO_ANYONE: frozenset[type] = frozenset({wire.Ping, wire.ListCollabs, wire.ListAgents})
requests = st.one_of([frames_of(c) for c in REQUEST_TYPES if c not in ANSWERED_TO_ANYONE])


@st.composite
def hostile(draw: st.DrawFn, alice: User) -> Hostile:
    state = draw(st.sampled_from(["anonymous", "outsider"]))
    kind = draw(
        st.sampled_from(
            ["random", "text", "oversized", "mutated", "request", "in-wrong-state", "batch",
             "nested-batch", "deep", "huge-refs"]
        )
    )  # fmt: skip
    genuine = alice.event("genuine, but not yours to send")
    if kind == "random":
        msg: bytes | str = draw(st.binary(max_size=300))
    elif kind == "text":
        msg = draw(st.text(max_size=100))
    elif kind == "oversized":
        msg = secrets.token_bytes(wire.MAX_FRAME_BYTES + draw(st.integers(1, 200_000)))
    elif kind == "mutated":
        raw = bytearray(wire.encode(draw(requests)))
        pos = draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= draw(st.integers(1, 255))
        msg = bytes(raw[: draw(st.integers(pos, len(raw)))])
    elif kind == "request":
        msg = wire.encode(draw(requests))
    elif kind == "in-wrong-state":
        # Valid frames naming a real collab this connection may not touch.
        c = alice.collab_id
        frame = draw(
            st.sampled_from(
                [
                    wire.Append(rid=1, event=genuine),
                    wire.Subscribe(rid=2, collab_id=c, from_seq=draw(st.integers(-(2**63), 2**64 - 1))),
                    wire.Unsubscribe(rid=3, collab_id=c),
                    wire.GetArtifact(rid=4, collab_id=c, ref="b2:" + "0" * 64),
                    wire.PutArtifactChunk(rid=5, collab_id=c, upload="u" * 20, index=0, data=b"x"),
                    wire.CallTool(rid=6, collab_id=c, tool="echo"),
                    wire.CreateCollab(rid=7, event=genuine),
                    wire.PutKeystore(rid=8, version=draw(st.integers(-(2**63), 2**64 - 1)), blob=b"k", sig=b"s" * 64),
                    wire.RevokeAgent(rid=9, account_id=alice.account_id),
                    wire.GetKeystore(rid=10),
                ]
            )
        )  # fmt: skip
        event(f"wrong state: {type(frame).__name__}")
        msg = wire.encode(frame)
    elif kind == "batch":
        inner = draw(st.lists(requests, min_size=1, max_size=8))
        msg = wire.batch([wire.encode(f) for f in inner] + [b"\xc1"])
    elif kind == "nested-batch":
        inner = wire.batch([wire.encode(wire.Ping(rid=1)), wire.encode(wire.Ping(rid=2))])
        msg = wire.batch([inner, wire.encode(wire.Ping(rid=3))])
    elif kind == "deep":
        depth = draw(st.integers(1000, 20_000))
        where = draw(st.sampled_from(["top", "field", "batch"]))
        msg = {
            "top": _nested(depth),
            "field": b"\x83\xa1t\xa9subscribe\xa3rid\x03\xa9collab_id" + _nested(depth),
            "batch": b"\x82\xa1t\xa5batch\xa6frames" + _nested(depth),
        }[where]
    else:  # huge refs inside a real-looking append
        body = msgspec.msgpack.encode(
            [1, alice.collab_id, alice.account_id, "msg", 1, ["r"] * draw(st.integers(17, 30_000)),
             b"n" * 24, b"c", 0]
        )  # fmt: skip
        msg = wire.encode(wire.Append(rid=11, event=SignedEvent(body=body, sig=b"s" * 64)))
    event(f"{state}: {kind}")
    return Hostile(state, (msg,), kind)


@st.composite
def tampered_appends(draw: st.DrawFn, alice: User) -> Hostile:
    ev = alice.event(draw(st.text(max_size=20)), ts=1_700_000_000_000 + draw(st.integers(0, 10**6)))
    part = draw(st.sampled_from(["body", "sig"]))
    raw = bytearray(ev.body if part == "body" else ev.sig)
    raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    tampered = msgspec.structs.replace(ev, **{part: bytes(raw)})
    event(f"member: tampered {part}")
    return Hostile("member", (wire.encode(wire.Append(rid=1, event=tampered)),), "tampered")


async def send_and_check(world: World, case: Hostile) -> list[wire.Error]:
    """Send the hostile messages, then a ping; return every reply that came before the pong."""
    assert world.alice is not None
    assert world.mallory is not None
    token = {"anonymous": None, "outsider": world.mallory.token, "member": world.alice.token}[
        case.state
    ]
    errors: list[wire.Error] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, open_websocket(world.url, nursery) as ws:
            frames = FrameReader(ws)
            assert isinstance(await frames.next(), wire.Welcome)
            if token is not None:
                await ws.send_message(wire.encode(wire.Authenticate(rid=0, token=token)))
                assert isinstance(await frames.next(), wire.Authenticated)
            for msg in case.messages:
                await ws.send_message(msg)
            await ws.send_message(wire.encode(wire.Ping(rid=SENTINEL)))
            # A member's append is refused by the sequencer, possibly after the pong.
            need_error = case.state == "member"
            pong = False
            while not pong or (need_error and not errors):
                reply = await frames.next()
                if isinstance(reply, wire.Pong):
                    # A ping is fine in any state (one may sit inside a fuzzed batch).
                    pong = pong or reply.rid == SENTINEL
                    continue
                assert isinstance(reply, wire.Error), f"{case.kind}: {reply!r}"
                errors.append(reply)
            await ws.aclose()
    for err in errors:
        assert err.code is not wire.ErrorCode.INTERNAL, f"{case.kind}: {err}"
        event(f"error: {err.code.value}")
    return errors


# --- the tests ----------------------------------------------------------------------------------

# Examples per fuzz test: see the module docstring (2000 each until the suite outgrew its budget).
FUZZ_EXAMPLES: Final = int(os.environ.get("COZY_FUZZ_EXAMPLES", "400"))
FUZZ: Final = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Baseline:
    rows: dict[str, int]
    tasks: int
    probe_rounds: int


def settled_tasks(world: World, samples: int = 20) -> int:
    """The relay's task count without transient tasks: the probe keeps posting, so a crypto-pool
    round (a task per core) may be running at any one sample; the fewest over a short spell is
    the standing set of tasks."""
    counts = []
    for _ in range(samples):
        counts.append(trio.from_thread.run_sync(count_tasks, trio_token=world.token))
        threading.Event().wait(0.01)
    return min(counts)


@pytest.fixture(scope="module")
def baseline(world: World) -> Baseline:
    # The signature-check workers start on the first burst of appends, each with a task that
    # keeps it running: standing tasks, started here so the fuzz's bursts do not add them.
    assert world.relay is not None
    workers = world.relay._sequencers._crypto._workers
    assert workers is not None
    trio.from_thread.run_sync(workers.want, trio_token=world.token)
    deadline = time.monotonic() + 20
    while len(workers.pids()) < workers.count:
        assert time.monotonic() < deadline, "the relay's signature workers never started"
        threading.Event().wait(0.01)
    return Baseline(row_counts(world), settled_tasks(world), world.probe_rounds)


def _check_after(world: World, base: Baseline) -> None:
    assert world.relay is not None
    relay = world.relay

    for _ in range(25):  # connections close asynchronously: give them up to ~5 s
        connections = trio.from_thread.run_sync(
            lambda: relay.statistics().connections, trio_token=world.token
        )
        tasks = settled_tasks(world, samples=10)
        if connections == 1 and tasks <= base.tasks:  # the probe's connection remains
            break
        threading.Event().wait(0.05)
    # Not more tasks than before the fuzz: every task a hostile connection started has ended.
    assert connections == 1, f"{connections - 1} hostile connections are still open"
    assert tasks <= base.tasks, f"{tasks - base.tasks} Trio tasks leaked"
    assert row_counts(world) == base.rows, "a refused request stored something"
    assert not world.probe_failures, world.probe_failures
    assert world.probe_rounds > base.probe_rounds, "the healthy connection made no progress"


@FUZZ
@given(data=st.data())
def test_hostile_frames_get_typed_errors_and_change_nothing(
    world: World, baseline: Baseline, data: st.DataObject
) -> None:
    assert world.alice is not None
    case = data.draw(hostile(world.alice))
    trio.run(send_and_check, world, case)


@FUZZ
@given(data=st.data())
def test_tampered_appends_by_a_member_get_typed_errors_and_store_nothing(
    world: World, baseline: Baseline, data: st.DataObject
) -> None:
    assert world.alice is not None
    case = data.draw(tampered_appends(world.alice))
    errors = trio.run(send_and_check, world, case)
    # A flipped byte in the author or collab id makes it someone else's event or collab.
    allowed = {
        wire.ErrorCode.BAD_SIGNATURE,
        wire.ErrorCode.INVALID_EVENT,
        wire.ErrorCode.UNAUTHORIZED,
    }
    assert {e.code for e in errors} <= allowed


def test_after_the_fuzz_nothing_leaked_and_the_relay_is_up(
    world: World, baseline: Baseline
) -> None:
    """Runs after the fuzz tests of this module (file order): no row, connection or task left."""
    _check_after(world, baseline)
