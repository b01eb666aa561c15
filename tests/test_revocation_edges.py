"""SO-7 at its edges: how a revoked agent is cut off, and what happens to content in flight.

- A revoked agent's every connection is closed with close code 4003 (not just any close, not a
  generic error): raw WebSockets see the code, the client kit surfaces it, and the human who
  revoked stays connected.
- Content sealed under epoch N that reaches the relay after a removal rotated the key to N+1 is
  bounced (`stale`, naming the epoch) and never stored; the client kit seals it again under
  N+1, so the removed member — who holds the key of epoch N — cannot open what is stored. This
  holds for a bot's reply whose handler was running while the member was removed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import pytest
import trio
from trio_websocket import ConnectionClosed

from clientkit import ConnectionLost, RelayRefused, _collab, connect
from clientkit._agent import AgentCredentials, save_credentials
from clientkit._transport import FrameReader, open_websocket
from clientkit.bot import Bot, Context
from model import content as contentmod
from model import wire
from model.envelope import decode_body, event_id
from model.ids import new_id
from model.membership import Member, MemberKind, Role
from tests.relay_harness import User, post, seal_in_view, session, sign_up
from tests.test_membership_relay import team, texts

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from clientkit import Client
    from ledger import Ledger
    from model.envelope import SignedEvent
    from model.view import CollabView
    from relay._server import Relay

AGENT_REVOKED = 4003


async def _agent(
    client: Client, owner: User, *caps: str
) -> tuple[str, wire.AgentCreated, nacl.signing.SigningKey, nacl.public.PrivateKey]:
    """An agent created and added to `owner`'s collab by `owner` (as `cozy agent create` does)."""
    sign, box = nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()
    agent_id = new_id("a")
    created = await client.create_agent(
        agent_id, f"bot-{agent_id[-6:]}", bytes(sign.verify_key), bytes(box.public_key)
    )
    member = Member(agent_id, Role.MEMBER, MemberKind.AGENT, bytes(sign.verify_key),
                    bytes(box.public_key), caps)  # fmt: skip
    await client.manage(
        owner.signing_key, owner.box_key, owner.collab_id, lambda v: _collab.add(v, member)
    )
    return agent_id, created, sign, box


async def _close_code(ws: object, frames: FrameReader) -> int | None:
    """Read until the relay closes the connection; return its close code."""
    try:
        while True:
            await frames.next()
    except ConnectionClosed as exc:
        return exc.reason.code if exc.reason is not None else None


@pytest.mark.objective("SO-7")
async def test_a_revoked_agents_connections_close_with_code_4003(relay: Relay) -> None:
    alice = await sign_up(relay.url, "alice")
    async with session(relay.url, alice) as a:
        agent_id, created, _, _ = await _agent(a, alice, "read", "post")
        async with (
            trio.open_nursery() as nursery,
            open_websocket(relay.url, nursery) as following,
            open_websocket(relay.url, nursery) as idle,
            connect(relay.url) as kit,
        ):
            readers = []
            for ws in (following, idle):
                frames = FrameReader(ws)
                assert isinstance(await frames.next(), wire.Welcome)
                await ws.send_message(wire.encode(wire.Authenticate(rid=1, token=created.token)))
                assert isinstance(await frames.next(), wire.Authenticated)
                readers.append(frames)
            await following.send_message(
                wire.encode(wire.Subscribe(rid=2, collab_id=alice.collab_id, from_seq=1))
            )
            while not isinstance(await readers[0].next(), wire.CaughtUp):
                pass
            await kit.authenticate(created.token)

            await a.revoke_agent(agent_id)

            with trio.fail_after(10):
                codes = [
                    await _close_code(ws, r)
                    for ws, r in zip((following, idle), readers, strict=True)
                ]
                while True:  # the kit's connection: its next request fails with the close
                    try:
                        await kit.request(lambda rid: wire.Ping(rid=rid), wire.Pong)
                    except ConnectionLost as lost:
                        kit_code = lost.code
                        break
                    await trio.sleep(0.05)
            # The human who revoked is not cut off.
            await a.request(lambda rid: wire.Ping(rid=rid), wire.Pong)
    assert codes == [AGENT_REVOKED, AGENT_REVOKED]
    assert kit_code == AGENT_REVOKED


def _sealer(user: User, text: str) -> Callable[[CollabView], SignedEvent]:
    return lambda view: seal_in_view(user, view, text, ts=int(time.time() * 1000), evidence=True)


@pytest.mark.objective("SO-7")
async def test_a_post_sealed_before_a_removal_is_bounced_and_resealed_under_the_new_key(
    relay: Relay, ledger: Ledger
) -> None:
    alice, bob, carol = await team(relay)
    cid = alice.collab_id
    async with (
        session(relay.url, alice) as a,
        session(relay.url, bob) as b,
        session(relay.url, carol) as c,
    ):
        carol_view = await c.read(cid, carol.box_key)
        bob_view = await b.read(cid, bob.box_key)  # Bob starts writing at epoch 0 …
        seal = _sealer(bob, "sealed while carol was still here")
        in_flight = seal(bob_view)
        removal, _ = await a.manage(
            alice.signing_key, alice.box_key, cid, lambda v: _collab.remove(v, carol.account_id)
        )
        # … and his event reaches the relay after the key rotated: bounced, not stored.
        with pytest.raises(RelayRefused) as bounced:
            await b.append(in_flight)
        assert bounced.value.code is wire.ErrorCode.STALE
        assert "epoch 1" in bounced.value.message
        assert bounced.value.head_seq == removal.seq
        # The kit seals it again against a fresh view: under epoch 1's key.
        ack, used = await b.seal_and_append(cid, bob.box_key, seal, view=bob_view)
        assert used.membership is not None
        assert used.membership.epoch == 1
        assert (await texts(a, alice, cid))[ack.seq] == "sealed while carol was still here"
    stored = await trio.to_thread.run_sync(ledger.read_range, cid, removal.seq + 1, 100)
    assert [e.seq for e in stored] == [ack.seq]
    assert decode_body(stored[0].event.body).epoch == 1
    assert event_id(stored[0].event) != event_id(in_flight), "the bounced ciphertext was stored"
    # Carol, handed what was stored (a leak, a lying relay), opens nothing after her removal.
    everything = await trio.to_thread.run_sync(ledger.read_range, cid, carol_view.head.seq + 1, 100)
    entries = [carol_view.ingest(e.seq, e.event, e.chain) for e in everything]
    assert entries[-1].seq == ack.seq
    assert entries[-1].content is None
    assert "removed" in entries[-1].unreadable


@pytest.mark.objective("SO-7")
async def test_a_bot_reply_sealed_before_a_removal_is_resealed_not_lost(
    relay: Relay, ledger: Ledger, tmp_path: Path
) -> None:
    alice, _bob, carol = await team(relay)
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        agent_id, created, sign, box = await _agent(a, alice, "read", "post")
    creds = tmp_path / "bot.cozy-agent"
    save_credentials(
        creds,
        AgentCredentials(relay_url=relay.url, relay_pk=relay.relay_pk.hex(), account_id=agent_id,
                         handle="bot", collab_id=cid, sign_seed=bytes(sign), box_sk=bytes(box),
                         token=created.token, expires_at=created.expires_at),
    )  # fmt: skip
    bot = Bot.from_credentials(creds, store=tmp_path / "bot-store")
    handling, removed = trio.Event(), trio.Event()

    @bot.on_message
    async def answer(ctx: Context) -> None:
        if ctx.text == "status?":
            handling.set()
            await removed.wait()  # Carol is removed while the bot composes its answer
            await ctx.reply("all green")

    async with session(relay.url, carol) as c:
        carol_view = await c.read(cid, carol.box_key)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(bot.run)
            async with session(relay.url, alice) as a:
                await post(a, alice, cid, "status?")
                await handling.wait()
                removal, _ = await a.manage(
                    alice.signing_key,
                    alice.box_key,
                    cid,
                    lambda v: _collab.remove(v, carol.account_id),
                )
                removed.set()
                async with a.history(cid, alice.box_key, follow=True) as events:
                    async for e in events:
                        if (
                            isinstance(e.content, contentmod.Message)
                            and e.content.text == "all green"
                        ):
                            break
            nursery.cancel_scope.cancel()
    stored = await trio.to_thread.run_sync(ledger.read_range, cid, removal.seq + 1, 100)
    [reply] = [e for e in stored if decode_body(e.event.body).actor_id == agent_id]
    assert decode_body(reply.event.body).epoch == 1
    everything = await trio.to_thread.run_sync(ledger.read_range, cid, carol_view.head.seq + 1, 100)
    entries = {e.seq: carol_view.ingest(e.seq, e.event, e.chain) for e in everything}
    assert entries[reply.seq].content is None
    assert "removed" in entries[reply.seq].unreadable
