"""Receipts are inclusion proofs under a signed checkpoint (issue 16 item 1, ADR-0020).

The relay signs one checkpoint per commit group, and an ack's receipt is that checkpoint with
the proof that the event is leaf `seq - 1` under it. A relay that acks with anything less — no
checkpoint, a checkpoint another key signed, a tree without the event, a seq the proof does not
place the event at — is caught before the device keeps anything of it. A device whose state.db
holds receipts of the older shape (one relay signature per event, ADR-0007) keeps working.
"""

from __future__ import annotations

import secrets
import sqlite3
from contextlib import closing
from typing import TYPE_CHECKING

import pytest

from clientkit import ReceiptInvalid, connect
from clientkit._checkpoints import CheckpointBook
from clientkit._state import ClientState
from clientkit.testing import Lie, LyingRelay, Misbehaviour
from model import equivocation
from model.chain import Receipt, sign_receipt
from model.checkpoints import CheckpointSigner
from model.equivocation import SignedReceipt, open_receipt
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import post, session, sign_up

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay

# The receipts table as clients wrote it before receipts became inclusion proofs.
_OLD_RECEIPTS = """
CREATE TABLE receipts (
    collab_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    event_id  BLOB NOT NULL,
    chain     BLOB NOT NULL,
    sig       BLOB NOT NULL,
    PRIMARY KEY (collab_id, seq, event_id, chain)
);
"""


@pytest.mark.objective("SO-4")
@pytest.mark.parametrize(
    "lie",
    [Lie.STRIP_RECEIPT, Lie.FOREIGN_CHECKPOINT, Lie.EXCLUDE_EVENT, Lie.FORGE_RECEIPT],
)
async def test_an_ack_whose_receipt_does_not_prove_the_event_stored_is_refused_and_nothing_kept(
    relay: Relay, tmp_path: Path, lie: Lie
) -> None:
    """Old code: an ack stripped of its checkpoint and proof passed (the per-event signature
    stood in for them); the others were refused already. Now every one is `ReceiptInvalid`,
    and the device keeps neither the receipt nor the checkpoint."""
    alice = await sign_up(relay.url, "alice")
    state = ClientState(tmp_path / "state.db")
    book = CheckpointBook(state)
    signer = CheckpointSigner(relay.config.relay_name, bytes(relay.relay_key))
    lying = LyingRelay(relay.url, plan=lambda _n: Misbehaviour(lie, 1), signer=signer)
    async with lying.running() as url, connect(url) as client:
        client.checkpoints = book
        client.on_receipt = state.add_receipt
        await client.authenticate(alice.token)
        client.use_key(alice.signing_key)
        with pytest.raises(ReceiptInvalid):
            await post(client, alice, alice.collab_id, "stored, but not proven")
    assert state.receipts(alice.collab_id) == {}
    assert book.top(relay.relay_pk, alice.collab_id) is None


async def test_every_ack_and_a_duplicates_ack_carry_a_receipt_that_proves_the_stored_seq(
    relay: Relay, tmp_path: Path
) -> None:
    """Old code: a duplicate's ack had no checkpoint (only the per-event signature)."""
    alice = await sign_up(relay.url, "alice")
    state = ClientState(tmp_path / "state.db")
    signed = alice.event("once")
    async with session(relay.url, alice) as client:
        client.checkpoints = CheckpointBook(state)
        client.on_receipt = state.add_receipt
        first = await client.append(signed)
        acks = await client.append_many([alice.event(f"m{i}") for i in range(20)])
        again = await client.append(signed)  # a retry after a lost ack
    assert (again.seq, again.duplicate) == (first.seq, True)
    for ack in (first, *acks, again):
        head = open_receipt(relay.relay_pk, SignedReceipt.of_ack(ack))
        assert head is not None
        assert head.size >= ack.seq
    # The duplicate's checkpoint covers everything stored since: it is the collab's current one.
    assert open_receipt(relay.relay_pk, state.receipts(alice.collab_id)[first.seq]) is not None
    kept = state.receipts(alice.collab_id)
    assert sorted(kept) == [first.seq, *(a.seq for a in acks)]
    assert all(r.checkpoint and not r.sig for r in kept.values())


def _make_old(db: Path) -> None:
    """Turn a state.db into one an older client wrote: the old receipts table, no version."""
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript("DROP TABLE receipts;" + _OLD_RECEIPTS + "PRAGMA user_version = 0;")


def _old_receipt(relay: Relay, collab_id: str, seq: int, eid: bytes, chain: bytes) -> tuple:
    sig = sign_receipt(relay.relay_key, Receipt(collab_id, seq, eid, chain))
    return (collab_id, seq, eid, chain, sig)


@pytest.mark.objective("SO-4")
async def test_a_device_with_old_style_receipts_keeps_posting_verifying_and_proving(
    relay: Relay, tmp_path: Path
) -> None:
    """A state.db from before receipts became inclusion proofs: its per-event signed receipts
    are read and held to the history as before (a forged one is still a proof anyone checks),
    and the new receipts are kept beside them."""
    home = tmp_path / "alice"
    await cli_signup(relay.url, home, "alice")
    env = client_env(home)
    collab = (await cozy("collab", "create", "old", env=env)).stdout.decode().strip()
    for n in range(2):
        await cozy("post", collab, f"alice {n}", env=env)
    db = home / "state.db"
    posted = ClientState(db).receipts(collab)
    _make_old(db)
    with closing(sqlite3.connect(db)) as conn:
        conn.executemany(
            "INSERT INTO receipts VALUES (?, ?, ?, ?, ?)",
            [_old_receipt(relay, collab, r.seq, r.event_id, r.chain) for r in posted.values()],
        )
        conn.commit()
    # The device goes on: post, read, verify, with the old rows held to the history.
    await cozy("post", collab, "alice 2", env=env)
    await cozy("verify", collab, env=env)
    kept = ClientState(db).receipts(collab)
    assert sorted(kept) == [*sorted(posted), max(posted) + 1]
    assert all(kept[s].sig and not kept[s].checkpoint for s in posted)
    assert kept[max(posted) + 1].checkpoint
    # An old-shape receipt the relay signed for another event at a seq it serves: provable.
    seq = min(posted)
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("DELETE FROM receipts WHERE collab_id = ? AND seq = ?", (collab, seq))
        conn.execute(
            "INSERT INTO receipts (collab_id, seq, event_id, chain, sig) VALUES (?, ?, ?, ?, ?)",
            _old_receipt(relay, collab, seq, secrets.token_bytes(32), secrets.token_bytes(32)),
        )
        conn.commit()
    lied = await cozy("verify", collab, env=env, check=False)
    assert lied.returncode == 3, lied.stderr
    saved = list((home / "evidence").glob("equivocation-*.json"))
    assert len(saved) == 1, lied.stderr
    out = await cozy("evidence", "check", str(saved[0]), env=client_env(tmp_path / "anyone"))
    assert out.stdout.startswith(b"valid proof: the relay acked an event"), out.stdout
    proof = equivocation.decode(saved[0].read_bytes())
    assert proof.receipt.sig
    assert not proof.receipt.checkpoint
