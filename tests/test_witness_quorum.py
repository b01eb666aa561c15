"""Witness quorums end to end (issue 16, item 4): real `cozy witness serve` processes, a real
relay that submits every active collab's checkpoint to them, and the real client kit enforcing
the collab's signed witness policy ("k of these witnesses", set by an owner's management proof).
Lies come from `clientkit.testing.LyingRelay` holding the relay's own key."""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import nacl.signing
import pytest
import trio

from clientkit import (
    ForkDetected,
    QuorumNotMet,
    WitnessConflict,
    _collab,
    connect,
    submit_checkpoint,
)
from clientkit import _quorum as quorum
from clientkit._checkpoints import CheckpointBook
from clientkit._quorum import require_quorum
from clientkit.testing import Lie, LyingRelay, Misbehaviour
from model.checkpoints import CheckpointSigner, open_head, witnessed
from model.membership import WitnessPolicy
from model.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    NoteSignature,
    NoteSigner,
    NoteVerifier,
    parse_note,
)
from model.tlog import AddCheckpointRequest, add_signatures
from relay.config import ConfigError, WitnessTarget, load_config
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import User, post, relay_config, running_relay, session, sign_up
from tests.test_witness import WitnessProcess, init_witness

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from relay._server import Relay
    from relay.config import RelayConfig


WITNESS_ROUND = "witness_interval_ms"


def log_vkey(config: RelayConfig) -> str:
    """The relay's checkpoint key as a witness operator configures it (`--log-prefix`)."""
    assert config.relay_signing_seed is not None
    pk = bytes(nacl.signing.SigningKey(config.relay_signing_seed.value).verify_key)
    return NoteVerifier(config.relay_name, ALG_ED25519, pk).vkey()


@asynccontextmanager
async def witnessed_relay(
    database_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Relay, list[WitnessProcess]]]:
    """A relay configured with two real witnesses that trust its collabs' checkpoints
    (`overrides`: further relay settings; witness rounds every 100 ms unless given)."""
    config = relay_config(database_url, tmp_path / "relay", **{WITNESS_ROUND: 100, **overrides})
    witnesses = []
    for i in (1, 2):
        state, _ = await init_witness(tmp_path / f"w{i}", name=f"witness.example/w{i}")
        w = WitnessProcess(state, "--log-prefix", f"{config.relay_name}/collab/", log_vkey(config))
        await w.start()
        witnesses.append(w)
    config = dataclasses.replace(
        config, witnesses=tuple(WitnessTarget(w.url, w.vkey) for w in witnesses)
    )
    try:
        async with running_relay(config) as relay:
            yield relay, witnesses
    finally:
        for w in witnesses:
            await w.stop()


async def set_policy(url: str, owner: User, quorum: int, vkeys: tuple[str, ...]) -> None:
    async with session(url, owner) as client:
        await client.manage(
            owner.signing_key,
            owner.box_key,
            owner.collab_id,
            lambda _v: _collab.set_witnesses(quorum, vkeys),
        )


async def cosigned(relay: Relay, collab_id: str, by: int) -> int:
    """Wait until `by` witnesses cosigned the collab's current tree; its size."""
    with trio.fail_after(60):
        while True:
            tree = relay.trees.loaded(collab_id)
            if tree is not None:
                size = tree.size
                if len(relay.trees.cosignatures(collab_id, size, tree.root(size))) >= by:
                    return size
            await trio.sleep(0.05)


async def read_on(url: str, user: User, book: CheckpointBook) -> int:
    async with connect(url) as client:
        client.checkpoints = book
        await client.authenticate(user.token)
        view = await client.read(user.collab_id, user.box_key)
        return view.head.seq


@pytest.mark.objective("SO-4")
async def test_a_two_of_two_policy_accepts_heads_both_witnesses_cosigned_across_a_restart(
    database_url: str, tmp_path: Path
) -> None:
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice = await sign_up(relay.url, "alice")
        cid = alice.collab_id
        vkeys = tuple(w.vkey for w in witnesses)
        await set_policy(relay.url, alice, 2, vkeys)
        async with session(relay.url, alice) as client:
            await post(client, alice, cid, "hello")
        size = await cosigned(relay, cid, 2)
        book = CheckpointBook()
        assert await read_on(relay.url, alice, book) == size
        held = book.held(relay.relay_pk, cid)
        assert held is not None
        assert held.size == size
        policy = WitnessPolicy(2, vkeys)
        assert len(witnessed(held, relay.relay_pk, policy.verifiers(), 2)) == 2
        # A witness restarts (same state, same address): the relay keeps gathering, the client
        # keeps accepting, and nothing alarms.
        witnesses[0] = await witnesses[0].restarted()
        async with session(relay.url, alice) as client:
            await post(client, alice, cid, "after the witness restarted")
        later = await cosigned(relay, cid, 2)
        assert later > size
        assert await read_on(relay.url, alice, book) == later
        held = book.held(relay.relay_pk, cid)
        assert held is not None
        assert held.size == later


@pytest.mark.objective("SO-4")
async def test_a_split_view_no_witness_cosigned_is_refused_by_the_quorum(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quorum, "QUORUM_GRACE", 1.0)  # the refusal stands after the grace
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice = await sign_up(relay.url, "alice")
        cid = alice.collab_id
        vkeys = tuple(w.vkey for w in witnesses)
        signer = CheckpointSigner(relay.config.relay_name, bytes(relay.relay_key))
        fork = Misbehaviour(Lie.FORK_HEAD, 1)  # the honest size, signed over another root
        # Without a policy a fresh device holds no head the forked one contradicts, but the
        # fork's root is not the tree of the events it was sent: the fold's own tree shows it.
        lying = LyingRelay(relay.url, plan=lambda _n: fork, signer=signer)
        control = CheckpointBook()
        async with lying.running() as url:
            with pytest.raises(ForkDetected, match="not the history it sent"):
                await read_on(url, alice, control)
        assert control.held(relay.relay_pk, cid) is None  # nor kept to build on
        assert control.top(relay.relay_pk, cid) is None
        await set_policy(relay.url, alice, 2, vkeys)
        async with session(relay.url, alice) as client:
            await post(client, alice, cid, "the real history")
        size = await cosigned(relay, cid, 2)
        honest = CheckpointBook()
        assert await read_on(relay.url, alice, honest) == size
        real = honest.held(relay.relay_pk, cid)
        assert real is not None
        # The lying relay shows this member's new device a forked head of the same size.
        victim = CheckpointBook()
        lying = LyingRelay(relay.url, plan=lambda _n: fork, signer=signer)
        async with lying.running() as url:
            with pytest.raises(QuorumNotMet) as caught:
                await read_on(url, alice, victim)
        assert caught.value.size == size
        assert victim.held(relay.relay_pk, cid) is None  # the forked head was not taken
        forged = signer.sign(cid, size, b"\x01" * 32, relay.trees.now())
        # Copying the real head's cosignatures onto the fork proves nothing about it.
        copied = add_signatures(forged, open_head_lines(real.note))
        with pytest.raises(QuorumNotMet):
            require_quorum(relay.relay_pk, cid, copied, WitnessPolicy(2, vkeys))
        # And no witness cosigns the fork: each already cosigned the real tree of this size.
        for w in witnesses:
            with pytest.raises(WitnessConflict):
                await submit_checkpoint(
                    w.url,
                    AddCheckpointRequest(size, (), forged),
                    witness=NoteVerifier.from_vkey(w.vkey),
                )
        assert (
            open_head(real.note, relay.relay_pk, cid).root
            != open_head(forged, relay.relay_pk, cid).root
        )


def open_head_lines(note: bytes) -> list[NoteSignature]:
    return list(parse_note(note).signatures)


async def test_an_owner_sets_the_policy_with_the_cli_and_posts_and_reads_keep_working(
    database_url: str, tmp_path: Path
) -> None:
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        env = client_env(tmp_path / "alice")
        await cli_signup(relay.url, tmp_path / "alice", "alice")
        collab = (await cozy("collab", "create", "demo", env=env)).stdout.decode().strip()
        bad = await cozy("collab", "witnesses", collab, "not-a-key", env=env, check=False)
        assert bad.returncode != 0
        assert len(bad.stderr.decode().strip().splitlines()) == 1
        assert b"witnesses" in bad.stderr
        out = await cozy("collab", "witnesses", collab, *(w.vkey for w in witnesses), env=env)
        assert "requires 2 of 2 witnesses" in out.stdout.decode()
        for text in ("one", "two"):
            await cozy("post", collab, text, env=env)  # each reads a head that needs cosigning
        tail = (await cozy("tail", collab, env=env)).stdout.decode()
        assert "required 2 of 2 witnesses" in tail
        assert tail.rstrip().endswith("two")


def test_the_relay_reads_its_witnesses_from_the_environment_and_refuses_a_bad_one(
    tmp_path: Path,
) -> None:
    vkey = NoteSigner("w.example/1", bytes(32), ALG_COSIGNATURE_V1).verifier.vkey()
    env = {"COZY_DATA_DIR": str(tmp_path), "JWT_SIGNING_KEY": "k" * 32}
    config = load_config(
        env={**env, "COZY_WITNESSES": f"http://127.0.0.1:1 {vkey}, https://w/ {vkey}"}
    )
    assert config.witnesses == (
        WitnessTarget("http://127.0.0.1:1", vkey),
        WitnessTarget("https://w/", vkey),
    )
    log_key = NoteSigner("relay", bytes(32)).verifier.vkey()  # a log key, not a witness key
    for bad in (f"http://x {log_key}", f"ftp://x {vkey}", "http://x"):
        with pytest.raises(ConfigError, match="witness"):
            load_config(env={**env, "COZY_WITNESSES": bad})
