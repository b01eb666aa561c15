"""Equivocation proofs (SO-4): a relay that contradicts its own receipts is caught, and the proof
it leaves is checkable by anyone with nothing but the relay's public key.

The contradicting receipts here are signed with the real relay's key (the test holds it), as a
compromised relay would sign them: in both shapes, an inclusion proof under a signed checkpoint
(ADR-0020) and the per-event signature devices kept from older relays (ADR-0007).
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

import msgspec
import pytest

from clientkit import EquivocationDetected
from clientkit._state import ClientState
from model import equivocation
from model.chain import Receipt, sign_receipt
from model.checkpoints import CheckpointSigner
from model.equivocation import PROOF_KIND, EquivocationProof, NotAProof, SignedReceipt
from model.merkle import LeafTree, leaf_hash
from tests.cli_harness import client_env, cozy
from tests.relay_harness import session, sign_up

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay


SHAPES = ["inclusion", "signature"]


def forged(relay: Relay, collab_id: str, seq: int, shape: str) -> SignedReceipt:
    """A receipt the relay's key signs for an event that never sat at `seq`: an inclusion proof
    under a checkpoint it signed of a tree holding that event there, or (the receipts devices
    kept from older relays, ADR-0007) a per-event signature."""
    eid, chain = secrets.token_bytes(32), secrets.token_bytes(32)
    if shape == "signature":
        sig = sign_receipt(relay.relay_key, Receipt(collab_id, seq, eid, chain))
        return SignedReceipt(collab_id, seq, eid, chain, sig)
    leaves = [leaf_hash(secrets.token_bytes(32)) for _ in range(seq - 1)] + [leaf_hash(eid)]
    tree = LeafTree(leaves)
    signer = CheckpointSigner(relay.config.relay_name, bytes(relay.relay_key))
    note = signer.sign(collab_id, seq, tree.root(), int(time.time()))
    proof = list(tree.inclusion_proof(seq - 1))
    return SignedReceipt(collab_id, seq, eid, chain, checkpoint=note, inclusion=proof)


@pytest.mark.objective("SO-4")
@pytest.mark.parametrize("shape", SHAPES)
async def test_two_receipts_for_one_seq_become_a_checkable_proof(
    relay: Relay, tmp_path: Path, shape: str
) -> None:
    alice = await sign_up(relay.url, "alice")
    state = ClientState(tmp_path / "state.db")
    async with session(relay.url, alice) as client:
        client.on_receipt = state.add_receipt
        # Earlier, the relay promised this device another event at the seq the next post gets.
        state.add_receipt(forged(relay, alice.collab_id, 2, shape))
        with pytest.raises(EquivocationDetected) as alarm:
            await client.append(alice.event("hello"))
    proof = alarm.value.proof
    assert "two different events" in equivocation.check(proof)
    exported = tmp_path / "proof.json"
    exported.write_bytes(equivocation.encode(proof))
    checked = await cozy("evidence", "check", str(exported), env=client_env(tmp_path / "x"))
    assert b"valid proof" in checked.stdout
    # Tampering with the proof, or a proof that shows no contradiction, does not check.
    assert proof.other_receipt is not None
    for bad in (
        msgspec.structs.replace(proof, relay_pk=secrets.token_bytes(32)),
        msgspec.structs.replace(proof, other_receipt=proof.receipt),
        EquivocationProof(PROOF_KIND, proof.relay_pk, proof.receipt),
    ):
        with pytest.raises(NotAProof):
            equivocation.check(bad)
    refused = await cozy(
        "evidence", "check", str(tmp_path / "state.db"), env=client_env(tmp_path / "x"), check=False
    )
    assert refused.returncode == 1


@pytest.mark.objective("SO-4")
@pytest.mark.parametrize("shape", SHAPES)
async def test_an_acked_event_served_elsewhere_later_is_an_equivocation(
    relay: Relay, shape: str
) -> None:
    alice = await sign_up(relay.url, "alice")
    async with session(relay.url, alice) as client:
        await client.append(alice.event("real"))
        promised = {
            2: forged(relay, alice.collab_id, 2, shape)
        }  # "your event is at seq 2" — it is not
        with pytest.raises(EquivocationDetected) as alarm:
            async with client.history(alice.collab_id, alice.box_key, receipts=promised) as events:
                async for _ in events:
                    pass
    assert alarm.value.seq == 2
    # The head a device would save is the last position that passed every check, never the
    # event that raised the alarm (cozy tail saves it on the way out).
    assert events.head.seq == 1
    assert "later served another" in equivocation.check(alarm.value.proof)
    # The honest receipts the client keeps for its own posts pass the same check silently.
    async with session(relay.url, alice) as client:
        kept: dict[int, SignedReceipt] = {}

        def keep(r: SignedReceipt) -> None:
            kept[r.seq] = r

        client.on_receipt = keep
        await client.append(alice.event("second"))
        async with client.history(alice.collab_id, alice.box_key, receipts=kept) as events:
            assert [e.seq async for e in events] == [1, 2, 3]
