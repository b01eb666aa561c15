"""A session ends everything it opened (issue 13 item 3; SO-5, SO-6): a live subscription
stops being fed the moment its session expires, when its connection re-authenticates as another
account, and when its agent's token is revoked — wherever that subscription was opened.

Each attack is the cheapest one: keep a subscription open on a real relay and wait for the
events that should no longer come. Before the fix every one of them kept being delivered.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import pytest
import trio

from clientkit import RelayRefused, _collab, connect
from model import wire
from model.ids import new_id
from model.membership import Member, MemberKind, Role
from tests.relay_harness import PASSWORD, post, relay_config, running_relay, session, sign_up
from tests.test_membership_relay import add

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay
    from tests.relay_harness import User

QUIET = 1.0  # how long a subscriber waits for a frame that must not come


async def frames_until_quiet(channel: trio.MemoryReceiveChannel[wire.Reply]) -> list[wire.Reply]:
    """Every frame that arrives until nothing more comes for QUIET seconds."""
    got: list[wire.Reply] = []
    while True:
        with trio.move_on_after(QUIET):
            got.append(await channel.receive())
            continue
        return got


async def caught_up(channel: trio.MemoryReceiveChannel[wire.Reply]) -> None:
    with trio.fail_after(10):
        while not isinstance(await channel.receive(), wire.CaughtUp):
            pass


def events_of(frames: list[wire.Reply]) -> list[int]:
    return [f.seq for f in frames if isinstance(f, wire.Event | wire.Withheld)]


async def add_agent(url: str, owner: User, caps: tuple[str, ...]) -> str:
    """Create an agent and add it to the owner's collab with `caps`; returns its token."""
    sign = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    agent_id = new_id("a")
    member = Member(
        agent_id, Role.MEMBER, MemberKind.AGENT, bytes(sign.verify_key), bytes(box.public_key), caps
    )
    async with session(url, owner) as client:
        created = await client.create_agent(
            agent_id, f"bot-{agent_id[-6:]}", member.sign_pk, member.box_pk
        )
        await client.manage(
            owner.signing_key, owner.box_key, owner.collab_id, lambda v: _collab.add(v, member)
        )
    return created.token


@pytest.mark.objective("SO-5")
async def test_a_live_subscription_ends_when_its_session_expires(
    database_url: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(relay_config(database_url, tmp_path), session_ttl_seconds=3)
    async with running_relay(config) as r:
        owner = await sign_up(r.url)
        async with connect(r.url) as reader_client:
            # A fresh login (not sign_up's older token) so the session has its whole 3 s.
            await reader_client.login(owner.handle, PASSWORD)
            async with reader_client.subscribe(owner.collab_id) as frames:
                await caught_up(frames)
                await trio.sleep(3.5)  # the session runs out; the subscription stays open
                async with connect(r.url) as writer:
                    await writer.login(owner.handle, PASSWORD)
                    seq = await post(writer, owner, owner.collab_id, "after expiry")
                after = await frames_until_quiet(frames)
    assert seq not in events_of(after), "an expired session kept receiving events"
    ended = [f for f in after if isinstance(f, wire.SubscriptionEnded)]
    assert ended, "the subscriber was not told its subscription ended"
    assert "expired" in ended[0].reason


@pytest.mark.objective("SO-5")
async def test_reauthenticating_as_another_account_ends_the_first_accounts_subscriptions(
    relay: Relay,
) -> None:
    url = relay.url
    alice = await sign_up(url)
    mallory = await sign_up(url)
    async with session(url, alice) as client:
        async with client.subscribe(alice.collab_id) as frames:
            await caught_up(frames)
            # The same connection now speaks for mallory, who is no member of alice's collab.
            await client.authenticate(mallory.token)
            async with session(url, alice) as writer:
                seq = await post(writer, alice, alice.collab_id, "for alice's eyes")
            after = await frames_until_quiet(frames)
    assert seq not in events_of(after), "a subscription outlived the account that opened it"
    assert any(isinstance(f, wire.SubscriptionEnded) for f in after)


@pytest.mark.objective("SO-7")
async def test_revoking_an_agent_ends_its_subscriptions_even_on_a_connection_it_left(
    relay: Relay,
) -> None:
    """The agent subscribes, then moves its connection to another account (its operator's own,
    say), so the connection is no longer filed under the agent. Revoking the agent must still
    leave nothing of the agent's streaming anywhere."""
    owner = await sign_up(relay.url)
    elsewhere = await sign_up(relay.url)
    token = await add_agent(relay.url, owner, ("read",))
    async with connect(relay.url) as bot:
        agent_id = await bot.authenticate(token)
        async with bot.subscribe(owner.collab_id) as frames:
            await caught_up(frames)
            await bot.authenticate(elsewhere.token)
            async with session(relay.url, owner) as creator:
                await creator.revoke_agent(agent_id)
                seq = await post(creator, owner, owner.collab_id, "after the revocation")
            after = await frames_until_quiet(frames)
    assert seq not in events_of(after), "a revoked agent's subscription kept streaming"


@pytest.mark.objective("SO-5")
async def test_no_other_connection_can_unsubscribe_someone_elses_live_feed(relay: Relay) -> None:
    """`Unsubscribe` names only a collab, so it must end the subscriptions of the connection
    that sends it and no other. A stranger, a fellow member and the owner's own second
    connection each try to end the owner's live feed; it keeps being fed."""
    alice, bob, mallory = [await sign_up(relay.url) for _ in range(3)]
    async with session(relay.url, alice) as a:
        await add(a, alice, bob)
    cid = alice.collab_id
    async with session(relay.url, alice) as reader, reader.subscribe(cid) as frames:
        await caught_up(frames)
        for attacker in (mallory, bob, alice):
            async with session(relay.url, attacker) as other:
                with pytest.raises(RelayRefused) as refused:
                    await other.request(
                        lambda rid: wire.Unsubscribe(rid=rid, collab_id=cid), wire.Unsubscribed
                    )
                assert refused.value.code is wire.ErrorCode.NOT_FOUND, attacker.handle
        async with session(relay.url, alice) as writer:
            seq = await post(writer, alice, cid, "still live")
        after = await frames_until_quiet(frames)
    assert seq in events_of(after), "another connection's unsubscribe ended the live feed"
    assert not any(isinstance(f, wire.SubscriptionEnded) for f in after)
