"""Durable author streams (issue 14, bug 2): a replay never re-signs a counter (SO-4).

Every reader checks that an author stream's counters go up by one. A bot whose handler is
replayed (killed after its reply was stored, before its cursor was committed) used to sign a
*new* reply with the counter of the stored one, and every member's client then accused the
honest relay of reordering (`ReorderDetected`) at that seq, forever. Here the real bot kit and
the real `cozy` CLI are killed at each point of their send path against a real relay, started
again, and every member must then read the history without any alarm — with no counter used
twice and, where the kit promises it, each reply stored exactly once.

A "kill" is a `_Killed` (a BaseException nothing in the kits catches) raised at the chosen
point, which ends the bot's task there like a `kill -9` would end its process: nothing after
that point runs, and the bot is then started again from its store by a new `Bot`.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nacl.public
import nacl.signing
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from clientkit import _collab
from clientkit._agent import AgentCredentials, save_credentials
from clientkit._state import ClientState
from clientkit.bot import Bot, Context
from model import content as contentmod
from model.ids import new_id
from model.membership import Member, MemberKind, Role
from model.view import CollabView
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import post, relay_config, relay_in_thread, session, sign_up
from tests.test_membership_relay import add

if TYPE_CHECKING:
    from clientkit._state import SentEvent
    from model.chain import Head
    from model.equivocation import SignedReceipt
    from relay._server import Relay
    from tests.relay_harness import User

KILL_POINTS = ("before_sign", "after_sign", "after_send", "after_ack")


class _Killed(BaseException):
    """The bot's process dies here."""


class _KillingState(ClientState):
    """The bot's real store, with a kill switch at the points of its send path."""

    def __init__(self, path: Path, bot: _KillableBot) -> None:
        super().__init__(path)
        self._bot = bot

    def _maybe_kill(self, point: str) -> None:
        if self._bot.kill_at == point:
            self._bot.kill_at = None
            self._bot.killed = True
            raise _Killed(point)

    def keep_signed(self, event: SentEvent) -> None:
        super().keep_signed(event)
        self._maybe_kill("after_sign")  # signed and kept, not sent

    def add_receipt(self, receipt: SignedReceipt) -> SignedReceipt | None:
        self._maybe_kill("after_send")  # stored by the relay; its ack never recorded
        self._bot.replied = True  # (only the bot's replies are appended)
        return super().add_receipt(receipt)

    def commit_cursor(self, collab_id: str, head: Head) -> None:
        if self._bot.replied:  # the reply's ack recorded; the cursor not committed
            self._maybe_kill("after_ack")
        self._bot.replied = False
        super().commit_cursor(collab_id, head)


class _KillableBot(Bot):
    kill_at: str | None = None
    killed: bool = False  # the kill point was reached (the poll below may see the cursor first)
    replied: bool = False  # a reply was acked since the last cursor commit

    @property
    def state(self) -> ClientState:
        return _KillingState(self.store / "state.db", self)


def _answering(bot: _KillableBot) -> _KillableBot:
    @bot.on_message
    async def answer(ctx: Context) -> None:
        if bot.kill_at == "before_sign":
            bot.kill_at = None
            raise _Killed("before_sign")
        await ctx.reply(f"re: {ctx.text}")

    return bot


async def _bot_for(url: str, relay_pk: bytes, owner: User, tmp: Path) -> Path:
    """An agent with read and post in `owner`'s collab; returns its credential file."""
    sign, box = nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()
    agent_id = new_id("a")
    async with session(url, owner) as client:
        created = await client.create_agent(
            agent_id, f"bot-{agent_id[-6:]}", bytes(sign.verify_key), bytes(box.public_key)
        )
        member = Member(agent_id, Role.MEMBER, MemberKind.AGENT, bytes(sign.verify_key),
                        bytes(box.public_key), ("read", "post"))  # fmt: skip
        await client.manage(
            owner.signing_key,
            owner.box_key,
            owner.collab_id,
            lambda v: _collab.add(v, member),
        )
    creds = tmp / "bot.cozy-agent"
    save_credentials(
        creds,
        AgentCredentials(relay_url=url, relay_pk=relay_pk.hex(), account_id=agent_id,
                         handle="bot", collab_id=owner.collab_id,
                         sign_seed=bytes(sign), box_sk=bytes(box), token=created.token,
                         expires_at=created.expires_at),
    )  # fmt: skip
    return creds


async def _run_bot(creds: Path, store: Path, until_seq: int, kill_at: str | None) -> bool:
    """Run a fresh bot from its store until its cursor reaches `until_seq` (False) or it is
    killed at `kill_at` (True)."""
    bot = _KillableBot.from_credentials(creds, store=store, backlog=True)  # posted before
    assert isinstance(bot, _KillableBot)
    _answering(bot)
    bot.kill_at = kill_at
    cid = bot.collab_id
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bot.run)
                # The cursor lives in the bot's SQLite store: polled, there is no event to await.
                while ClientState(store / "state.db").cursor(cid) < until_seq:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    except _Killed:
        return True
    except BaseExceptionGroup as group:
        killed, rest = group.split(_Killed)
        if killed is None or rest is not None:
            raise
        return True
    # The simulated kill is an exception: the bot's `finally` still commits its cursor on the
    # way out, so the poll can see the cursor before the kill reaches this nursery.
    return bot.killed


async def _read_all(url: str, reader: User, cid: str) -> tuple[CollabView, list[str]]:
    """`reader`'s verified read of the whole collab (raises any alarm) and the bot's replies."""
    async with session(url, reader) as client:
        replies: list[str] = []
        async with client.history(cid, reader.box_key) as events:
            async for entry in events:
                text = entry.content.text if isinstance(entry.content, contentmod.Message) else ""
                if text.startswith("re: "):
                    replies.append(text)
        return events.view, replies


def _bot_counters(view: CollabView, bot_id: str) -> int:
    return view._streams[(bot_id, "bot")][0]


@pytest.mark.objective("SO-4")
async def test_a_bot_killed_between_its_stored_reply_and_its_cursor_leaves_an_honest_history(
    relay: Relay, tmp_path: Path
) -> None:
    alice, bob = await sign_up(relay.url, "alice"), await sign_up(relay.url, "bob")
    async with session(relay.url, alice) as a:
        await add(a, alice, bob)
    cid = alice.collab_id
    creds = await _bot_for(relay.url, relay.relay_pk, alice, tmp_path)
    store = tmp_path / "bot-store"
    async with session(relay.url, alice) as a:
        first = await post(a, alice, cid, "one")
    # Killed after its reply to "one" was stored and acked, before the cursor moved past "one".
    assert await _run_bot(creds, store, first, kill_at="after_ack")
    async with session(relay.url, alice) as a:
        second = await post(a, alice, cid, "two")
    assert not await _run_bot(creds, store, second, kill_at=None)  # restarted: replays "one"
    for reader in (alice, bob):
        _, replies = await _read_all(relay.url, reader, cid)  # no alarm
        assert replies == ["re: one", "re: two"]  # the replayed reply was not posted again


@pytest.mark.objective("SO-4")
async def test_a_bot_whose_store_was_lost_answers_again_without_reusing_a_counter(
    relay: Relay, tmp_path: Path
) -> None:
    alice = await sign_up(relay.url, "alice")
    cid = alice.collab_id
    creds = await _bot_for(relay.url, relay.relay_pk, alice, tmp_path)
    async with session(relay.url, alice) as a:
        first = await post(a, alice, cid, "one")
    assert not await _run_bot(creds, tmp_path / "store", first, kill_at=None)
    # The store is gone (a new disk): the bot handles the history again from the start. Its
    # replies follow its stream as the relay's head shows it, not its handler's older view.
    assert not await _run_bot(creds, tmp_path / "new-store", first, kill_at=None)
    _, replies = await _read_all(relay.url, alice, cid)  # no alarm
    assert replies == ["re: one", "re: one"]  # at least once: documented for a lost store


@pytest.mark.objective("SO-4")
def test_a_bot_killed_anywhere_in_its_handler_never_causes_an_alarm(
    database_url: str, tmp_path: Path
) -> None:
    config = relay_config(database_url, tmp_path / "relay")
    with relay_in_thread(config, name="durable-relay") as served:
        url, relay_pk = served.url, served.relay.relay_pk

        @settings(
            max_examples=8,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(kills=st.lists(st.sampled_from(KILL_POINTS), min_size=1, max_size=4))
        def example(kills: list[str]) -> None:
            trio.run(_kill_schedule, url, relay_pk, tmp_path / new_id("x"), kills)

        example()


async def _kill_schedule(url: str, relay_pk: bytes, tmp: Path, kills: list[str]) -> None:
    """Alice posts; the bot is killed at each point of `kills` in turn (each restart picks up
    where the last died), then runs clean; Alice posts again and the bot answers."""
    tmp.mkdir(parents=True)  # noqa: ASYNC240 — a test's own scratch folder
    alice = await sign_up(url)
    cid = alice.collab_id
    creds = await _bot_for(url, relay_pk, alice, tmp)
    store = tmp / "bot-store"
    texts = ["a", "b"]
    async with session(url, alice) as a:
        last = [await post(a, alice, cid, t) for t in texts][-1]
    for point in kills:
        await _run_bot(creds, store, last, kill_at=point)
    assert not await _run_bot(creds, store, last, kill_at=None)
    async with session(url, alice) as a:
        last = await post(a, alice, cid, "c")
    assert not await _run_bot(creds, store, last, kill_at=None)
    view, replies = await _read_all(url, alice, cid)  # no alarm on an honest relay
    assert replies == ["re: a", "re: b", "re: c"]  # each reply stored once, in order
    with closing(sqlite3.connect(store / "state.db")) as conn:
        [(kept,)] = conn.execute("SELECT count(*) FROM sent").fetchall()
    assert kept == 1  # behind the cursor, only the stream's last reply is kept
    bot_id = next(m for m in view.membership.members if m != alice.account_id)  # type: ignore[union-attr]
    assert _bot_counters(view, bot_id) == 3  # counters 1, 2, 3: none used twice, none skipped


@pytest.mark.objective("SO-4")
@pytest.mark.parametrize("kill_at", ["after_sign", "after_send"])
async def test_cozy_post_interrupted_after_sending_and_run_again_posts_once(
    relay: Relay, tmp_path: Path, kill_at: str
) -> None:
    home = tmp_path / "alice"
    env = client_env(home)
    await cli_signup(relay.url, home, "alice")
    cid = (await cozy("collab", "create", "ops", env=env)).stdout.decode().strip()
    # The first run is killed (a process exit, code 9, no cleanup) once its post is signed and
    # kept (after_sign: never sent), or once the relay acked it, before the CLI recorded that.
    hooked = {**env, "PYTHONPATH": _kill_hook(tmp_path, kill_at)}
    killed = await cozy("post", cid, "hello", env=hooked, check=False)
    assert killed.returncode == 9, killed.stderr.decode()
    again = await cozy("post", cid, "hello", env=env)
    assert b"(already posted)" in again.stdout
    await cozy("post", cid, "hello", env=env)  # a deliberate second "hello" is a new post
    device = _device(home)
    assert ClientState(home / "state.db").unacked(cid, device) == []
    out = (await cozy("tail", cid, env=env)).stdout.decode()  # verifies: raises on any alarm
    assert [line.split("\t")[-1] for line in out.splitlines()].count("hello") == 2
    verify = await cozy("verify", cid, env=env)
    assert verify.returncode == 0
    assert _kept(home) == 1  # only the stream's last event is kept once acked


def _device(home: Path) -> str:
    with closing(sqlite3.connect(home / "state.db")) as conn:
        [(device,)] = conn.execute("SELECT DISTINCT device FROM sent").fetchall()
    return str(device)


def _kept(home: Path) -> int:
    with closing(sqlite3.connect(home / "state.db")) as conn:
        [(n,)] = conn.execute("SELECT count(*) FROM sent").fetchall()
    return int(n)


def _kill_hook(tmp: Path, kill_at: str) -> str:
    """A `sitecustomize` that ends the `cozy` process (exit code 9, no cleanup) right after it
    kept its first signed event (`after_sign`), or the moment the relay's receipt for its first
    append arrives (`after_send`: stored, nothing recorded)."""
    hook = tmp / f"kill-hook-{kill_at}"
    hook.mkdir(exist_ok=True)
    patch = {
        "after_sign": "_keep = ClientState.keep_signed\n"
        "def _die(self, event):\n"
        "    _keep(self, event)\n"
        "    os._exit(9)\n"
        "ClientState.keep_signed = _die\n",
        "after_send": "def _die(self, receipt):\n    os._exit(9)\nClientState.add_receipt = _die\n",
    }[kill_at]
    (hook / "sitecustomize.py").write_text(
        "import os\nfrom clientkit._state import ClientState\n" + patch
    )
    return os.pathsep.join([str(hook), *sys.path])


async def _backlog_bot(relay: Relay, tmp_path: Path) -> tuple[Bot, list[str], int]:
    """Alice's collab with three messages said after the bot joined, and a new bot
    (`backlog=True`) that only listens; returns it, what it heard, and the last seq."""
    alice = await sign_up(relay.url, "alice")
    creds = await _bot_for(relay.url, relay.relay_pk, alice, tmp_path)
    async with session(relay.url, alice) as a:
        last = [await post(a, alice, alice.collab_id, t) for t in ("one", "two", "three")][-1]
    bot = Bot.from_credentials(creds, store=tmp_path / "store", backlog=True)
    heard: list[str] = []

    @bot.on_message
    async def listen(ctx: Context) -> None:
        heard.append(ctx.text)

    return bot, heard, last


async def test_a_fresh_bot_takes_in_each_backlog_event_once_when_it_posts_nothing(
    relay: Relay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: a bot with a new store first read the whole collab at the relay's head (to
    learn where its own stream got), then read it again from the genesis for its handlers:
    every event verified, opened and folded twice (each seq taken in 2 times). Now that read
    waits for the bot's first post (`test_a_bot_whose_store_was_lost_…` posts mid-backlog),
    and a backlog that posts nothing is taken in once."""
    bot, heard, _ = await _backlog_bot(relay, tmp_path)
    taken: dict[int, int] = {}
    ingest = CollabView.ingest

    def counted(view: CollabView, seq: int, *args: Any, **kwargs: Any) -> Any:
        taken[seq] = taken.get(seq, 0) + 1
        return ingest(view, seq, *args, **kwargs)

    monkeypatch.setattr(CollabView, "ingest", counted)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bot.run)
            while len(heard) < 3:  # noqa: ASYNC110 — the handler's list: no event to await
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert heard == ["one", "two", "three"]
    assert taken
    assert max(taken.values()) == 1, taken


async def test_a_bot_gone_quiet_after_its_backlog_commits_its_cursor_without_stopping(
    relay: Relay, tmp_path: Path
) -> None:
    """Old code: the cursor of a backlog's last entry stayed uncommitted for as long as the
    bot then sat idle (a `caught_up` frame still queued when it was handled counted as more
    to come, and nothing came), so a crash then replayed the whole last batch; it is
    committed within `CURSOR_AFTER` now (the wait below stopped at its 60 s guard before)."""
    bot, heard, last = await _backlog_bot(relay, tmp_path)
    state = ClientState(tmp_path / "store" / "state.db")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bot.run)
            while state.cursor(bot.collab_id) < last:  # noqa: ASYNC110 — polled SQLite
                await trio.sleep(0.05)
            assert heard == ["one", "two", "three"]  # and still running: not the final commit
            nursery.cancel_scope.cancel()
