"""Faults for real: a Postgres the test owns, a relay in its own process, authors and a follower.

The relay runs as `python -m cozy.cli relay serve` (as an operator runs it), so it can be
killed with SIGKILL or paused with SIGSTOP; its Postgres is a pgserver instance in the test's
tmp dir, so it can be stopped with ``pg_ctl stop -m immediate`` (a crash, as far as the database
knows) and started again on the same socket. Authors pipeline appends and remember exactly which
were acked; a follower subscribes through every fault with the client kit's resume logic. The
checks read the ledger directly and compare.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
import trio
import trio_websocket
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from clientkit import ConnectionLost, RelayRefused, _collab
from ledger import Ledger
from model import content as contentmod
from model import wire
from model.envelope import event_id, seal_event
from model.membership import Member, MemberKind, Role
from relay.embedded import free_port, wait_until_listening
from tests.relay_harness import User, session, sign_up

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from clientkit import Client
    from model.envelope import SignedEvent

# Marks the relay's own database sessions, so faults can target them and nothing else.
RELAY_APP_NAME = "cozy-relay-under-test"
# Errors a client sees while the relay is down, paused or restarting: reconnect and go on.
RECONNECTABLE = (ConnectionLost, OSError, trio_websocket.HandshakeError, trio.TooSlowError)


class OwnedPostgres:
    """A pgserver instance in `data_dir` that this test may stop hard and start again."""

    def __init__(self, data_dir: Path) -> None:
        # pgserver keeps lock files in the user runtime dir (set before it is first imported).
        os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime_dir(data_dir.parent)))
        import pgserver
        from pgserver import _commands

        self._pg_ctl: Any = _commands.pg_ctl  # type: ignore[attr-defined]
        self._server: Any = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        self.data_dir = self._server.pgdata
        self.url: str = self._server.get_uri()
        self._socket_dir = conninfo_to_dict(self.url)["host"]

    def database_url(self, *, application_name: str | None = None) -> str:
        extra = {} if application_name is None else {"application_name": application_name}
        return make_conninfo(self.url, **extra)

    def stop_immediate(self) -> None:
        """Kill the postmaster and its backends without a checkpoint: crash recovery on start."""
        self._run(["-m", "immediate", "stop"])

    def start(self) -> None:
        """Start again with the options pgserver uses (unix socket only, same socket dir)."""
        log = str(self.data_dir / "log")
        self._run(["-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}", "-l", log, "start"])

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self._run(["-w", "-m", "fast", "stop"])
        # pgserver remembers the first postmaster (long gone after a restart): let its cleanup
        # release its handle without trying to stop that one again.
        self._server._postmaster_info = None
        self._server.cleanup()

    def _run(self, args: list[str]) -> None:
        self._pg_ctl(args, pgdata=self.data_dir, user=self._server.system_user, timeout=30)


class CuttingProxy:
    """TCP on loopback → a Postgres unix socket, able to cut a connection at COMMIT.

    `arm(mode)` cuts the next COMMIT of a transaction that wrote events (one that asked for
    its transaction id, as the ledger does before committing events), on whichever connection
    sends it first:
    ``after_commit`` forwards COMMIT, swallows the server's reply and closes both sides (the
    transaction committed, its client cannot know); ``instead_of_commit`` closes both sides
    without forwarding it (the server rolls back); ``hold_commit`` holds COMMIT back until
    `release()` (a commit in doubt for as long as the test likes: the client waits for a reply
    that does not come), then forwards it. `wait_cut` returns once the COMMIT was caught.
    """

    def __init__(self, postgres_url: str) -> None:
        params = conninfo_to_dict(postgres_url)
        self._socket_path = f"{params['host']}/.s.PGSQL.{params.get('port') or 5432}"
        self._base_url = postgres_url
        self.port = 0
        self.cuts = 0
        self._mode: str | None = None
        self._cut = trio.Event()
        self._release = trio.Event()

    def url(self, **params: str) -> str:
        """A conninfo reaching the same database through this proxy."""
        return make_conninfo(
            self._base_url, host="127.0.0.1", port=str(self.port), sslmode="disable", **params
        )

    def arm(self, mode: str) -> None:
        assert mode in ("after_commit", "instead_of_commit", "hold_commit")
        self._mode, self._cut, self._release = mode, trio.Event(), trio.Event()

    def release(self) -> None:
        """Forward the COMMIT that ``hold_commit`` holds back."""
        self._release.set()

    async def wait_cut(self) -> None:
        await self._cut.wait()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_unix_socket(self._socket_path)
        swallow = trio.Event()
        async with client, server, trio.open_nursery() as nursery:

            async def upstream() -> None:
                wrote = False
                async for data in client:
                    # Both ways of writing events ask for the transaction's id, as text.
                    wrote = wrote or b"pg_current_xact_id" in data
                    if b"COMMIT\x00" in data and wrote and self._mode is not None:
                        mode, self._mode = self._mode, None
                        self.cuts += 1
                        if mode == "hold_commit":
                            release = self._release
                            self._cut.set()
                            await release.wait()
                            wrote = False
                            await server.send_all(data)
                            continue
                        if mode == "after_commit":
                            swallow.set()
                            await server.send_all(data)
                            await trio.sleep(0.3)  # the server commits; its reply is dropped
                        self._cut.set()
                        break
                    if b"COMMIT\x00" in data:
                        wrote = False
                    await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                async for data in server:
                    if not swallow.is_set():
                        await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)


class RelayProcess:
    """`cozy relay serve` in a child process on a fixed loopback port (kept across restarts)."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        self.database_url = database_url
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / "relay.log"
        self._proc: trio.Process | None = None

    async def start(self, **env: str) -> None:
        command = [sys.executable, "-m", "cozy.cli", "relay", "serve"]
        command += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        full_env = {**os.environ, "DATABASE_URL": self.database_url, "COZY_OPS_PORT": "off", **env}
        with self.log_path.open("ab") as log:
            self._proc = await trio.lowlevel.open_process(
                command, env=full_env, stdout=log, stderr=log
            )
        await wait_until_listening(self.port, self._proc, "the relay under test")

    @property
    def pid(self) -> int:
        """The running relay's process id (its memory is in /proc/<pid>/status)."""
        assert self._proc is not None
        return self._proc.pid

    def send_signal(self, signum: signal.Signals) -> None:
        assert self._proc is not None
        self._proc.send_signal(signum)

    async def kill9(self) -> None:
        """SIGKILL: no drain, no clean close; whatever was in flight is simply gone."""
        assert self._proc is not None
        self._proc.kill()
        await self._proc.wait()

    async def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 10 s); safe to call when already stopped."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with trio.CancelScope(shield=True):
            proc.send_signal(signal.SIGCONT)  # a paused relay cannot handle SIGTERM
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def fault_stack(tmp_path: Path) -> AsyncIterator[tuple[OwnedPostgres, RelayProcess]]:
    """A fresh owned Postgres and a relay process on it; both stopped at the end."""
    pg = await trio.to_thread.run_sync(OwnedPostgres, tmp_path / "pg")
    try:
        relay = RelayProcess(pg.database_url(application_name=RELAY_APP_NAME), tmp_path / "relay")
        await relay.start()
        try:
            yield pg, relay
        finally:
            await relay.stop()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(pg.close)


def _runtime_dir(tmp_path: Path) -> Path:
    path = tmp_path / "xdg-runtime"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


# --- the workload -------------------------------------------------------------------------------


@dataclass(eq=False)
class AckCount:
    """Acks received by a whole team, for waiting until load has really flowed."""

    count: int = 0
    _waiters: list[tuple[int, trio.Event]] = field(default_factory=list)

    def add(self) -> None:
        self.count += 1
        for target, event in self._waiters:
            if self.count >= target:
                event.set()

    async def grow(self, by: int) -> None:
        """Wait until `by` more acks arrived than had when called."""
        waiter = (self.count + by, trio.Event())
        self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            self._waiters.remove(waiter)


@dataclass(eq=False)
class Author:
    """A member who appends to the shared collab and remembers exactly what was acked."""

    user: User
    collab_id: str
    collab_key: bytes
    acks: AckCount
    sent: list[SignedEvent] = field(default_factory=list)  # every event made, in order
    acked: dict[bytes, int] = field(default_factory=dict)  # event id -> the seq in its ack
    ack_times: list[float] = field(default_factory=list)  # trio.current_time() of each ack
    refusals: list[str] = field(default_factory=list)  # error codes of refused appends
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def new_event(self) -> SignedEvent:
        n = next(self._counter)
        event = seal_event(
            signing_key=self.user.signing_key,
            collab_key=self.collab_key,
            collab_id=self.collab_id,
            actor_id=self.user.account_id,
            kind="msg",
            ts=1_700_000_000_000 + n,
            content=contentmod.encode_content(contentmod.Message(f"{self.user.handle} #{n}")),
        )
        self.sent.append(event)
        return event

    def record(self, event: SignedEvent, seq: int, acked_id: bytes) -> None:
        eid = event_id(event)
        assert acked_id == eid, "an ack named another event"
        earlier = self.acked.setdefault(eid, seq)
        assert earlier == seq, f"one event acked at two seqs: {earlier} and {seq}"
        self.ack_times.append(trio.current_time())
        self.acks.add()

    def unacked(self) -> list[SignedEvent]:
        return [e for e in self.sent if event_id(e) not in self.acked]


async def team(url: str, size: int) -> tuple[User, list[Author]]:
    """An owner and `size - 1` members in the owner's collab; all of them append (epoch 0)."""
    users = [await sign_up(url) for _ in range(size)]
    owner = users[0]
    async with session(url, owner) as client:
        for user in users[1:]:
            info = await client.lookup(user.handle)
            member = Member(
                info.account_id, Role.MEMBER, MemberKind.HUMAN, info.sign_pk, info.box_pk
            )
            await client.manage(
                owner.signing_key,
                owner.box_key,
                owner.collab_id,
                lambda view, m=member: _collab.add(view, m),
            )
    acks = AckCount()
    return owner, [Author(u, owner.collab_id, owner.collab_key, acks) for u in users]


async def pump(url: str, author: Author, stop: trio.Event, *, window: int = 16) -> None:
    """Append fresh events with `window` in flight until `stop`, reconnecting across faults.

    Every append ends in an ack (recorded), a typed refusal (recorded, left for a retry) or a
    lost connection (left for a retry); nothing else is tolerated.
    """
    while not stop.is_set():
        try:
            async with session(url, author.user) as client:
                await _pump_on(client, author, stop, window)
        except RECONNECTABLE:
            pass
        if not stop.is_set():
            await trio.sleep(0.1)


async def _pump_on(client: Client, author: Author, stop: trio.Event, window: int) -> None:
    lost = trio.Event()
    slots = trio.Semaphore(window)

    async def one(event: SignedEvent) -> None:
        try:
            # retry_for=0: the suite watches every refusal itself (no ack while the ledger is
            # down, only typed `overloaded` refusals) and retries the unacked events afterwards.
            ack = await client.append(event, retry_for=0)
        except RelayRefused as exc:
            author.refusals.append(str(exc.code))
        except ConnectionLost:
            lost.set()
        else:
            author.record(event, ack.seq, ack.event_id)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        while not (stop.is_set() or lost.is_set()):
            await slots.acquire()
            if stop.is_set() or lost.is_set():
                break
            nursery.start_soon(one, author.new_event())


@asynccontextmanager
async def under_load(url: str, authors: list[Author], *, window: int = 16) -> AsyncIterator[None]:
    """Every author pumps while the block runs; on exit, waits until each in-flight append
    was acked, refused or lost."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for author in authors:
            nursery.start_soon(partial(pump, url, author, stop, window=window))
        try:
            yield
        finally:
            stop.set()


@dataclass
class Follower:
    """A member following the collab live through every fault, resuming from its own view."""

    seen: list[int] = field(default_factory=list)
    connections: int = 0
    target: int | None = None
    reached: trio.Event = field(default_factory=trio.Event)

    def saw(self, seq: int) -> None:
        self.seen.append(seq)
        if self.target is not None and seq >= self.target:
            self.reached.set()


async def follow(url: str, owner: User, collab_id: str, follower: Follower) -> None:
    """Follow until cancelled; after a lost connection, resume after the last verified seq.

    Any integrity alarm (a gap the relay will not fill, a replayed or reordered event) escapes
    and fails the test.
    """
    view = None
    while True:
        try:
            async with (
                session(url, owner) as client,
                client.history(collab_id, owner.box_key, view=view, follow=True) as events,
            ):
                follower.connections += 1
                view = events.view
                async for entry in events:
                    follower.saw(entry.seq)
        except RECONNECTABLE:
            pass
        except RelayRefused as refused:
            # Reconnecting while the ledger is down meets `overloaded` ("retry shortly"), at
            # login or at the subscribe: a real follower retries it, as the authors do.
            if refused.code is not wire.ErrorCode.OVERLOADED:
                raise
        await trio.sleep(0.1)


async def team_with_follower(
    url: str, size: int, nursery: trio.Nursery
) -> tuple[list[Author], Follower]:
    """`team(url, size)`'s authors, and its owner following the collab live in `nursery`."""
    owner, authors = await team(url, size)
    follower = Follower()
    nursery.start_soon(follow, url, owner, owner.collab_id, follower)
    return authors, follower


async def wait_for_follower(follower: Follower, head: int) -> None:
    follower.target, follower.reached = head, trio.Event()
    if not follower.seen or follower.seen[-1] < head:
        await follower.reached.wait()
    assert follower.seen == list(range(1, head + 1)), "the follower saw a gap or a duplicate"


# --- the checks ---------------------------------------------------------------------------------


def stored(database_url: str, collab_id: str) -> dict[bytes, int]:
    """The collab's ledger as event id -> seq, after checking seq is 1..N with no id twice."""
    with psycopg.connect(database_url) as conn:
        rows = [
            (int(seq), bytes(eid))
            for seq, eid in conn.execute(
                "SELECT seq, event_id FROM events WHERE collab_id = %s ORDER BY seq",
                (collab_id,),
            )
        ]
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1)), "seq is not 1..N"
    where = {eid: seq for seq, eid in rows}
    assert len(where) == len(rows), "an event id is stored at two seqs"
    return where


async def check_acked_are_stored(database_url: str, authors: list[Author]) -> dict[bytes, int]:
    """Every acked event is in the ledger at exactly the seq its ack named."""
    where = await trio.to_thread.run_sync(stored, database_url, authors[0].collab_id)
    for author in authors:
        for eid, seq in author.acked.items():
            assert where.get(eid) == seq, (
                f"an event acked at seq {seq} is stored at {where.get(eid)} (lost if None)"
            )
    return where


async def retry_unacked(url: str, authors: list[Author], where: dict[bytes, int]) -> int:
    """Authors resend every event they hold no ack for; each resolves exactly once.

    One that had landed gets its stored seq back as a duplicate; one that had not is appended
    fresh. Returns how many had landed without an ack.
    """
    landed = 0
    for author in authors:
        pending = author.unacked()
        if not pending:
            continue
        async with session(url, author.user) as client:
            acks = await client.append_many(pending)
        for event, ack in zip(pending, acks, strict=True):
            eid = event_id(event)
            if eid in where:
                landed += 1
                assert ack.duplicate, "a stored event was appended again"
                assert ack.seq == where[eid], "a retry got another seq than the stored one"
            else:
                assert not ack.duplicate, "an event the ledger lacks was called a duplicate"
            author.record(event, ack.seq, ack.event_id)
    return landed


async def check_exactly_once(
    database_url: str, authors: list[Author], *, preamble: int
) -> dict[bytes, int]:
    """Every event any author made is stored once and acked at its seq; nothing else is
    stored besides the `preamble` (genesis and member additions)."""
    where = await check_acked_are_stored(database_url, authors)
    made = [event_id(e) for a in authors for e in a.sent]
    assert all(eid in where for eid in made), "an event was never stored"
    assert len(where) == preamble + len(made), "the ledger holds events nobody sent"
    return where


def verify_ledger(database_url: str) -> None:
    ledger = Ledger(database_url)
    ledger.open()
    try:
        report = ledger.verify_ledger()
    finally:
        ledger.close()
    assert report.ok, report.problems
