"""`cozy bench client`: what a person's commands and a bot pay to read a long collab.

The relay's scenarios measure the server; this one measures the client kit against it, on the
shape issue 17 names: a collab of two authors posting 256-byte messages, N events long, and a
bot (an agent member since the collab began). Each figure is in seconds, with the same-run
reference "one thread verifying N signatures" (`verify_ceiling`, measured here on the same
events after the clocks stop), so a ratio of 1.0 means "as long as one core's Ed25519 alone".

- `verify`: `Session.verify`, what `cozy verify` runs — a fresh device re-verifies from seq 1.
- `tail` then `tail_again`: a non-following `cozy tail` on one device (`Session.history`),
  then, after `NEW_EVENTS` more, `cozy tail --from` the first of them: what it costs to see
  what is new (the second may resume from the fold the first kept).
- `bot_catchup`: a fresh bot store (`backlog=True`) until its handler has seen the last event,
  with the reconnections it needed (`bot_reconnects`).
- `bot_restart_reply`: that bot stopped and started again on its store, a message posted as it
  starts: seconds until its reply is stored.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import nacl.public
import nacl.signing
import trio

from clientkit import Bot, Context, connect
from clientkit._agent import AgentCredentials
from clientkit._cli_tail import SAVE_HEAD_EVERY
from clientkit._collab import add
from clientkit._session import Identity, Keys, Session
from clientkit._state import ClientState
from cozy.bench._common import PASSWORD, Actor, BenchError, figure, pump
from cozy.bench._references import verify_ceiling
from model import content as contentmod
from model._crypto import random_bytes
from model.envelope import seal_event
from model.ids import new_id
from model.membership import CAP_POST, CAP_READ, Member, MemberKind, Role

if TYPE_CHECKING:
    from pathlib import Path

    from clientkit import Client
    from cozy.bench._common import RelayProcess
    from model.envelope import SignedEvent
    from model.membership import Operation
    from model.view import CollabView

MESSAGE_BYTES: Final = 256
PING: Final = "bench: are you there?"
NEW_EVENTS: Final = 10  # posted between `tail` and `tail again`


class _Person:
    def __init__(self, actor: Actor, box: nacl.public.PrivateKey) -> None:
        self.actor = actor
        self.box = box

    def session(self, client: Client, home: Path) -> Session:
        return Session(
            client,
            Identity(self.actor.account_id, self.actor.handle, MemberKind.HUMAN),
            Keys(self.actor.signing_key, self.box),
            ClientState(home / "state.db"),
            device="bench",
        )


def _add(member: Member, view: CollabView) -> Operation:
    return add(view, member)


async def _signup(url: str, handle: str) -> _Person:
    sign = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    async with connect(url) as client:
        account_id = await client.signup(handle, PASSWORD, sign, bytes(box.public_key))
        login = await client.login(handle, PASSWORD)
    return _Person(Actor(handle, account_id, sign, login.token), box)


def _messages(
    person: _Person,
    collab_id: str,
    epoch: int,
    key: bytes,
    count: int,
    ts: int,
    text: str = "x" * MESSAGE_BYTES,
) -> list[SignedEvent]:
    data = contentmod.encode_content(contentmod.Message(text=text))
    return [
        seal_event(
            signing_key=person.actor.signing_key,
            collab_key=key,
            collab_id=collab_id,
            actor_id=person.actor.account_id,
            kind="msg",
            ts=ts + i,
            content=data,
            epoch=epoch,
        )
        for i in range(count)
    ]


async def client(relay: RelayProcess, events: int, work: Path) -> dict[str, Any]:
    """Build the collab, then time each client figure one after another."""
    url = relay.url
    tag = random_bytes(3).hex()
    alice = await _signup(url, f"bench-client-{tag}-a")
    bob = await _signup(url, f"bench-client-{tag}-b")
    bot_sign = nacl.signing.SigningKey.generate()
    bot_box = nacl.public.PrivateKey.generate()
    bot_id = new_id("a")
    async with connect(url) as owner:
        await owner.login(alice.actor.handle, PASSWORD)
        owner.use_key(alice.actor.signing_key)
        session = alice.session(owner, work / "owner")
        collab_id = await session.create_collab("bench client")
        created = await owner.create_agent(
            bot_id, f"bench-bot-{tag}", bytes(bot_sign.verify_key), bytes(bot_box.public_key)
        )
        for member in (
            Member(
                bob.actor.account_id, Role.MEMBER, MemberKind.HUMAN,
                bytes(bob.actor.signing_key.verify_key), bytes(bob.box.public_key),
            ),
            Member(
                bot_id, Role.MEMBER, MemberKind.AGENT, bytes(bot_sign.verify_key),
                bytes(bot_box.public_key), (CAP_READ, CAP_POST),
            ),
        ):  # fmt: skip
            await session.manage(collab_id, partial(_add, member))
        view = await session.read(collab_id)
        epoch, key = view.current_key()
        base = view.head.seq
        relay_pk = owner.relay_pk.hex()
    # Two authors, half each, pumped at once (their events interleave as the relay orders them).
    now = int(time.time() * 1000)
    half = events // 2
    mine = _messages(alice, collab_id, epoch, key, events - half, now)
    theirs = _messages(bob, collab_id, epoch, key, half, now)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, url, alice.actor, mine, 32)
        nursery.start_soon(pump, url, bob.actor, theirs, 32)
    head = base + events

    out: dict[str, Any] = {"events": events, "head_seq": head, "message_bytes": MESSAGE_BYTES}

    async with connect(url) as conn:
        await conn.login(alice.actor.handle, PASSWORD)
        started = time.perf_counter()
        verified = await alice.session(conn, work / "verify").verify(collab_id)
        out["verify_s"] = time.perf_counter() - started
        out["verified_events"] = verified.head.seq
        if verified.head.seq != head:
            raise BenchError(f"verify read {verified.head.seq} events, expected {head}")
    # `cozy tail`, then — NEW_EVENTS later — `cozy tail --from` the first new seq.
    for name, first in (("tail_s", 1), ("tail_again_s", head + 1)):
        if first > 1:
            new = _messages(bob, collab_id, epoch, key, NEW_EVENTS, int(time.time() * 1000))
            await pump(url, bob.actor, new, 32)
            head += NEW_EVENTS
        async with connect(url) as conn:
            await conn.login(alice.actor.handle, PASSWORD)
            started = time.perf_counter()
            last = await _tail(alice.session(conn, work / "tail"), collab_id, first)
            out[name] = time.perf_counter() - started
            if last != head:
                raise BenchError(f"tail ended at {last}, expected {head}")
    out["head_seq"] = head

    creds = AgentCredentials(
        relay_url=url,
        relay_pk=relay_pk,
        account_id=bot_id,
        handle=f"bench-bot-{tag}",
        collab_id=collab_id,
        sign_seed=bytes(bot_sign),
        box_sk=bytes(bot_box),
        token=created.token,
        expires_at=created.expires_at,
    )
    out |= await _bots(creds, work / "bot.state", head, alice, url, collab_id, epoch, key)

    # The reference, on the same events, after every clock stopped.
    ceiling = await trio.to_thread.run_sync(verify_ceiling, mine[:2000], alice.actor.public_key)
    out["verify_ceiling_per_s"] = ceiling["per_s"]
    out["verify_ceiling_s"] = events / ceiling["per_s"]
    return out


async def _tail(session: Session, collab_id: str, first: int) -> int:
    """What a non-following `cozy tail --from first` does (without printing): the checked
    history once (from the fold this device kept, when `first` is past it), its head saved as
    it goes and the fold at the end. Returns the last seq handed out."""
    last = 0
    start = session.resume_view(collab_id, before=first)
    saved = trio.current_time()
    async with session.history(collab_id, view=start) as events:
        async for entry in events:
            last = entry.seq
            if trio.current_time() - saved >= SAVE_HEAD_EVERY:
                session.state.save_head(collab_id, events.head)
                saved = trio.current_time()
    session.state.save_head(collab_id, events.head)
    session.save_view(collab_id, events.view)
    return last


async def _bots(
    creds: AgentCredentials,
    store: Path,
    head: int,
    alice: _Person,
    url: str,
    collab_id: str,
    epoch: int,
    key: bytes,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    caught_up = trio.Event()
    replied = trio.Event()

    def make_bot() -> Bot:
        bot = Bot(creds, store=store, backlog=True)

        @bot.on_message
        async def handle(ctx: Context) -> None:
            if ctx.text == PING:
                await ctx.reply("here")
                replied.set()
            elif ctx.entry.seq >= head:
                caught_up.set()

        return bot

    bot = make_bot()
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        nursery.start_soon(bot.run)
        await caught_up.wait()
        out["bot_catchup_s"] = time.perf_counter() - started
        out["bot_reconnects"] = bot.connections - 1
        nursery.cancel_scope.cancel()

    # Restart on the same store; the message goes in as it starts.
    bot = make_bot()
    ping = _messages(alice, collab_id, epoch, key, 1, int(time.time() * 1000), text=PING)
    async with trio.open_nursery() as nursery:
        started = time.perf_counter()
        nursery.start_soon(bot.run)
        await pump(url, alice.actor, ping, 1)
        await replied.wait()
        out["bot_restart_reply_s"] = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return out


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Each client figure in seconds against one thread verifying the same N signatures;
    `client.verify_rate` is `cozy verify`'s events/s against one thread's verifications/s."""
    ref_s = {"verify_ceiling": {"value": round(raw["verify_ceiling_s"], 3), "unit": "s"}}
    out = {
        # Rounded first, as `figure` rounds what it prints: the ratio is of the printed values.
        f"client.{name}": figure(round(raw[f"{name}_s"], 3), "s", "lower", ref_s)
        for name in ("verify", "tail", "tail_again", "bot_restart_reply", "bot_catchup")
    }
    out["client.verify_rate"] = figure(
        round(raw["verified_events"] / raw["verify_s"], 3),
        "events/s",
        "higher",
        {"verify_ceiling": {"value": raw["verify_ceiling_per_s"], "unit": "verifications/s"}},
    )
    return out


__all__ = ["client", "figures"]
