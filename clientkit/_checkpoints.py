"""What this device holds of each collab's signed checkpoints, and the checks every new one meets.

Per collab the device keeps two of the relay's signed, dated checkpoints (model/checkpoints.py):

- `held`: the newest one whose consistency with the previous `held` was proven. It advances only
  through `caught_up` and the subscription heartbeat (`checkpoint`), which carry a consistency
  proof from the size this device announced in `subscribe` (`tree_size`) or from the last one
  the relay sent on that subscription. Its size is what the next `subscribe` announces.
- `top`: the largest one it was given at all, including the checkpoint an ack proves its event
  included under (the ack's receipt: the relay signs no other). It is what a later, smaller
  head is measured against.

Every new checkpoint must open under the pinned relay key (else `TamperDetected`, or
`ReceiptInvalid` on an ack, which must carry one, as must the ack's inclusion proof); must not contradict `held` or
`top` (same size and another root, or smaller and dated strictly later: `EquivocationDetected`
carrying both notes, which `cozy evidence check` verifies); and, when larger than `held` with a
proof from `held`'s size, must be consistent with it (else `ForkDetected`). A larger one with a
proof from another size (another process of this device moved `held` meanwhile) is not taken as
`held`, and raises nothing. A smaller one dated no later than what is held is an old statement,
not a lie: kept out, no alarm (a relay that backdates to freeze a view is left to the staleness
bound of issue 16, item 3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from clientkit.errors import EquivocationDetected, ForkDetected, ReceiptInvalid, TamperDetected
from model.checkpoints import (
    PROOF_KIND,
    CheckpointInvalid,
    CheckpointProof,
    SignedHead,
    contradiction,
    open_head,
)
from model.equivocation import ReceiptUnproven, SignedReceipt, check_included
from model.merkle import ProofInvalid, verify_consistency

if TYPE_CHECKING:
    from collections.abc import Sequence


_OPENED_MAX = 64  # opened notes remembered per book


class CheckpointStore(Protocol):
    """Durable keeping of `held` and `top` per collab (clientkit/_state.py)."""

    def checkpoints(self, collab_id: str) -> tuple[bytes | None, bytes | None]: ...

    def save_checkpoints(self, collab_id: str, held: bytes | None, top: bytes | None) -> None: ...


class CheckpointBook:
    """In memory for one client; also durable when given a store (the CLI and bot kit do)."""

    def __init__(self, store: CheckpointStore | None = None) -> None:
        self.store = store
        self._held: dict[str, SignedHead | None] = {}
        self._top: dict[str, SignedHead | None] = {}
        # Notes this book opened, by (relay key, collab, exact bytes): the acks of one commit
        # group share one note, and the saved `held`/`top` are read back on every check, so
        # each is verified once, not two signatures per ack and per read (the key is the bytes
        # themselves: a note edited on disk is not found here and is verified again).
        self._opened: dict[tuple[bytes, str, bytes], SignedHead] = {}

    def _open(self, note: bytes, relay_pk: bytes, collab_id: str) -> SignedHead:
        """`open_head`, remembered. Raises `CheckpointInvalid`."""
        key = (relay_pk, collab_id, note)
        head = self._opened.get(key)
        if head is None:
            head = open_head(note, relay_pk, collab_id)
            if len(self._opened) >= _OPENED_MAX:
                self._opened.clear()
            self._opened[key] = head
        return head

    def _reopen(self, note: bytes | None, relay_pk: bytes, collab_id: str) -> SignedHead | None:
        """A saved note, checked again (it is on disk: it may have been edited or re-pinned)."""
        if note is None:
            return None
        try:
            return self._open(note, relay_pk, collab_id)
        except CheckpointInvalid:
            return None

    def _load(self, relay_pk: bytes, collab_id: str) -> tuple[SignedHead | None, SignedHead | None]:
        if self.store is not None:
            held, top = self.store.checkpoints(collab_id)
            return self._reopen(held, relay_pk, collab_id), self._reopen(top, relay_pk, collab_id)
        return self._held.get(collab_id), self._top.get(collab_id)

    def _save(
        self,
        collab_id: str,
        held: SignedHead | None,
        top: SignedHead | None,
        was: tuple[SignedHead | None, SignedHead | None] | None = None,
    ) -> None:
        """Keep `held` and `top` (a durable store is written only when one changed from `was`,
        what `_load` returned)."""
        self._held[collab_id], self._top[collab_id] = held, top
        if was is not None and was[0] is held and was[1] is top:
            return
        if self.store is not None:
            self.store.save_checkpoints(
                collab_id, None if held is None else held.note, None if top is None else top.note
            )

    def held(self, relay_pk: bytes, collab_id: str) -> SignedHead | None:
        return self._load(relay_pk, collab_id)[0]

    def top(self, relay_pk: bytes, collab_id: str) -> SignedHead | None:
        return self._load(relay_pk, collab_id)[1]

    def tree_size(self, relay_pk: bytes, collab_id: str) -> int:
        """The size to announce in `subscribe`: the relay proves consistency from it."""
        held = self.held(relay_pk, collab_id)
        return 0 if held is None else held.size

    def open(self, relay_pk: bytes, collab_id: str, note: bytes) -> SignedHead:
        """A `caught_up`'s or heartbeat's note, opened under the relay key (nothing kept).
        Raises `TamperDetected` if it does not open."""
        try:
            return self._open(note, relay_pk, collab_id)
        except CheckpointInvalid as exc:
            raise TamperDetected(
                f"the relay's checkpoint does not verify: {exc}", collab_id=collab_id, seq=None
            ) from None

    def check_ack(self, relay_pk: bytes, receipt: SignedReceipt) -> None:
        """An ack's receipt: its checkpoint must open under the relay key and include the event
        at its seq (`ReceiptInvalid` otherwise, also when it has none), and must not contradict
        what this device holds; the largest becomes `top`."""
        try:
            if not receipt.checkpoint:
                raise ReceiptUnproven("the ack carries no checkpoint")
            try:
                head = self._open(receipt.checkpoint, relay_pk, receipt.collab_id)
            except CheckpointInvalid as exc:
                raise ReceiptUnproven(f"its checkpoint does not verify: {exc}") from None
            check_included(receipt, head)
        except ReceiptUnproven as exc:
            raise ReceiptInvalid(
                f"the ack's receipt does not prove the event stored: {exc}",
                collab_id=receipt.collab_id,
                seq=receipt.seq,
            ) from None
        was = held, top = self._load(relay_pk, receipt.collab_id)
        self._compare(relay_pk, head, (held, top))
        if top is None or head.size > top.size:
            top = head
        self._save(receipt.collab_id, held, top, was)

    def check_head(
        self,
        relay_pk: bytes,
        collab_id: str,
        note: bytes,
        proof_from: int,
        consistency: Sequence[bytes],
    ) -> SignedHead:
        """A `caught_up`'s or heartbeat's checkpoint. Returns it once it passed."""
        head = self.open(relay_pk, collab_id, note)
        held, top = self._load(relay_pk, collab_id)
        self._compare(relay_pk, head, (held, top))
        if held is None or (head.size == held.size and head.timestamp > held.timestamp):
            held = head
        elif head.size > held.size and proof_from == held.size:
            try:
                verify_consistency(held.size, head.size, held.root, head.root, consistency)
            except ProofInvalid:
                raise ForkDetected(
                    f"the relay's signed tree of {head.size} events does not extend the tree of"
                    f" {held.size} this device verified before: its history was rewritten",
                    collab_id=collab_id,
                    seq=held.size,
                ) from None
            held = head
        if top is None or head.size > top.size:
            top = head
        self._save(collab_id, held, top)
        return head

    def compare(self, relay_pk: bytes, collab_id: str, note: bytes) -> None:
        """Raise `EquivocationDetected` when `note` contradicts a checkpoint held, without
        keeping it: a head refused for another reason (no witness quorum) still proves what it
        contradicts. A note that does not open is left to `check_head`."""
        try:
            head = open_head(note, relay_pk, collab_id)
        except CheckpointInvalid:
            return
        self._compare(relay_pk, head, self._load(relay_pk, collab_id))

    def _compare(
        self, relay_pk: bytes, head: SignedHead, known: tuple[SignedHead | None, SignedHead | None]
    ) -> None:
        for other in known:
            if other is None:
                continue
            why = contradiction(other, head)
            if why is not None:
                raise EquivocationDetected(
                    f"the relay contradicted its own signed checkpoint: {why}",
                    collab_id=head.collab_id,
                    seq=head.size,
                    proof=CheckpointProof(
                        PROOF_KIND, relay_pk, head.collab_id, other.note, head.note
                    ),
                )
