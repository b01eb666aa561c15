"""Equivocation proofs: a relay's own signatures, showing it told two stories (SO-4).

A receipt is the relay's signed promise "event E sits at seq n of collab C, chain head h after
it" (model/chain.py). Two receipts for the same position that disagree, or a receipt that
disagrees with the history the relay later serves for that position, are evidence anyone can
check with nothing but the relay's public key: `check` does exactly that. Clients export them
as JSON so a member can hand them to the operator, an auditor or the other members.
"""

from __future__ import annotations

from typing import Final

import msgspec

from model.chain import Receipt, verify_receipt
from model.errors import ModelError

PROOF_KIND: Final = "cozylabs-equivocation-proof/1"


class SignedReceipt(msgspec.Struct, frozen=True):
    collab_id: str
    seq: int
    event_id: bytes
    chain: bytes
    sig: bytes

    def receipt(self) -> Receipt:
        return Receipt(self.collab_id, self.seq, self.event_id, self.chain)


class Served(msgspec.Struct, frozen=True):
    """What the relay later served at that position (unsigned: compare with any member's copy)."""

    seq: int
    event_id: bytes
    chain: bytes


class EquivocationProof(msgspec.Struct, frozen=True):
    kind: str
    relay_pk: bytes
    receipt: SignedReceipt
    other_receipt: SignedReceipt | None = None
    served: Served | None = None


class NotAProof(ModelError):
    """The document does not show a relay contradicting itself."""


def check(proof: EquivocationProof) -> str:
    """Verify the proof; return a one-line statement of what it shows. Raises `NotAProof`."""
    if proof.kind != PROOF_KIND:
        raise NotAProof(f"not a {PROOF_KIND} document")
    a = proof.receipt
    if not verify_receipt(proof.relay_pk, a.receipt(), a.sig):
        raise NotAProof("the receipt is not signed by that relay key")
    if proof.other_receipt is not None:
        b = proof.other_receipt
        if not verify_receipt(proof.relay_pk, b.receipt(), b.sig):
            raise NotAProof("the second receipt is not signed by that relay key")
        if (a.collab_id, a.seq) != (b.collab_id, b.seq) or (a.event_id, a.chain) == (
            b.event_id,
            b.chain,
        ):
            raise NotAProof("the receipts do not disagree about one position")
        return f"the relay signed two different events for {a.collab_id} seq {a.seq}"
    if proof.served is None or proof.served.seq != a.seq:
        raise NotAProof("nothing to compare the receipt with")
    if (proof.served.event_id, proof.served.chain) == (a.event_id, a.chain):
        raise NotAProof("the served history agrees with the receipt")
    return f"the relay acked an event at {a.collab_id} seq {a.seq} and later served another there"


def encode(proof: EquivocationProof) -> bytes:
    return msgspec.json.encode(proof)


def decode(data: bytes) -> EquivocationProof:
    try:
        return msgspec.json.decode(data, type=EquivocationProof)
    except msgspec.DecodeError as exc:
        raise NotAProof(f"not an equivocation proof: {exc}") from None
