"""Receipts and equivocation proofs: a relay's own signatures, showing it told two stories (SO-4).

A receipt is the relay's signed promise "event E sits at seq n of collab C". Since ADR-0020 it
is an inclusion proof: the relay's signed, dated checkpoint of the collab's tree after the commit
group that stored E (`checkpoint`, one signature shared by the whole group) and the proof that
E's id is leaf n - 1 under it (`inclusion`). Devices that used an older relay may still hold the
first shape (ADR-0007): one relay signature per event over `[collab_id, seq, event_id, chain]`
(`sig`). Both are checked here with nothing but the relay's public key; only the old shape also
signs the chain head.

Two receipts for the same position that disagree about the event (or, both of the old shape,
about the chain), or a receipt that disagrees with the history the relay later serves for that
position, are evidence anyone can check: `check` does exactly that. Two inclusion proofs of
different leaves at one index under two relay-signed checkpoints mean the relay signed two trees
that cannot both be a prefix of one history. Clients export them as JSON so a member can hand
them to the operator, an auditor or the other members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import msgspec

from model.chain import Receipt, verify_receipt
from model.checkpoints import CheckpointInvalid, SignedHead, open_head
from model.errors import ModelError
from model.merkle import ProofInvalid, leaf_hash, verify_inclusion

if TYPE_CHECKING:
    from model import wire

PROOF_KIND: Final = "cozylabs-equivocation-proof/1"


class SignedReceipt(msgspec.Struct, frozen=True):
    """A receipt as a device keeps it: `checkpoint` + `inclusion` (or, from an older relay, `sig`).

    `chain` is the head after the event as the ack stated it; only an old-shape receipt signs it.
    """

    collab_id: str
    seq: int
    event_id: bytes
    chain: bytes
    sig: bytes = b""
    checkpoint: bytes = b""
    inclusion: list[bytes] = msgspec.field(default_factory=list)

    @property
    def signs_chain(self) -> bool:
        """An old-shape receipt (one signature per event, ADR-0007) also signs the chain."""
        return not self.checkpoint

    def receipt(self) -> Receipt:
        return Receipt(self.collab_id, self.seq, self.event_id, self.chain)

    @classmethod
    def of_ack(cls, ack: wire.Appended) -> SignedReceipt:
        """The receipt an `appended` ack carries: its checkpoint and inclusion proof."""
        return cls(
            ack.collab_id,
            ack.seq,
            ack.event_id,
            ack.chain,
            checkpoint=ack.checkpoint,
            inclusion=list(ack.inclusion),
        )


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


class ReceiptUnproven(ModelError):
    """A receipt that does not prove its event stored at its seq under the relay's key."""


def open_receipt(relay_pk: bytes, receipt: SignedReceipt) -> SignedHead | None:
    """Check a receipt under the relay key; return the checkpoint its event is included under
    (None for an old-shape signature receipt). Raises `ReceiptUnproven`."""
    if not receipt.checkpoint:
        if not verify_receipt(relay_pk, receipt.receipt(), receipt.sig):
            raise ReceiptUnproven("no checkpoint, and no receipt signature by the relay key")
        return None
    try:
        head = open_head(receipt.checkpoint, relay_pk, receipt.collab_id)
    except CheckpointInvalid as exc:
        raise ReceiptUnproven(f"the checkpoint does not prove the event stored: {exc}") from None
    check_included(receipt, head)
    return head


def check_included(receipt: SignedReceipt, head: SignedHead) -> None:
    """The receipt's proof places its event at leaf `seq - 1` of `head` (opened from the
    receipt's own checkpoint by the caller). Raises `ReceiptUnproven`."""
    try:
        if head.note != receipt.checkpoint or head.collab_id != receipt.collab_id:
            raise ProofInvalid("the receipt is not under this checkpoint")
        if not 1 <= receipt.seq <= head.size:
            raise ProofInvalid(f"seq {receipt.seq} is not in a tree of {head.size}")
        verify_inclusion(
            leaf_hash(receipt.event_id), receipt.seq - 1, head.size, receipt.inclusion, head.root
        )
    except ProofInvalid as exc:
        raise ReceiptUnproven(f"the checkpoint does not prove the event stored: {exc}") from None


def disagree(a: SignedReceipt, b: SignedReceipt) -> bool:
    """Whether two receipts for one position cannot both be true, as far as both signed."""
    if (a.collab_id, a.seq) != (b.collab_id, b.seq):
        return False
    return a.event_id != b.event_id or (a.signs_chain and b.signs_chain and a.chain != b.chain)


def contradicted_by(receipt: SignedReceipt, served: Served) -> bool:
    """Whether what the relay served at the receipt's seq is not what the receipt promised."""
    if served.seq != receipt.seq:
        return False
    return served.event_id != receipt.event_id or (
        receipt.signs_chain and served.chain != receipt.chain
    )


def check(proof: EquivocationProof) -> str:
    """Verify the proof; return a one-line statement of what it shows. Raises `NotAProof`."""
    if proof.kind != PROOF_KIND:
        raise NotAProof(f"not a {PROOF_KIND} document")
    a = proof.receipt
    try:
        open_receipt(proof.relay_pk, a)
    except ReceiptUnproven as exc:
        raise NotAProof(f"the receipt is not the relay's: {exc}") from None
    if proof.other_receipt is not None:
        b = proof.other_receipt
        try:
            open_receipt(proof.relay_pk, b)
        except ReceiptUnproven as exc:
            raise NotAProof(f"the second receipt is not the relay's: {exc}") from None
        if not disagree(a, b):
            raise NotAProof("the receipts do not disagree about one position")
        return f"the relay signed two different events for {a.collab_id} seq {a.seq}"
    if proof.served is None or proof.served.seq != a.seq:
        raise NotAProof("nothing to compare the receipt with")
    if not contradicted_by(a, proof.served):
        raise NotAProof("the served history agrees with the receipt")
    return f"the relay acked an event at {a.collab_id} seq {a.seq} and later served another there"


def encode(proof: EquivocationProof) -> bytes:
    return msgspec.json.encode(proof)


def decode(data: bytes) -> EquivocationProof:
    try:
        return msgspec.json.decode(data, type=EquivocationProof)
    except msgspec.DecodeError as exc:
        raise NotAProof(f"not an equivocation proof: {exc}") from None
