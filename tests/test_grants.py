"""Who may spend a tool and who may manage, as an attacker would probe it (issue 13 items 1, 4).

Each test is the cheapest abuse of a real relay with the real client kit: an agent creating a
collab of its own (where it would be an owner), an agent's account seated as a person, a fresh
account spending the operator's credential, a member calling tools nobody granted them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from clientkit import RelayRefused, WrongAccountKind, _collab, connect
from model import wire
from model.ids import new_id
from model.membership import CAP_READ, Member, MemberKind, Role
from relay.broker import tools_from_config
from tests.broker_harness import CANARY, bao, broker_relay, elsewhere, upstream, upstream_server
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import grant, make_agent, session, sign_up
from tests.test_membership_relay import add

__all__ = ["bao", "broker_relay", "elsewhere", "upstream", "upstream_server"]  # fixtures

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay


@pytest.mark.objective("SO-5")
async def test_an_agent_cannot_create_a_collab_with_a_genesis_that_calls_it_human(
    relay: Relay,
) -> None:
    alice = await sign_up(relay.url, "alice")
    async with session(relay.url, alice) as a:
        bot = await make_agent(a, alice, (CAP_READ,))
    async with session(relay.url, bot) as b:
        # The client kit's own genesis names its signer a human owner: exactly the abuse.
        with pytest.raises(RelayRefused) as refused:
            await b.create_collab(bot.signing_key, bytes(bot.box_key.public_key))
    assert refused.value.code is wire.ErrorCode.UNAUTHORIZED
    assert "agents" in refused.value.message


@pytest.mark.objective("SO-5")
async def test_an_account_is_seated_only_as_its_own_kind(relay: Relay) -> None:
    alice, bob = await sign_up(relay.url, "alice"), await sign_up(relay.url, "bob")
    async with session(relay.url, alice) as a:
        bot = await make_agent(a, alice, (CAP_READ,), "the-bot")
        bot_info, bob_info = await a.lookup("the-bot"), await a.lookup("bob")
        assert (bot_info.kind, bob_info.kind) == (MemberKind.AGENT, MemberKind.HUMAN)
        # The client kit refuses before signing anything.
        with pytest.raises(WrongAccountKind, match="with --agent"):
            _collab.member_for(bot_info, Role.MEMBER, MemberKind.HUMAN)
        with pytest.raises(WrongAccountKind, match="without --agent"):
            _collab.member_for(bob_info, Role.MEMBER, MemberKind.AGENT, (CAP_READ,))
        # The relay refuses a client that signs it anyway: a bot seated as a person (who could
        # then add members and rotate keys), and a person seated as a bot.
        carol = await sign_up(relay.url, "carol")
        async with session(relay.url, carol) as c:
            own = await make_agent(c, carol, (CAP_READ,))
        seat = [
            (own.account_id, own.signing_key, own.box_key, MemberKind.HUMAN, Role.MANAGER),
            (bob.account_id, bob.signing_key, bob.box_key, MemberKind.AGENT, Role.MEMBER),
        ]
        for account_id, sign, box, kind, role in seat:
            caps = (CAP_READ,) if kind is MemberKind.AGENT else ()
            wrong = Member(
                account_id, role, kind, bytes(sign.verify_key), bytes(box.public_key), caps
            )
            with pytest.raises(RelayRefused) as refused:
                await a.manage(
                    alice.signing_key,
                    alice.box_key,
                    alice.collab_id,
                    lambda v, m=wrong: _collab.add(v, m),
                )
            assert refused.value.code is wire.ErrorCode.INVALID_EVENT
            assert "kind" in refused.value.message
        view = await a.read(alice.collab_id, alice.box_key)
        assert view.membership is not None
        assert set(view.membership.members) == {alice.account_id, bot.account_id}
        # Seated as what they are, both are fine.
        await a.manage(
            alice.signing_key,
            alice.box_key,
            alice.collab_id,
            lambda v: _collab.add(v, _collab.member_for(bob_info, Role.MEMBER, MemberKind.HUMAN)),
        )


@pytest.mark.objective("SO-5")
async def test_cozy_collab_add_refuses_to_seat_a_bot_as_a_person(
    relay: Relay, tmp_path: Path
) -> None:
    env = client_env(tmp_path / "alice")
    await cli_signup(relay.url, tmp_path / "alice", "alice")
    first = (await cozy("collab", "create", "one", env=env)).stdout.decode().strip()
    second = (await cozy("collab", "create", "two", env=env)).stdout.decode().strip()
    creds = str(tmp_path / "bot.cozy-agent")
    await cozy("agent", "create", first, "the-bot", "--out", creds, env=env)
    forgot = await cozy("collab", "add", second, "the-bot", env=env, check=False)
    assert forgot.returncode != 0
    assert "add it with --agent" in forgot.stderr.decode()
    members = (await cozy("collab", "members", second, env=env)).stdout.decode()
    assert "the-bot" not in members
    await cozy("collab", "add", second, "the-bot", "--agent", "--cap", "read", env=env)
    members = (await cozy("collab", "members", second, env=env)).stdout.decode()
    assert "the-bot\tmember\tagent" in members


@pytest.mark.objective("SO-9")
async def test_a_fresh_account_cannot_spend_an_operators_credential(
    broker_relay: Relay,
) -> None:
    mallory = await sign_up(broker_relay.url, "mallory")  # sign-up is open; she owns a collab
    async with session(broker_relay.url, mallory) as m:
        for tool in ("raw", "scoped"):
            with pytest.raises(RelayRefused) as ungranted:
                await m.call_tool(mallory.collab_id, tool, {"q": "x"})
            assert ungranted.value.code is wire.ErrorCode.UNAUTHORIZED
        # As the owner she may grant herself anything; a tool the operator keeps to another
        # collab stays out of reach all the same.
        await grant(m, mallory, mallory.account_id, "tool:scoped")
        with pytest.raises(RelayRefused) as scoped:
            await m.call_tool(mallory.collab_id, "scoped", {"q": "x"})
        assert scoped.value.code is wire.ErrorCode.UNAUTHORIZED
        assert "has not made the tool" in scoped.value.message
        with pytest.raises(RelayRefused) as outside:
            await m.call_tool(new_id("c"), "scoped", {"q": "x"})  # no member of it: no probe
        assert outside.value.code is wire.ErrorCode.UNAUTHORIZED
        assert "not a member" in outside.value.message


@pytest.mark.objective("SO-9")
async def test_people_need_a_grant_per_tool_and_a_revocation_holds_at_once(
    broker_relay: Relay,
) -> None:
    alice, bob, carol = [await sign_up(broker_relay.url, h) for h in ("alice", "bob", "carol")]
    async with session(broker_relay.url, alice) as a, session(broker_relay.url, bob) as b:
        await add(a, alice, bob)
        with pytest.raises(RelayRefused) as before:
            await b.call_tool(alice.collab_id, "raw", {"q": "x"})
        assert before.value.code is wire.ErrorCode.UNAUTHORIZED
        assert "cozy collab grant" in before.value.message
        with pytest.raises(RelayRefused) as owner:
            await a.call_tool(alice.collab_id, "raw", {"q": "x"})  # owners need a grant too
        assert owner.value.code is wire.ErrorCode.UNAUTHORIZED
        await grant(a, alice, bob.account_id, "tool:raw")
        result = await b.call_tool(alice.collab_id, "raw", {"q": "x"})  # the same connection
        assert result.status == 200
        assert CANARY not in result.body
        with pytest.raises(RelayRefused) as other:
            await b.call_tool(alice.collab_id, "b64", {"q": "x"})  # granted one tool, not all
        assert other.value.code is wire.ErrorCode.UNAUTHORIZED
        # Bob, a plain member, cannot grant himself more.
        with pytest.raises(RelayRefused) as self_grant:
            await grant(b, bob, bob.account_id, "tool:b64", collab_id=alice.collab_id)
        assert self_grant.value.code is wire.ErrorCode.UNAUTHORIZED
        await grant(a, alice, bob.account_id, "tool:raw", revoke=True)
        with pytest.raises(RelayRefused) as revoked:
            await b.call_tool(alice.collab_id, "raw", {"q": "x"})  # no stale cached grant
        assert revoked.value.code is wire.ErrorCode.UNAUTHORIZED
        # A tool the operator opened to every member needs no grant — from members only.
        assert (await b.call_tool(alice.collab_id, "open", {"q": "x"})).status == 200
    async with session(broker_relay.url, carol) as c:
        with pytest.raises(RelayRefused) as stranger:
            await c.call_tool(alice.collab_id, "open", {"q": "x"})
        assert stranger.value.code is wire.ErrorCode.UNAUTHORIZED


@pytest.mark.objective("SO-9")
async def test_an_agent_whose_read_is_revoked_stops_being_served(relay: Relay) -> None:
    alice = await sign_up(relay.url, "alice")
    async with session(relay.url, alice) as a:
        bot = await make_agent(a, alice, (CAP_READ,))
        async with connect(relay.url) as b:
            await b.authenticate(bot.token)
            async with b.subscribe(alice.collab_id, follow=True) as frames:
                with trio.fail_after(20):
                    async for frame in frames:
                        if isinstance(frame, wire.CaughtUp):
                            await grant(a, alice, bot.account_id, CAP_READ, revoke=True)
                        if isinstance(frame, wire.SubscriptionEnded):
                            assert "read capability" in frame.reason
                            break
                    else:
                        raise AssertionError("the feed stopped without a SubscriptionEnded")
            with pytest.raises(RelayRefused) as again:
                async with b.subscribe(alice.collab_id, follow=False) as frames:
                    async for _ in frames:
                        pass
            assert again.value.code is wire.ErrorCode.UNAUTHORIZED


@pytest.mark.objective("SO-9")
async def test_cozy_collab_grant_gives_and_takes_back_a_tool_grant(
    relay: Relay, tmp_path: Path
) -> None:
    env = {name: client_env(tmp_path / name) for name in ("alice", "bob")}
    for name in env:
        await cli_signup(relay.url, tmp_path / name, name)
    collab = (await cozy("collab", "create", "ops", env=env["alice"])).stdout.decode().strip()
    await cozy("collab", "add", collab, "bob", env=env["alice"])

    async def bobs_caps() -> str:
        out = (await cozy("collab", "members", collab, env=env["alice"])).stdout.decode()
        [line] = [row for row in out.splitlines() if row.startswith("bob\t")]
        return line.split("\t")[-1]

    granted = await cozy("collab", "grant", collab, "bob", "tool:raw", env=env["alice"])
    assert "bob has tool:raw" in granted.stdout.decode()
    assert await bobs_caps() == "tool:raw"
    # A plain member cannot grant themselves more; people are not granted read or post.
    himself = await cozy("collab", "grant", collab, "bob", "tool:b64", env=env["bob"], check=False)
    assert himself.returncode != 0
    assert "refused" in himself.stderr.decode()
    people = await cozy("collab", "grant", collab, "bob", "post", env=env["alice"], check=False)
    assert people.returncode != 0
    assert "by membership" in people.stderr.decode()
    await cozy("collab", "grant", collab, "bob", "tool:raw", "--revoke", env=env["alice"])
    assert await bobs_caps() == "-"


@pytest.mark.objective("SO-9")
def test_a_tool_is_declared_with_where_it_may_be_used_and_a_grantable_name() -> None:
    table = {"url": "https://api.example.com/v1/x", "secret_path": "p", "secret_field": "f"}
    with pytest.raises(ValueError, match=r"tools\.weather.*collabs"):
        tools_from_config({"weather": table})  # no scope: refused, not "everywhere"
    with pytest.raises(ValueError, match="collabs"):
        tools_from_config({"weather": table | {"collabs": ["not-a-collab"]}})
    with pytest.raises(ValueError, match="cannot be granted"):
        tools_from_config({"Weather.API": table | {"collabs": ["*"]}})
    scoped = new_id("c")
    [spec] = tools_from_config({"weather": table | {"collabs": [scoped]}}).values()
    assert (spec.collabs, spec.open_to_members) == ((scoped,), False)
