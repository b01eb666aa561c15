"""`clientkit.Session`: the one client session the CLI and the bot kit act through.

Real relay, real Postgres, real WebSockets on loopback. The ledger is the judge of what was
stored; the lying-relay proxy (`clientkit.testing.LyingRelay`) plays a relay rolled back behind
what a device verified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from clientkit import (
    ForkDetected,
    Identity,
    Keys,
    NotAMember,
    Session,
    _collab,
    connect,
)
from clientkit._home import Home
from clientkit._state import ClientState
from clientkit.testing import Lie, LyingRelay, Misbehaviour
from model import content as contentmod
from model.membership import Member, MemberKind, Role
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import session as connection
from tests.relay_harness import sign_up
from tests.test_append_retry import stored

if TYPE_CHECKING:
    from pathlib import Path

    from clientkit import Client
    from relay._server import Relay
    from tests.relay_harness import User

pytestmark = pytest.mark.usefixtures("database_url")


def as_session(client: Client, user: User, home: Path, device: str = "laptop") -> Session:
    """`user` as a session over `client`, with the device state in `home`."""
    return Session(
        client,
        Identity(user.account_id, user.handle, MemberKind.HUMAN),
        Keys(user.signing_key, user.box_key),
        ClientState(home / "state.db"),
        device=device,
    )


@pytest.fixture
async def pair(relay: Relay, tmp_path: Path) -> tuple[User, User]:
    """Alice's collab with Bob in it (each keeps device state in tmp_path / handle)."""
    alice, bob = await sign_up(relay.url, "alice"), await sign_up(relay.url, "bob")
    member = Member(
        bob.account_id,
        Role.MEMBER,
        MemberKind.HUMAN,
        bytes(bob.signing_key.verify_key),
        bytes(bob.box_key.public_key),
    )
    async with connection(relay.url, alice) as client:
        await as_session(client, alice, tmp_path / "alice").manage(
            alice.collab_id, lambda v: _collab.add(v, member)
        )
    return alice, bob


async def test_session_posts_with_evidence_and_dms_only_the_recipient_can_read(
    relay: Relay, database_url: str, pair: tuple[User, User], tmp_path: Path
) -> None:
    alice, bob = pair
    cid = alice.collab_id
    with trio.fail_after(60):
        async with connection(relay.url, alice) as client:
            me = as_session(client, alice, tmp_path / "alice")
            first = await me.post(cid, "hello")
            again = await me.post(cid, "hello")  # a person repeating a finished post means it
            secret = await me.dm(cid, bob.account_id, "just for bob")
            before = stored(database_url, cid)
            with pytest.raises(NotAMember):
                await me.dm(cid, "a-nobody", "to nobody")
            assert stored(database_url, cid) == before  # refused before anything was sent
        assert (first.earlier, again.earlier, secret.earlier) == (False, False, False)
        assert first.seq < again.seq < secret.seq
        async with connection(relay.url, bob) as client:
            them = as_session(client, bob, tmp_path / "bob")
            entries = {}
            async with them.history(cid) as events:
                async for entry in events:
                    entries[entry.seq] = entry
    posted = entries[first.seq]
    assert posted.author_id == alice.account_id
    assert posted.content == contentmod.Message("hello")
    assert entries[again.seq].content == contentmod.Message("hello")
    assert entries[secret.seq].dm_to == bob.account_id
    assert entries[secret.seq].content == contentmod.Message("just for bob")
    # Both posts are events of Alice's author stream "laptop", kept before sent (the DM is
    # kept in a stream of its own: it carries no evidence), and her reads saved the head.
    alice_state = ClientState(tmp_path / "alice" / "state.db")
    last = alice_state.last_sent(cid, "laptop")
    assert last is not None
    assert (last.counter, last.seq) == (2, again.seq)
    dm_kept = alice_state.last_sent(cid, "laptop-dm")  # DMs are kept before sent too
    assert dm_kept is not None
    assert dm_kept.seq == secret.seq
    head = alice_state.head(cid)
    assert head is not None
    assert head.seq >= again.seq


async def test_a_post_bounced_by_a_key_rotation_is_sealed_again_under_the_new_key(
    relay: Relay, database_url: str, pair: tuple[User, User], tmp_path: Path
) -> None:
    """The bot's path: sealed against a followed view that is behind a rotation, bounced as
    `stale`, read ahead and sealed again — stored once, under the new epoch, never the old."""
    alice, bob = pair
    cid = alice.collab_id
    with trio.fail_after(60):
        async with connection(relay.url, alice) as client:
            me = as_session(client, alice, tmp_path / "alice")
            head = (await me.read(cid)).head.seq
            async with me.history(cid, follow=True) as events:
                while events.view.head.seq < head:
                    await events.__anext__()
                old_epoch = events.view.current_key()[0]
                # Bob is removed on another connection while this one holds the old view.
                async with connection(relay.url, alice) as other:
                    await as_session(other, alice, tmp_path / "alice", "phone").manage(
                        cid, lambda v: _collab.remove(v, bob.account_id)
                    )
                before = len(stored(database_url, cid))
                sent = await me.post(cid, "after the removal", history=events)
        assert len(stored(database_url, cid)) == before + 1  # the bounced sealing is not kept
        async with connection(relay.url, alice) as client:
            fresh = as_session(client, alice, tmp_path / "alice")
            async with fresh.history(cid) as read:
                async for entry in read:
                    if entry.seq == sent.seq:
                        assert entry.content == contentmod.Message("after the removal")
                        assert entry.epoch == old_epoch + 1


@pytest.mark.objective("SO-4")
async def test_a_session_refuses_to_act_on_a_relay_rolled_back_behind_its_saved_head(
    relay: Relay, database_url: str, pair: tuple[User, User], tmp_path: Path
) -> None:
    """A device that verified seq N talks to a relay now serving less: every act of the
    session reads first, and the read is checked against the saved head — an alarm, and
    nothing is sealed or stored."""
    alice, bob = pair
    cid = alice.collab_id
    async with connection(relay.url, alice) as client:
        me = as_session(client, alice, tmp_path / "alice")
        await me.post(cid, "one")
        await me.post(cid, "two")
        head = (await me.read(cid)).head.seq
    before = stored(database_url, cid)
    rolled_back = Misbehaviour(Lie.TRUNCATE, head)
    with trio.fail_after(60):
        async with (
            LyingRelay(relay.url, plan=lambda _n: rolled_back).running() as url,
            connect(url) as client,
        ):
            await client.authenticate(alice.token)
            client.use_key(alice.signing_key)
            me = as_session(client, alice, tmp_path / "alice")
            for act in (
                lambda: me.post(cid, "posted to the past"),
                lambda: me.dm(cid, bob.account_id, "sent to the past"),
                lambda: me.manage(cid, _collab.rotate),
                lambda: me.attach(cid, "f.txt", 3, [b"abc"]),
                lambda: me.attachment(cid, "any-ref"),
            ):
                with pytest.raises(ForkDetected, match="rolled back"):
                    await act()
    assert stored(database_url, cid) == before


@pytest.mark.objective("SO-4")
async def test_cozy_commands_refuse_a_relay_rolled_back_behind_the_devices_saved_head(
    relay: Relay, database_url: str, tmp_path: Path
) -> None:
    """`cozy post`, `dm`, `attach`, `fetch` and `collab rotate` against a relay that now serves
    less than this device verified: each exits 3 with the integrity alarm, and nothing is
    posted. (Before the session's checked read, `post`, `dm`, `attach` and `fetch` read
    through a path that skipped the saved head and succeeded.)"""
    homes = {name: tmp_path / name for name in ("alice", "bob")}
    for name, home in homes.items():
        await cli_signup(relay.url, home, name)
    env = {name: client_env(home) for name, home in homes.items()}
    collab = (await cozy("collab", "create", "past", env=env["alice"])).stdout.decode().strip()
    await cozy("collab", "add", collab, "bob", env=env["alice"])
    note = tmp_path / "note.txt"
    note.write_bytes(b"a note")
    ref = (await cozy("attach", collab, str(note), env=env["alice"])).stdout.decode().strip()
    await cozy("post", collab, "the last thing alice saw", env=env["alice"])
    out = (await cozy("verify", collab, env=env["alice"])).stdout.decode()
    head = int(out.split("head ", 1)[1].split(":")[0])
    before = stored(database_url, collab)
    assert len(before) == head
    profile = Home(homes["alice"]).load_profile()
    honest_url = profile.relay_url
    rolled_back = Misbehaviour(Lie.TRUNCATE, head)  # serves seq 1..head-1, "caught up"
    async with LyingRelay(relay.url, plan=lambda _n: rolled_back).running() as url:
        profile.relay_url = url
        Home(homes["alice"]).save_profile(profile)
        for args in (
            ("post", collab, "posted to the past"),
            ("dm", collab, "bob", "sent to the past"),
            ("attach", collab, str(note)),
            ("fetch", collab, ref, str(tmp_path / "fetched.txt")),
            ("collab", "rotate", collab),
        ):
            lied = await cozy(*args, env=env["alice"], check=False)
            assert lied.returncode == 3, (args, lied.stdout, lied.stderr)
            assert b"INTEGRITY ALARM" in lied.stderr, (args, lied.stderr)
            assert b"rolled back" in lied.stderr, (args, lied.stderr)
            assert b"Traceback" not in lied.stderr
    assert stored(database_url, collab) == before  # nothing was posted
    assert not (tmp_path / "fetched.txt").exists()
    profile.relay_url = honest_url
    Home(homes["alice"]).save_profile(profile)
    out = (await cozy("verify", collab, env=env["alice"])).stdout.decode()
    assert out.split("head ", 1)[1].startswith(f"{head}:")
