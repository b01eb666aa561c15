"""A collab's witness policy, enforced on every signed head this device would take (issue 16).

When the verified fold of a collab holds a policy (`model.membership.SetWitnesses`: k of these
witness keys, set by an owner), a `caught_up` or heartbeat checkpoint is taken only with k valid
cosignatures from distinct listed witnesses appended to it. Without them the head is refused
with `QuorumNotMet` *before* clientkit/_checkpoints.py keeps it, so the device stays on the head
it holds. A head that does not open under the relay key is left to `CheckpointBook.check_head`,
which raises the integrity alarm for it.

A read (`caught_up`) that meets a head without the quorum asks again from its verified head for
up to `QUORUM_GRACE` seconds before refusing: an honest relay asks its witnesses as soon as a
commit lands, so a head written a moment ago gets cosigned within a round. A heartbeat without
the quorum is skipped, not refused (the next one, or the next read, brings the cosigned head;
a relay that never does meets the staleness bound).

Why a refusal and not an alarm: a head nobody cosigned may be a split view, or only slow or
unreachable witnesses; the device cannot tell which, only that it cannot confirm freshness. A
cosigned head that contradicts the held one is still an alarm (`ForkDetected`,
`EquivocationDetected`), raised by the book. Acks' checkpoints need no quorum: they prove an
event included, and the head that follows them must meet the policy before it is held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from clientkit.errors import QuorumNotMet
from model.checkpoints import CheckpointInvalid, SignedHead, open_head, witnessed
from model.merkle import verify_consistency
from model.note import NoteError
from model.tlog import QuorumNotMet as NoQuorum

if TYPE_CHECKING:
    from collections.abc import Sequence

    from model.membership import WitnessPolicy

# A relay signs a new head before its witnesses cosigned it (they are asked right after the
# commit), so a read that ends on a head without the quorum asks again for up to this long.
QUORUM_GRACE: Final = 10.0
QUORUM_RETRY: Final = 0.25


def require_quorum(relay_pk: bytes, collab_id: str, note: bytes, policy: WitnessPolicy) -> int:
    """Raise `QuorumNotMet` unless `policy.quorum` of its witnesses cosigned `note`; return
    the date (Unix seconds) by which that many had: see `witnessed_at`."""
    try:
        head = open_head(note, relay_pk, collab_id)
    except CheckpointInvalid:
        return 0  # not the relay's: check_head raises TamperDetected for it
    try:
        dates = witnessed(head, relay_pk, policy.verifiers(), policy.quorum)
    except (NoQuorum, NoteError) as exc:
        raise QuorumNotMet(str(exc), collab_id=collab_id, size=head.size) from None
    return _kth_freshest(dates, policy.quorum)


def witnessed_at(relay_pk: bytes, head: SignedHead, policy: WitnessPolicy | None) -> int:
    """How fresh a held head is, for the staleness bound (docs/ordering.md).

    Without a policy, the relay's own date. With one, the date of the `quorum`-th freshest valid
    cosignature by a listed witness (0 without the quorum): "by then, k witnesses had seen this
    as the largest tree". The relay can date its own signature as it likes, but an honest witness
    that cosigned a larger tree refuses to date an older one again, so a head withheld behind
    what the witnesses saw stops getting fresher.
    """
    if policy is None:
        return head.timestamp
    try:
        dates = witnessed(head, relay_pk, policy.verifiers(), policy.quorum)
    except (NoQuorum, NoteError):
        return 0
    return _kth_freshest(dates, policy.quorum)


def _kth_freshest(dates: dict[str, int], k: int) -> int:
    ordered = sorted(dates.values(), reverse=True)
    return ordered[k - 1] if 0 < k <= len(ordered) else 0


def extended_witnessed(
    relay_pk: bytes,
    head: SignedHead,
    note: bytes,
    proof: Sequence[bytes],
    policy: WitnessPolicy,
) -> int:
    """The date a heartbeat's `witnessed` head renews freshness with: the newest head the
    quorum cosigned, smaller than `head` (which the witnesses had not cosigned yet).

    Call it only with a `head` tied to the reader's own fold (its size and root): the proof
    that `head` extends the witnessed one then shows the witnesses' tree is a prefix of what the
    reader holds, so "by then, k witnesses had seen this as the largest tree" holds for the
    reader's view too. Raises `CheckpointInvalid` (not the relay's), `QuorumNotMet` (not
    cosigned by the quorum, or not smaller) and `model.merkle.ProofInvalid` (`head` does not
    extend it: the relay showed its witnesses another history).
    """
    shown = open_head(note, relay_pk, head.collab_id)
    if shown.size >= head.size:
        raise QuorumNotMet(
            "a witnessed head must be smaller than the heartbeat's",
            collab_id=head.collab_id,
            size=shown.size,
        )
    date = require_quorum(relay_pk, head.collab_id, note, policy)
    verify_consistency(shown.size, head.size, shown.root, head.root, proof)
    return date
