"""Signed checkpoints end to end (ADR-0020, issue 16 items 1 and 2): a real relay signs its
collabs' tree heads on every commit group, on `caught_up` and as a heartbeat; the real client
kit checks each one against what the device holds. Lies come from `clientkit.testing.LyingRelay`
holding the relay's own key, as a compromised relay would."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import nacl.signing
import pytest
import trio

from clientkit import EquivocationDetected, ForkDetected, ReceiptInvalid, connect
from clientkit._checkpoints import CheckpointBook
from clientkit._home import Home
from clientkit._state import ClientState
from clientkit.testing import Lie, LyingRelay, Misbehaviour
from model import checkpoints, wire
from model.checkpoints import CheckpointSigner, open_head
from model.merkle import LeafTree, leaf_hash, verify_consistency
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import User, post, relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay


def device(tmp_path: Path) -> CheckpointBook:
    """What one device keeps across its connections (the CLI's state.db)."""
    return CheckpointBook(ClientState(tmp_path / "device" / "state.db"))


async def post_as(url: str, user: User, book: CheckpointBook, text: str) -> int:
    async with session(url, user) as client:
        client.checkpoints = book
        return await post(client, user, user.collab_id, text)


async def read_as(url: str, user: User, book: CheckpointBook) -> int:
    async with session(url, user) as client:
        client.checkpoints = book
        view = await client.read(user.collab_id, user.box_key)
        return view.head.seq


async def test_honest_posts_reads_and_restarts_keep_one_consistent_signed_tree(
    database_url: str, tmp_path: Path
) -> None:
    config = relay_config(database_url, tmp_path / "relay")
    book = device(tmp_path)
    async with running_relay(config) as relay:
        pk = relay.relay_pk
        alice = await sign_up(relay.url, "alice")
        cid = alice.collab_id
        seqs = [await post_as(relay.url, alice, book, f"hello {i}") for i in range(3)]
        top = book.top(pk, cid)
        # Every ack carried a checkpoint its event is included under; the largest is kept.
        assert top is not None
        assert top.size == seqs[-1]
        assert top.origin == f"{config.relay_name}/collab/{cid}"
        head = await read_as(relay.url, alice, book)
        held = book.held(pk, cid)
        assert held is not None
        assert (held.size, held.root) == (head, top.root)
        first = held
    # A restarted relay rebuilds the tree from the ledger: the same root for the same size,
    # and the next heads extend it (the client checks the consistency proof from its size).
    async with running_relay(config) as relay:
        assert await read_as(relay.url, alice, book) == head
        again = book.held(pk, cid)
        assert again is not None
        assert (again.size, again.root) == (first.size, first.root)
        await post_as(relay.url, alice, book, "after the restart")
        later = await read_as(relay.url, alice, book)
        held = book.held(pk, cid)
        assert held is not None
        assert held.size == later > first.size


async def test_an_open_subscription_gets_a_signed_heartbeat_consistent_with_the_last(
    database_url: str, tmp_path: Path
) -> None:
    config = relay_config(database_url, tmp_path / "relay", checkpoint_interval_ms=100)
    async with running_relay(config) as relay:
        alice = await sign_up(relay.url, "alice")
        cid = alice.collab_id
        beats: list[wire.TreeHead] = []
        async with session(relay.url, alice) as client:
            async with client.subscribe(cid) as frames:
                with trio.fail_after(30):
                    async for frame in frames:
                        if isinstance(frame, wire.TreeHead):
                            beats.append(frame)
                            if len(beats) == 1:
                                await post_as(relay.url, alice, CheckpointBook(), "in between")
                            elif (
                                beats[-1].proof_from
                                < open_head(frame.checkpoint, relay.relay_pk, cid).size
                            ):
                                break
        heads = [open_head(b.checkpoint, relay.relay_pk, cid) for b in beats]
        last = heads[-1]
        previous = next(h for h in heads if h.size == beats[-1].proof_from)
        verify_consistency(
            previous.size, last.size, previous.root, last.root, beats[-1].consistency
        )
        assert last.size > heads[0].size


@pytest.mark.objective("SO-4")
async def test_a_signed_head_behind_the_devices_own_receipt_is_provable_equivocation(
    relay: Relay, tmp_path: Path
) -> None:
    alice = await sign_up(relay.url, "alice")
    book = device(tmp_path)
    for i in range(3):
        await post_as(relay.url, alice, book, f"post {i}")  # the device keeps the acks' heads
    signer = CheckpointSigner(relay.config.relay_name, bytes(relay.relay_key))
    behind = Misbehaviour(Lie.BEHIND, 3)  # "caught up at 2", signed, after a receipt for 4
    lying = LyingRelay(relay.url, plan=lambda _n: behind, signer=signer)
    async with lying.running() as url, connect(url) as client:
        client.checkpoints = book
        await client.authenticate(alice.token)
        with pytest.raises(EquivocationDetected) as caught:
            await client.read(alice.collab_id, alice.box_key)
    proof = caught.value.proof
    assert isinstance(proof, checkpoints.CheckpointProof)
    # Anyone holding the file and the relay key can check it; a pair that agrees is refused.
    evidence = tmp_path / "evidence.json"
    evidence.write_bytes(checkpoints.encode(proof))
    env = client_env(tmp_path / "anyone")
    out = await cozy("evidence", "check", str(evidence), env=env)
    assert out.stdout.decode().startswith("valid proof: the relay signed contradicting checkpoints")
    assert len(out.stdout.decode().splitlines()) == 1
    honest = msgspec.structs.replace(proof, second=proof.first)
    evidence.write_bytes(checkpoints.encode(honest))
    refused = await cozy("evidence", "check", str(evidence), env=env, check=False)
    assert refused.returncode != 0
    assert b"do not contradict" in refused.stderr


@pytest.mark.objective("SO-4")
async def test_a_signed_head_that_does_not_extend_the_verified_one_is_a_fork(
    relay: Relay, tmp_path: Path
) -> None:
    alice = await sign_up(relay.url, "alice")
    book = device(tmp_path)
    await post_as(relay.url, alice, book, "first")
    await read_as(relay.url, alice, book)  # the device verified this head
    verified = book.held(relay.relay_pk, alice.collab_id)
    assert verified is not None
    await post_as(relay.url, alice, device(tmp_path / "other"), "second")  # another device
    signer = CheckpointSigner(relay.config.relay_name, bytes(relay.relay_key))
    fork = Misbehaviour(Lie.FORK_HEAD, 1)
    lying = LyingRelay(relay.url, plan=lambda _n: fork, signer=signer)
    async with lying.running() as url, connect(url) as client:
        client.checkpoints = book
        await client.authenticate(alice.token)
        # The fold's own tree shows it first: the forked root is not the history it was sent.
        with pytest.raises(ForkDetected, match="not the history it sent"):
            await client.read(alice.collab_id, alice.box_key)
    assert book.held(relay.relay_pk, alice.collab_id) == verified  # the fork was not kept


@pytest.mark.objective("SO-4")
def test_a_head_ahead_of_the_fold_must_extend_the_held_one() -> None:
    """A head larger than what arrived (a `caught_up` before its backfill) is checked against
    the held head by its consistency proof before its events come: a forked one is refused."""
    seed = bytes(range(32))
    relay_pk = bytes(nacl.signing.SigningKey(seed).verify_key)
    signer, cid = CheckpointSigner("relay.test", seed), "c_fork"
    honest = LeafTree(leaf_hash(bytes([i]) * 32) for i in range(4))
    forked = LeafTree(leaf_hash(bytes([i if i else 9]) * 32) for i in range(4))
    book = CheckpointBook()
    book.check_head(relay_pk, cid, signer.sign(cid, 2, honest.root(2), 100), 0, [])
    with pytest.raises(ForkDetected, match="does not extend"):
        note = signer.sign(cid, 4, forked.root(4), 101)
        book.check_head(relay_pk, cid, note, 2, list(forked.consistency_proof(2, 4)))
    assert book.held(relay_pk, cid) is not None
    assert book.held(relay_pk, cid).size == 2
    note = signer.sign(cid, 4, honest.root(4), 102)
    assert book.check_head(relay_pk, cid, note, 2, list(honest.consistency_proof(2, 4))).size == 4


@pytest.mark.objective("SO-4")
async def test_an_ack_whose_inclusion_proof_was_tampered_with_is_refused(
    relay: Relay, tmp_path: Path
) -> None:
    alice = await sign_up(relay.url, "alice")
    tamper = Misbehaviour(Lie.TAMPER_INCLUSION, 1)
    async with (
        LyingRelay(relay.url, plan=lambda _n: tamper).running() as url,
        connect(url) as client,
    ):
        client.checkpoints = device(tmp_path)
        await client.authenticate(alice.token)
        client.use_key(alice.signing_key)
        with pytest.raises(ReceiptInvalid, match="checkpoint"):
            await post(client, alice, alice.collab_id, "stored, but the proof is bent")


@pytest.mark.objective("SO-4")
async def test_cozy_verify_behind_the_devices_own_posts_saves_evidence_anyone_can_check(
    relay: Relay, tmp_path: Path
) -> None:
    home = tmp_path / "alice"
    await cli_signup(relay.url, home, "alice")
    env = client_env(home)
    collab = (await cozy("collab", "create", "audit", env=env)).stdout.decode().strip()
    for n in range(3):
        await cozy("post", collab, f"alice {n}", env=env)  # state.db keeps the acks' heads
    assert ClientState(home / "state.db").checkpoints(collab)[1] is not None
    signer = CheckpointSigner(relay.config.relay_name, bytes(relay.relay_key))
    behind = Misbehaviour(Lie.BEHIND, 3)
    profile = Home(home).load_profile()
    async with LyingRelay(relay.url, plan=lambda _n: behind, signer=signer).running() as url:
        profile.relay_url = url
        Home(home).save_profile(profile)
        lied = await cozy("verify", collab, env=env, check=False)
    assert lied.returncode == 3, lied.stderr
    assert b"INTEGRITY ALARM" in lied.stderr
    saved = list((home / "evidence").glob("checkpoints-*.json"))
    assert len(saved) == 1, lied.stderr
    out = await cozy("evidence", "check", str(saved[0]), env=client_env(tmp_path / "anyone"))
    assert out.stdout.startswith(b"valid proof: the relay signed contradicting checkpoints")


async def test_a_following_reader_takes_heartbeats_and_new_heads_without_an_alarm(
    database_url: str, tmp_path: Path
) -> None:
    config = relay_config(database_url, tmp_path / "relay", checkpoint_interval_ms=50)
    book = device(tmp_path)
    async with running_relay(config) as relay:
        alice = await sign_up(relay.url, "alice")
        cid = alice.collab_id
        await post_as(relay.url, alice, book, "before")
        async with session(relay.url, alice) as client:
            client.checkpoints = book
            async with client.history(cid, alice.box_key, follow=True) as events:
                with trio.fail_after(60):
                    async for entry in events:
                        if entry.seq == 2:  # read the post above: now post from elsewhere
                            for n in range(3):
                                await post_as(relay.url, alice, CheckpointBook(), f"live {n}")
                        if entry.seq == 5:
                            break
                    # The verified head follows through the heartbeats to the newest size.
                    while (held := book.held(relay.relay_pk, cid)) is None or held.size < 5:
                        await trio.sleep(0.05)
                        with trio.move_on_after(0.2):
                            await events.__anext__()
    assert held.size == 5
