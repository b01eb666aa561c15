"""An agent's capabilities hold against an attacker (SO-9).

The honest relay refuses `read` to an agent without it — live or historical, events or
artifacts. A relay that lies (tests/evil_relay.py) can deliver content written by an agent
without `post`; every client refuses it, by its own fold of the signed membership.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import pytest
import trio

from clientkit import RelayRefused, TamperDetected, _collab, connect
from model import artifacts, wire
from model import content as contentmod
from model.envelope import seal_event
from model.ids import new_id
from model.membership import Member, MemberKind, Role
from tests.collab_sim import Sim
from tests.evil_relay import EvilRelay
from tests.helpers import TS0, Person
from tests.relay_harness import User, post, session, sign_up

if TYPE_CHECKING:
    from clientkit import Client
    from relay._server import Relay


@dataclass
class Agent:
    account_id: str
    token: str
    box_key: nacl.public.PrivateKey


async def add_agent(client: Client, owner: User, caps: tuple[str, ...]) -> Agent:
    """Create an agent account the way `cozy agent create` does and add it with `caps`."""
    sign, box = nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()
    account_id = new_id("a")
    created = await client.create_agent(
        account_id, f"bot-{secrets.token_hex(3)}", bytes(sign.verify_key), bytes(box.public_key)
    )
    member = Member(
        account_id, Role.MEMBER, MemberKind.AGENT, bytes(sign.verify_key), bytes(box.public_key),
        caps,
    )  # fmt: skip
    await client.manage(
        owner.signing_key, owner.box_key, owner.collab_id, lambda v: _collab.add(v, member)
    )
    return Agent(account_id, created.token, box)


async def _subscribe_once(client: Client, collab_id: str) -> list[wire.Reply]:
    frames: list[wire.Reply] = []
    async with client.subscribe(collab_id, follow=False) as raw:
        async for frame in raw:
            frames.append(frame)
            if isinstance(frame, wire.CaughtUp):
                break
    return frames


async def _download(client: Client, collab_id: str, ref: str) -> list[bytes]:
    async with client.download_artifact(collab_id, ref) as pieces:
        return [p async for p in pieces]


@pytest.mark.objective("SO-9")
async def test_an_agent_without_read_gets_no_events_and_no_artifacts(relay: Relay) -> None:
    alice = await sign_up(relay.url, "alice")
    sealed = list(artifacts.seal_stream(alice.collab_key, alice.collab_id, [b"plans" * 1000]))
    async with session(relay.url, alice) as a:
        await post(a, alice, alice.collab_id, "for readers only")
        stored = await a.upload_artifact(alice.collab_id, sealed)
        blind = await add_agent(a, alice, ("post", "tool:raw"))
        reader = await add_agent(a, alice, ("read",))
    with trio.fail_after(30):
        async with connect(relay.url) as bot:
            await bot.authenticate(blind.token)
            for attempt in ("live", "history", "from-a-later-seq", "artifact"):
                with pytest.raises(RelayRefused) as refused:
                    if attempt == "live":
                        async with bot.subscribe(alice.collab_id, follow=True) as raw:
                            await raw.receive()
                    elif attempt == "history":
                        await _subscribe_once(bot, alice.collab_id)
                    elif attempt == "from-a-later-seq":
                        async with bot.subscribe(alice.collab_id, 3, follow=False) as raw:
                            await raw.receive()
                    else:
                        await _download(bot, alice.collab_id, stored.ref)
                assert refused.value.code is wire.ErrorCode.UNAUTHORIZED, attempt
                assert "'read'" in refused.value.message, attempt
            with pytest.raises(RelayRefused) as kit_refused:
                await bot.read(alice.collab_id, blind.box_key)  # the kit's own reader too
            assert kit_refused.value.code is wire.ErrorCode.UNAUTHORIZED
            assert "'read'" in kit_refused.value.message
            await bot.request(wire.Ping, wire.Pong)  # refused, not disconnected
        # The same requests succeed for an agent that holds `read`: the refusal is the rule.
        async with connect(relay.url) as bot:
            await bot.authenticate(reader.token)
            frames = await _subscribe_once(bot, alice.collab_id)
            assert any(isinstance(f, wire.Event) for f in frames)
            assert await _download(bot, alice.collab_id, stored.ref) == sealed


def _bot_message(sim: Sim, bot: Person) -> int:
    """Content written and signed by `bot` under the current key, appended by a lying relay."""
    assert sim.state is not None
    return sim.force(
        seal_event(
            signing_key=bot.key,
            collab_key=sim.keys[0],
            collab_id=sim.collab_id,
            actor_id=bot.id,
            kind="msg",
            ts=TS0,
            content=contentmod.encode_content(contentmod.Message("I was never allowed to post")),
            epoch=sim.state.epoch,
        )
    )


async def _read_all(url: str, reader: Person, collab_id: str) -> list[int]:
    async with connect(url) as client:
        await client.authenticate(reader.id)
        async with client.history(collab_id, reader.box) as events:
            return [e.seq async for e in events]


@pytest.mark.objective("SO-9")
@pytest.mark.parametrize("caps", [("read",), ("read", "tool:raw"), ()])
async def test_clients_reject_content_from_an_agent_without_post_even_from_a_lying_relay(
    caps: tuple[str, ...],
) -> None:
    alice, bob, bot = Person(), Person(), Person(MemberKind.AGENT)
    sim = Sim(alice)
    sim.add(alice, bob)
    sim.change(alice, lambda v: _collab.add(v, bot.as_member(Role.MEMBER, caps)))
    sim.post(alice, "hello")
    forged = _bot_message(sim, bot)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(EvilRelay(sim.collab_id, sim.events).serve)
            for reader in (alice, bob):
                with pytest.raises(TamperDetected) as alarm:
                    await _read_all(url, reader, sim.collab_id)
                assert alarm.value.seq == forged
                assert "post capability" in str(alarm.value)
            # Everything before the forged event verifies: the alarm is about that event only.
            honest = await nursery.start(EvilRelay(sim.collab_id, sim.events[:-1]).serve)
            assert await _read_all(honest, bob, sim.collab_id) == list(range(1, forged))
            nursery.cancel_scope.cancel()


@pytest.mark.objective("SO-9")
async def test_content_from_an_agent_with_post_is_accepted_by_the_same_clients() -> None:
    """The control for the test above: same relay, same reader, the agent granted `post`."""
    alice, bot = Person(), Person(MemberKind.AGENT)
    sim = Sim(alice)
    sim.change(alice, lambda v: _collab.add(v, bot.as_member(Role.MEMBER, ("read", "post"))))
    written = _bot_message(sim, bot)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(EvilRelay(sim.collab_id, sim.events).serve)
            assert (await _read_all(url, alice, sim.collab_id))[-1] == written
            nursery.cancel_scope.cancel()
