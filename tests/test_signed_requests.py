"""A key signature on every change (SO-5): with a login password and no keys, nothing changes.

The attacker here cracked (or phished) the victim's login password: a real session on a real
relay, but none of the keys in the victim's sealed keystore. Creating or revoking agents, calling
tools, uploading artifact pieces, changing the password and ending sessions all carry a
signature by the account's own key over the request and the connection's challenge
(model/proofs.py), checked at the authorization point before any handler runs. Each refusal is
checked against the database too: "refused" must mean "nothing changed".
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import msgspec
import nacl.public
import nacl.signing
import psycopg
import pytest
import trio

from clientkit import Client, RelayRefused, connect
from model import artifacts, proofs, wire
from model._crypto import random_bytes
from model.ids import new_id
from tests.broker_harness import bao, broker_relay, elsewhere, upstream, upstream_server
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import PASSWORD, User, grant, session, sign_up

__all__ = ["bao", "broker_relay", "elsewhere", "upstream", "upstream_server"]  # fixtures

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from relay._server import Relay
    from tests.broker_harness import Recorder

NEW_PASSWORD = "a brand new login password"


async def refused(attempt: Awaitable[object]) -> RelayRefused:
    with pytest.raises(RelayRefused) as err:
        await attempt
    return err.value


def forged_by(client: Client, key: nacl.signing.SigningKey | None) -> Client:
    """The attacker's client: signs with a key of its own choosing, or sends no signature."""
    if key is not None:
        client.use_key(key)
    return client


def db_rows(database_url: str, query: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, args).fetchall()  # type: ignore[arg-type]


def agent_keys() -> tuple[str, bytes, bytes]:
    sign, box = nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()
    return new_id("a"), bytes(sign.verify_key), bytes(box.public_key)


def sealed_pieces(user: User) -> list[bytes]:
    return list(artifacts.seal_stream(random_bytes(32), user.collab_id, [b"attack" * 1000]))


def assert_bad_signature(err: RelayRefused) -> None:
    assert err.code is wire.ErrorCode.BAD_SIGNATURE
    assert "account key" in err.message
    assert "Nothing was changed" in err.message


@pytest.mark.objective("SO-5")
@pytest.mark.parametrize("forged_with", ["no signature", "another key"])
async def test_a_password_only_session_cannot_create_or_revoke_agents_or_upload(
    relay: Relay, database_url: str, forged_with: str
) -> None:
    victim = await sign_up(relay.url, "victim")
    bot_id, bot_sign_pk, bot_box_pk = agent_keys()
    async with session(relay.url, victim) as owner:
        bot = await owner.create_agent(bot_id, "victim-bot", bot_sign_pk, bot_box_pk)
    key = nacl.signing.SigningKey.generate() if forged_with == "another key" else None
    with trio.fail_after(60):
        async with connect(relay.url) as client:
            await client.login("victim", PASSWORD)
            attacker = forged_by(client, key)
            evil_id, evil_sign_pk, evil_box_pk = agent_keys()
            for attempt in (
                attacker.create_agent(evil_id, "evil-bot", evil_sign_pk, evil_box_pk),
                attacker.revoke_agent(bot_id),
                attacker.upload_artifact(victim.collab_id, sealed_pieces(victim)),
            ):
                assert_bad_signature(await refused(attempt))
            # Reads still work: the session is metadata-visible, as documented.
            assert [a.handle for a in await attacker.list_agents()] == ["victim-bot"]
    # Nothing changed: no new agent, the victim's bot unrevoked, no stored piece.
    assert db_rows(
        database_url, "SELECT handle, token_generation FROM accounts WHERE kind = 'agent'"
    ) == [("victim-bot", 0)]
    assert db_rows(database_url, "SELECT count(*) FROM artifact_pieces") == [(0,)]
    async with connect(relay.url) as still:
        assert await still.authenticate(bot.token) == bot_id


@pytest.mark.objective("SO-5")
@pytest.mark.objective("SO-9")
async def test_a_password_only_session_cannot_call_a_tool(
    broker_relay: Relay, upstream_server: Recorder
) -> None:
    victim = await sign_up(broker_relay.url, "victim")
    async with session(broker_relay.url, victim) as owner:  # tools need a grant, people's too
        await grant(owner, victim, victim.account_id, "tool:raw")
    with trio.fail_after(60):
        async with connect(broker_relay.url) as attacker:
            await attacker.login("victim", PASSWORD)
            assert_bad_signature(
                await refused(attacker.call_tool(victim.collab_id, "raw", {"q": "x"}))
            )
            attacker.use_key(nacl.signing.SigningKey.generate())
            assert_bad_signature(
                await refused(attacker.call_tool(victim.collab_id, "raw", {"q": "x"}))
            )
        assert upstream_server.paths == []  # the operator's credential was never spent
        # The owner's own client signs with the account key: the same call goes through.
        async with session(broker_relay.url, victim) as owner:
            result = await owner.call_tool(victim.collab_id, "raw", {"q": "x"})
            assert result.status == 200
        assert upstream_server.paths == ["/raw"]


@pytest.mark.objective("SO-5")
@pytest.mark.parametrize("forged_with", ["no signature", "another key"])
async def test_a_password_only_session_cannot_change_the_password_or_end_sessions(
    relay: Relay, database_url: str, forged_with: str
) -> None:
    victim = await sign_up(relay.url, "victim")
    (hash_before,) = db_rows(
        database_url, "SELECT password_hash FROM accounts WHERE handle = 'victim'"
    )
    key = nacl.signing.SigningKey.generate() if forged_with == "another key" else None
    with trio.fail_after(60):
        async with session(relay.url, victim) as owner, connect(relay.url) as client:
            await client.login("victim", PASSWORD)
            attacker = forged_by(client, key)
            assert_bad_signature(await refused(attacker.change_password("the attacker's now!")))
            assert_bad_signature(await refused(attacker.end_sessions()))
            # The owner's connection keeps its session; so does the attacker's (nothing ended).
            await owner.request(
                lambda rid: wire.GetAccount(rid=rid, handle="victim"), wire.AccountInfo
            )
            await attacker.request(lambda rid: wire.ListAgents(rid=rid), wire.Agents)
    assert db_rows(
        database_url,
        "SELECT password_hash, session_generation FROM accounts WHERE handle = 'victim'",
    ) == [(hash_before[0], 0)]
    async with connect(relay.url) as again:
        await again.login("victim", PASSWORD)  # the password is still the victim's
        assert await again.authenticate(victim.token) == victim.account_id  # tokens still live


@pytest.mark.objective("SO-5")
async def test_a_signature_made_on_another_connection_is_refused(
    relay: Relay, database_url: str
) -> None:
    """A request the owner's client signed on one connection (its challenge) does not verify on
    another: a captured or leaked signed request cannot be replayed by a session thief."""
    owner = await sign_up(relay.url, "owner")
    bot_id, bot_sign_pk, bot_box_pk = agent_keys()
    with trio.fail_after(60):
        async with session(relay.url, owner) as first, session(relay.url, owner) as second:
            assert first.challenge != second.challenge
            assert len(first.challenge) == proofs.CHALLENGE_BYTES

            def signed_on_first(
                build: Callable[[int], wire.Request],
            ) -> Callable[[int], wire.Request]:
                return first.signed(build)  # signs first's challenge, whatever the rid

            create = signed_on_first(
                lambda rid: wire.CreateAgent(
                    rid=rid, account_id=bot_id, handle="replayed-bot", sign_pk=bot_sign_pk,
                    box_pk=bot_box_pk,
                )
            )  # fmt: skip
            assert_bad_signature(await refused(second.request(create, wire.AgentCreated)))
            piece = signed_on_first(
                lambda rid: wire.PutArtifactChunk(
                    rid=rid, collab_id=owner.collab_id, upload="u" * 20, index=0, data=b"x"
                )
            )
            assert_bad_signature(await refused(second.request(piece, wire.ArtifactChunkStored)))
            end = signed_on_first(lambda rid: wire.EndSessions(rid=rid))
            assert_bad_signature(await refused(second.request(end, wire.SessionsEnded)))
            # A signed request altered after signing (another agent id) does not verify either.
            tampered = first.signed(lambda rid: wire.RevokeAgent(rid=rid, account_id=bot_id))
            assert_bad_signature(
                await refused(
                    first.request(
                        lambda rid: msgspec.structs.replace(tampered(rid), account_id=new_id("a")),
                        wire.AgentRevoked,
                    )
                )
            )
            # The same request signed on its own connection is accepted.
            await second.request(second.signed(create), wire.AgentCreated)
    assert db_rows(database_url, "SELECT handle FROM accounts WHERE kind = 'agent'") == [
        ("replayed-bot",)
    ]
    assert db_rows(database_url, "SELECT count(*) FROM artifact_pieces") == [(0,)]


@pytest.mark.objective("SO-5")
async def test_the_owner_with_keys_creates_lists_revokes_uploads_and_changes_the_password(
    relay: Relay, database_url: str
) -> None:
    owner = await sign_up(relay.url, "owner")
    bot_id, bot_sign_pk, bot_box_pk = agent_keys()
    with trio.fail_after(60):
        async with session(relay.url, owner) as client, session(relay.url, owner) as other:
            await client.create_agent(bot_id, "owned-bot", bot_sign_pk, bot_box_pk)
            await client.revoke_agent(bot_id)
            (listed,) = await client.list_agents()
            assert (listed.account_id, listed.handle, listed.revoked) == (bot_id, "owned-bot", True)
            stored = await client.upload_artifact(owner.collab_id, sealed_pieces(owner))
            assert stored.size > 0
            changed = await client.change_password(NEW_PASSWORD)
            # This connection goes on; the other one lost its session at once.
            await client.list_agents()
            lost = await refused(other.list_agents())
            assert lost.code is wire.ErrorCode.UNAUTHENTICATED
            assert "log in again" in lost.message
    async with connect(relay.url) as fresh:
        old = await refused(fresh.login("owner", PASSWORD))
        assert old.code is wire.ErrorCode.INVALID_CREDENTIALS
        await fresh.login("owner", NEW_PASSWORD)
    async with connect(relay.url) as stale:
        ended = await refused(stale.authenticate(owner.token))  # issued before the change
        assert ended.code is wire.ErrorCode.UNAUTHENTICATED
        assert await stale.authenticate(changed.token) == owner.account_id
    assert db_rows(
        database_url, "SELECT session_generation FROM accounts WHERE handle = 'owner'"
    ) == [(1,)]


def profile_token(home: Path) -> str:
    token = json.loads((home / "profile.json").read_text())["token"]
    assert isinstance(token, str)
    return token


@pytest.mark.objective("SO-5")
async def test_cli_lists_and_revokes_agents_changes_the_password_and_ends_every_session(
    relay: Relay, tmp_path: Path
) -> None:
    home = tmp_path / "alice"
    env = client_env(home)
    await cli_signup(relay.url, home, "alice")
    collab = (await cozy("collab", "create", "ops", env=env)).stdout.decode().strip()
    for name in ("first-bot", "second-bot"):
        await cozy("agent", "create", collab, name, "--out", str(tmp_path / name), env=env)
    listed = (await cozy("account", "agents", env=env)).stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in listed] == ["first-bot", "second-bot"]
    assert all(line.endswith("active") for line in listed)
    second_id = listed[1].split("\t")[1]
    # Revoke by name (and remove from the collab), and by id; an unknown name is refused.
    await cozy("agent", "revoke", "first-bot", "--collab", collab, env=env)
    revoked = await cozy("agent", "revoke", second_id, env=env)
    assert b"every token revoked" in revoked.stdout
    unknown = await cozy("agent", "revoke", "no-such-bot", env=env, check=False)
    assert unknown.returncode == 1
    assert b"cozy account agents" in unknown.stderr
    listed = (await cozy("account", "agents", env=env)).stdout.decode().splitlines()
    assert all(line.endswith("revoked") for line in listed)
    members = (await cozy("collab", "members", collab, env=env)).stdout.decode()
    assert "first-bot" not in members

    # A new login password: the old one stops working, the new one works.
    old_token = profile_token(home)
    await cozy("account", "password", env=client_env(home, COZY_NEW_PASSWORD=NEW_PASSWORD))
    new_env = client_env(home, COZY_PASSWORD=NEW_PASSWORD)
    async with connect(relay.url) as probe:
        assert (await refused(probe.login("alice", "a long login password"))).code is (
            wire.ErrorCode.INVALID_CREDENTIALS
        )
        await probe.login("alice", NEW_PASSWORD)
        assert (await refused(probe.authenticate(old_token))).code is wire.ErrorCode.UNAUTHENTICATED
    await cozy("post", collab, "still me", env=new_env)  # the device's new token works

    # End every session: an open connection (a `tail --follow` elsewhere, say) loses its session
    # and subscription at once, and the token it used never authenticates again.
    token = profile_token(home)
    with trio.fail_after(60):
        async with connect(relay.url) as device:
            await device.authenticate(token)
            async with device.subscribe(collab) as frames:
                ended = await cozy("account", "sessions", "--end-all", env=new_env)
                assert b"every session of your account was ended" in ended.stdout
                async for frame in frames:
                    if isinstance(frame, wire.SubscriptionEnded):
                        break
                else:
                    raise AssertionError("the feed stopped without a SubscriptionEnded")
            lost = await refused(device.list_agents())
            assert lost.code is wire.ErrorCode.UNAUTHENTICATED
        async with connect(relay.url) as again:
            assert (await refused(again.authenticate(token))).code is (
                wire.ErrorCode.UNAUTHENTICATED
            )
    assert json.loads((home / "profile.json").read_text())["token"] is None
    # Without a password to log in again (and no live token), the CLI says what happened.
    stuck = await cozy("post", collab, "x", env=client_env(home, password=False), check=False)
    assert stuck.returncode == 1
    await cozy("post", collab, "logged in again", env=new_env)


@pytest.mark.objective("SO-5")
def test_request_signatures_bind_the_challenge_the_account_the_type_and_every_field() -> None:
    key = nacl.signing.SigningKey.generate()
    pk = bytes(key.verify_key)
    challenge, account = random_bytes(32), new_id("a")
    call = wire.CallTool(rid=7, collab_id=new_id("c"), tool="raw", args={"q": "x"})
    good = msgspec.structs.replace(call, sig=proofs.sign_request(key, challenge, account, call))
    assert proofs.verify_request(pk, challenge, account, good)
    assert not proofs.verify_request(pk, random_bytes(32), account, good)
    assert not proofs.verify_request(pk, challenge, new_id("a"), good)
    assert not proofs.verify_request(pk, b"", account, good)  # a relay that sent no challenge
    for change in ({"rid": 8}, {"tool": "raw2"}, {"args": {"q": "y"}}, {"args": {}}):
        assert not proofs.verify_request(
            pk, challenge, account, msgspec.structs.replace(good, **change)
        )
    # Another request type with the same fields' values does not take the signature.
    revoke = wire.RevokeAgent(rid=7, account_id=account)
    sig = proofs.sign_request(key, challenge, account, revoke)
    assert not proofs.verify_request(pk, challenge, account, wire.EndSessions(rid=7, sig=sig))
    # Fields at their defaults are left out of the signed form, so a field added later with a
    # default does not change what older clients sign.
    piece = wire.PutArtifactChunk(rid=1, collab_id="c", upload="u" * 16, index=0, data=b"d")
    assert proofs.request_signing_bytes(challenge, account, piece) == (
        proofs.request_signing_bytes(
            challenge, account, msgspec.structs.replace(piece, final=False, ref="", sig=b"x")
        )
    )
    with pytest.raises(TypeError):
        proofs.request_signing_bytes(challenge, account, wire.Ping(rid=1))
