"""The sequencer's admission rules: may this event be appended right after the current head?

What lives here: the one decision the relay's sequencer actor makes about each verified event
before it is written, as a pure function of the collab's `Membership`, its head and the event's
decoded body (`admit`). Content is admitted only from a current member, from an agent only with
the `post` capability, signed with the key the collab pins for the author (after a `rekey`, the
new one), under the current key epoch, and a direct message only with exactly one recipient who
is a member. A management change is admitted only when the shared fold
(model/membership.py) accepts it at exactly this head and the event was signed with the key the
fold pinned for its signer. Every refusal is typed (`Refused`: the wire error code, the rule's
name, and a message that says what to do next), so the actor only moves data: it writes what is
admitted, replies with what is refused, and adopts the membership the decision names. An
event whose id the ledger holds already is answered with its stored position before any of
these rules (`identify`): a refusal always means "not stored".

What does not live here: checking the signature (the actor's verify stage, in the crypto pool),
who may send an append at all (model/authz.py, before the sequencer), positions and chain
hashes (model/sequencer.py), and the ledger I/O. tests/test_model_admission.py drives `admit`
with a hypothesis state machine against an independent model of the rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from model import wire
from model.envelope import KIND_DM, KIND_MANAGEMENT
from model.membership import (
    CAP_POST,
    ProofRejected,
    RemoveMember,
    StaleProof,
    apply,
    proof_of,
    signer_key,
)

if TYPE_CHECKING:
    from model.chain import Head
    from model.envelope import EventBody
    from model.membership import Membership, Proof

# Fold rules whose breach is a matter of permission rather than of a malformed change.
PERMISSION_RULES: Final = frozenset(
    {"role", "agent_signer", "not_a_member", "self_removal", "wrong_signer"}
)


@dataclass(frozen=True, slots=True)
class Admitted:
    """The event may be written; the collab's membership is `membership` after it.

    For content `membership` is the state it was admitted under; for a management change it is
    the fold's result, with the change's `proof`, and `removed` names the account a removal
    took out (whose subscriptions the relay must end once the change is committed).
    """

    membership: Membership
    proof: Proof | None = None
    removed: str | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """The event must not be written. `rule` names the rule it broke (stable, for tests and
    metrics); `code` and `message` are what the author is told. `head_seq` is set for `stale`
    refusals: the head the author must re-read before trying again."""

    code: wire.ErrorCode
    rule: str
    message: str
    head_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """The event is in the ledger already, at `seq` with `chain`: answer the author with that
    position (`Appended(duplicate=True)`), whatever the rules would say about it now."""

    seq: int
    chain: bytes


Decision = Admitted | Refused


def identify(refusal: Refused, stored: tuple[int, bytes] | None) -> Refused | Stored:
    """Identity before admission: the final answer to an event the rules refused at this head,
    given where the ledger holds its id (``(seq, chain)``, or None when it does not).

    A retry of an event that is stored already — a rotation resent after its ack was lost,
    content resent after a rotation, a removed member's retry — is answered with its stored
    position, never refused: a refusal would tell the author the event was not stored (a
    `stale` one tells it to make the change again or seal again, which would store it twice),
    and would leave a removed author unable to learn its event's fate. A refusal therefore
    always means "not stored".

    The actor asks the ledger only about events the rules refuse: one the rules admit that is
    stored already gets the same answer from the ledger's own idempotent append
    (model/sequencer.py `assign`), so the common path costs no lookup.
    """
    return refusal if stored is None else Stored(*stored)


def admit(state: Membership, head: Head, body: EventBody, author_pk: bytes) -> Decision:
    """Decide whether the event with decoded `body`, whose signature verified under
    `author_pk` (the sending session's account key), may follow `head` in a collab whose
    membership is `state`. Pure; never raises for anything the event holds.
    """
    if body.kind == KIND_MANAGEMENT:
        return admit_change(state, head, body, author_pk)
    refusal = admit_content(state, head, body, author_pk)
    return Admitted(state) if refusal is None else refusal


def admit_content(
    state: Membership, head: Head, body: EventBody, author_pk: bytes
) -> Refused | None:
    """Content only from a current member, signed with the key this collab pins for them, from
    an agent only with `post`, a DM only to exactly one member, and only under the current key
    epoch. The rules are checked in that order, so an event breaking several gets the first
    one's refusal."""
    author = state.members.get(body.actor_id)
    if author is None:
        return Refused(
            wire.ErrorCode.UNAUTHORIZED, "not_a_member", "you are not a member of this collab"
        )
    if author.sign_pk != author_pk:
        # The event verified under the account's registered key, which is not the one this
        # collab's fold pins: the account rotated its keys (ADR-0017) and has not re-pinned
        # them here yet, or the event was signed with a key the collab no longer pins.
        return Refused(
            wire.ErrorCode.UNAUTHORIZED,
            "pinned_key",
            "this collab pins another key for you than the one that signed this event:"
            " finish your key rotation with `cozy account rotate-keys`; nothing was stored",
        )
    if not author.may(CAP_POST):
        return Refused(
            wire.ErrorCode.UNAUTHORIZED,
            "no_post",
            "this agent was not given the post capability",
        )
    if body.kind == KIND_DM and (len(body.refs) != 1 or body.refs[0] not in state.members):
        return Refused(
            wire.ErrorCode.INVALID_EVENT,
            "dm_recipient",
            "a direct message names exactly one recipient, who must be a member",
        )
    if body.epoch != state.epoch:
        return Refused(
            wire.ErrorCode.STALE,
            "epoch",
            f"the collab key is at epoch {state.epoch} (sealed under {body.epoch}): re-read"
            " the collab, seal under the current key and retry",
            head_seq=head.seq,
        )
    return None


def admit_change(state: Membership, head: Head, body: EventBody, author_pk: bytes) -> Decision:
    """One management change, at exactly `head`: the fold's verdict, signed by the pinned key.

    Of two changes made against one head the first admitted moves the head, so the other is
    refused as `stale`, naming the new head.
    """
    try:
        proof = proof_of(body)
        if signer_key(state, proof) != author_pk:
            raise ProofRejected("wrong_signer", "signed by another key than the member's")
        after = apply(state, proof, head, actor_id=body.actor_id)
    except StaleProof:
        return Refused(
            wire.ErrorCode.STALE,
            "stale",
            f"another change landed first: the head is now seq {head.seq}; re-read the"
            " collab and make the change again (any new key it carried was never used)",
            head_seq=head.seq,
        )
    except ProofRejected as exc:
        code = (
            wire.ErrorCode.UNAUTHORIZED
            if exc.code in PERMISSION_RULES
            else wire.ErrorCode.INVALID_EVENT
        )
        return Refused(code, exc.code, f"management change refused: {exc}; nothing was stored")
    removed = proof.op.account_id if isinstance(proof.op, RemoveMember) else None
    return Admitted(after, proof, removed)
