"""The lying-relay harness end to end: a proxy in front of a real relay lies to real clients.

`clientkit.testing.LyingRelay` passes every request to the real relay and rewrites what one
client is shown; the real client kit (and the `cozy` CLI) must raise the matching alarm, and
must stay quiet when the proxy is honest.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from clientkit import (
    ForkDetected,
    IntegrityAlarm,
    ReceiptInvalid,
    ReorderDetected,
    ReplayDetected,
    TamperDetected,
    WithholdingDetected,
    _collab,
    connect,
)
from clientkit._home import Home
from clientkit.testing import Lie, LyingRelay, Misbehaviour
from model.membership import Member, MemberKind, Role
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import User, post, session, sign_up

if TYPE_CHECKING:
    from relay._server import Relay


async def team_history(relay: Relay) -> tuple[User, User, User, dict[str, list[int]]]:
    """Alice, Bob and Carol in Alice's collab, each posting in turn (every post built on all
    before it). Returns the seqs each of them posted at."""
    alice, bob, carol = [await sign_up(relay.url, h) for h in ("alice", "bob", "carol")]
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        for user in (bob, carol):
            info = await a.lookup(user.handle)
            new = Member(info.account_id, Role.MEMBER, MemberKind.HUMAN, info.sign_pk, info.box_pk)
            await a.manage(
                alice.signing_key, alice.box_key, cid, lambda v, m=new: _collab.add(v, m)
            )
    posted: dict[str, list[int]] = {"alice": [], "bob": [], "carol": []}
    for round_ in range(3):
        for user in (alice, bob, carol):
            async with session(relay.url, user) as client:
                posted[user.handle].append(await post(client, user, cid, f"{user.handle} {round_}"))
    return alice, bob, carol, posted


async def read_through(relay: Relay, reader: User, cid: str, m: Misbehaviour | None) -> None:
    async with LyingRelay(relay.url, plan=lambda _n: m).running() as url, connect(url) as client:
        await client.authenticate(reader.token)
        await client.read(cid, reader.box_key)


@pytest.mark.objective("SO-4")
async def test_each_lie_told_through_the_proxy_raises_its_alarm_in_the_real_client(
    relay: Relay,
) -> None:
    alice, bob, _carol, posted = await team_history(relay)
    cid = alice.collab_id
    await read_through(relay, bob, cid, None)  # the honest proxy: no alarm
    await read_through(relay, bob, cid, Misbehaviour(Lie.DELAY, 1))  # slow is not a lie
    cases: list[tuple[Misbehaviour, type[IntegrityAlarm]]] = [
        (Misbehaviour(Lie.GAP, posted["alice"][0]), WithholdingDetected),
        (Misbehaviour(Lie.DUPLICATE, posted["bob"][1]), ReorderDetected),
        (Misbehaviour(Lie.REPLAY, posted["carol"][0]), ReplayDetected),
        (Misbehaviour(Lie.TAMPER, posted["alice"][1]), TamperDetected),
        # Dropped and re-chained: the next post had seen it and now sits at its seq.
        (Misbehaviour(Lie.DROP, posted["alice"][1]), ForkDetected),
        # Swapped and re-chained: Bob's post had seen Alice's, so it cannot come first.
        (Misbehaviour(Lie.SWAP, posted["alice"][2]), ForkDetected),
    ]
    for misbehaviour, alarm in cases:
        with pytest.raises(alarm):
            await read_through(relay, bob, cid, misbehaviour)


@pytest.mark.objective("SO-4")
async def test_a_gap_is_backfilled_and_a_gap_the_relay_will_not_fill_is_an_alarm(
    relay: Relay,
) -> None:
    alice, bob, _carol, posted = await team_history(relay)
    cid = alice.collab_id
    missing = posted["bob"][0]
    # Skipped once, then served when the client asks again: the reader gets everything.
    once = Misbehaviour(Lie.GAP, missing, only_first=True)
    async with LyingRelay(relay.url, plan=lambda _n: once).running() as url, connect(url) as client:
        await client.authenticate(bob.token)
        view = await client.read(cid, bob.box_key)
    assert view.head.seq == posted["carol"][-1]
    # Skipped every time: the alarm names the seq the relay will not fill.
    always = Misbehaviour(Lie.GAP, missing)
    with pytest.raises(WithholdingDetected, match="would not fill"):
        await read_through(relay, bob, cid, always)


@pytest.mark.objective("SO-4")
async def test_a_forged_receipt_is_caught_when_posting(relay: Relay) -> None:
    alice = await sign_up(relay.url, "alice")
    forge = Misbehaviour(Lie.FORGE_RECEIPT, 1)
    async with (
        LyingRelay(relay.url, plan=lambda _n: forge).running() as url,
        connect(url) as client,
    ):
        await client.authenticate(alice.token)
        with pytest.raises(ReceiptInvalid):
            await post(client, alice, alice.collab_id, "acked at a seq it never got")


@pytest.mark.objective("SO-4")
async def test_cozy_verify_prints_the_head_and_names_a_fork_or_a_withheld_tail(
    relay: Relay, tmp_path: Path
) -> None:
    homes = {name: tmp_path / name for name in ("alice", "bob")}
    for name, home in homes.items():
        await cli_signup(relay.url, home, name)
    env = {name: client_env(home) for name, home in homes.items()}
    collab = (await cozy("collab", "create", "audit", env=env["alice"])).stdout.decode().strip()
    await cozy("collab", "add", collab, "bob", env=env["alice"])
    for n in range(3):
        await cozy("post", collab, f"alice {n}", env=env["alice"])
        await cozy("post", collab, f"bob {n}", env=env["bob"])
    heads = {}
    for name in homes:
        out = (await cozy("verify", collab, env=env[name])).stdout.decode()
        heads[name] = out.split("head ", 1)[1].split()[0]
    assert heads["alice"] == heads["bob"]  # read aloud, compared: the same history
    ok = await cozy("verify", collab, "--against", heads["alice"], env=env["bob"])
    assert b"matches" in ok.stdout
    # Bob's relay now drops Alice's first post and re-chains the rest, for Bob only.
    profile = Home(homes["bob"]).load_profile()
    first_post = int(heads["alice"].split(":")[0]) - 5
    cases = (
        (Lie.DROP, b"moved it earlier or removed events"),
        (Lie.TRUNCATE, b"rolled back"),  # Bob's own saved head is beyond the cut
        (Lie.TRUNCATE, b"withholding events from one of you"),  # a fresh device: Alice's head
    )
    for n, (lie, words) in enumerate(cases):
        if n == 2:
            for leftover in homes["bob"].glob("state.db*"):
                leftover.unlink()
        told = Misbehaviour(lie, first_post)
        async with LyingRelay(relay.url, plan=lambda _n, m=told: m).running() as url:
            profile.relay_url = url
            Home(homes["bob"]).save_profile(profile)
            # Against Alice's head, so the check does not rest on Bob's own saved head alone.
            lied = await cozy(
                "verify", collab, "--against", heads["alice"], env=env["bob"], check=False
            )
        assert lied.returncode == 3, lied.stderr
        assert b"INTEGRITY ALARM" in lied.stderr
        assert words in lied.stderr, lied.stderr


# --- withheld links (issue 16, item 5) --------------------------------------------------------


async def three_in_a_collab(relay: Relay, tmp_path: Path) -> tuple[dict[str, dict[str, str]], str]:
    """Alice's collab with Bob and Carol, through the CLI; returns each one's env and the id."""
    homes = {name: tmp_path / name for name in ("alice", "bob", "carol")}
    for name, home in homes.items():
        await cli_signup(relay.url, home, name)
    env = {name: client_env(home) for name, home in homes.items()}
    collab = (await cozy("collab", "create", "audit", env=env["alice"])).stdout.decode().strip()
    for name in ("bob", "carol"):
        await cozy("collab", "add", collab, name, env=env["alice"])
    return env, collab


def relay_through(env: dict[str, str], url: str) -> None:
    home = Home(Path(env["COZY_HOME"]))
    profile = home.load_profile()
    profile.relay_url = url
    home.save_profile(profile)


@pytest.mark.objective("SO-4")
async def test_an_invented_withheld_link_after_the_head_is_an_alarm_and_never_the_saved_head(
    relay: Relay, tmp_path: Path
) -> None:
    env, collab = await three_in_a_collab(relay, tmp_path)
    await cozy("post", collab, "carol writes", env=env["carol"])
    await cozy("post", collab, "alice writes", env=env["alice"])
    carol_seq = int((await cozy("verify", collab, env=env["bob"])).stdout.split(b"head ")[1]
                    .split(b":")[0]) - 1  # fmt: skip
    # Bob's relay appends a "DM from Alice to Carol" after the real head, chained correctly.
    invent = Misbehaviour(Lie.INVENT_WITHHELD, carol_seq)
    async with LyingRelay(relay.url, plan=lambda _n: invent).running() as url:
        relay_through(env["bob"], url)
        lied = await cozy("verify", collab, env=env["bob"], check=False)
    assert lied.returncode == 3, lied.stderr
    assert b"INTEGRITY ALARM" in lied.stderr
    assert b"not a direct message its author signed" in lied.stderr, lied.stderr
    # The link was never saved as Bob's verified head: the honest relay reads clean (before,
    # the invented head was saved, and every honest read after it said "rolled back").
    relay_through(env["bob"], relay.url)
    honest = await cozy("verify", collab, env=env["bob"], check=False)
    assert honest.returncode == 0, honest.stderr
    assert f"head {carol_seq + 1}:".encode() in honest.stdout


@pytest.mark.objective("SO-4")
async def test_a_real_event_relabelled_as_withheld_is_an_alarm(relay: Relay) -> None:
    alice, bob, _carol, posted = await team_history(relay)
    cid = alice.collab_id
    # Carol's post shown to Bob as "a DM from Carol to Alice", and Alice's as one to Bob: the
    # real ids (the chain holds) and the authors' real signatures, over the wrong bytes.
    for hidden in (posted["carol"][1], posted["alice"][2]):
        with pytest.raises(TamperDetected, match="not a direct message its author signed"):
            await read_through(relay, bob, cid, Misbehaviour(Lie.RELABEL_WITHHELD, hidden))
    await read_through(relay, bob, cid, None)


@pytest.mark.objective("SO-4")
async def test_a_dm_withheld_from_a_third_member_verifies_and_their_chain_goes_on(
    relay: Relay, tmp_path: Path
) -> None:
    env, collab = await three_in_a_collab(relay, tmp_path)
    sent = await cozy("dm", collab, "bob", "for bob only", env=env["alice"])
    dm_seq = int(sent.stdout.split(b" as seq ")[1])
    await cozy("post", collab, "bob after the dm", env=env["bob"])
    await cozy("post", collab, "carol after the dm", env=env["carol"])
    tail = (await cozy("tail", collab, env=env["carol"])).stdout.decode().splitlines()
    at_dm = next(line for line in tail if line.startswith(f"{dm_seq}\t"))
    # Carol sees who wrote to whom (what the signed link proves), never the text.
    assert at_dm.split("\t")[1] == "alice"
    assert "withheld" in at_dm
    assert "for bob only" not in "\n".join(tail)
    assert tail[-1].endswith("carol after the dm")
    heads = {
        name: (await cozy("verify", collab, env=env[name])).stdout.split(b"head ")[1].split()[0]
        for name in ("alice", "bob", "carol")
    }
    assert len(set(heads.values())) == 1, heads  # one history, the DM's link in it for Carol
    bob_tail = (await cozy("tail", collab, env=env["bob"])).stdout.decode()
    assert "for bob only" in bob_tail
