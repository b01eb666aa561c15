"""Collab membership as a pure fold over signed management proofs (SO-5).

The relay must not be able to grant itself power: if it could add a member, clients would wrap
the next collab key for whoever it named. So every change — add a member, change a role, remove
a member, rotate the key — is a `Proof` signed by a *human* member's account key, and both the
relay (to authorize and route) and every client (to verify) fold the same proofs with the same
code, here. A proof names the collab and the head (seq + chain hash) it was made against, so it
cannot be replayed into another collab or later in the same one; of two concurrent changes made
against the same head, the first the sequencer accepts wins and the other is stale (as in MLS,
RFC 9420 §14).

Members' public keys are pinned *in the proofs* that add them, so a client verifying a proof or
an event never has to trust the relay's account directory for a member's key.

Not wired into the relay or the client kit yet (issue 4): this module is the shared rulebook.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

import msgspec

from model import _crypto
from model.errors import DECODE_ERRORS, BadSignature, ModelError
from model.ids import is_id

if TYPE_CHECKING:
    import nacl.signing

    from model.chain import Head

PROOF_VERSION: Final = 1
DOMAIN_MANAGEMENT: Final = b"cozylabs/v1/management-proof\x00"


class Role(enum.StrEnum):
    OWNER = "owner"
    MANAGER = "manager"
    MEMBER = "member"


class MemberKind(enum.StrEnum):
    HUMAN = "human"
    AGENT = "agent"


class Member(msgspec.Struct, frozen=True):
    account_id: str
    role: Role
    kind: MemberKind
    sign_pk: bytes
    box_pk: bytes


# --- operations -------------------------------------------------------------------------------


class AddMember(msgspec.Struct, frozen=True, tag="add"):
    member: Member


class ChangeRole(msgspec.Struct, frozen=True, tag="role"):
    account_id: str
    role: Role


class RemoveMember(msgspec.Struct, frozen=True, tag="remove"):
    """Removal always rotates: `new_epoch` must be the current epoch + 1."""

    account_id: str
    new_epoch: int


class RotateKey(msgspec.Struct, frozen=True, tag="rotate"):
    new_epoch: int


Operation = AddMember | ChangeRole | RemoveMember | RotateKey


class Proof(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A management change, made by `signer_id` against the head (`base_seq`, `base_chain`)."""

    v: int
    collab_id: str
    signer_id: str
    base_seq: int
    base_chain: bytes
    op: Operation


class SignedProof(msgspec.Struct, frozen=True, array_like=True):
    body: bytes
    sig: bytes


class ProofRejected(ModelError):
    """The proof is not acceptable in this membership state. `code` names the rule."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class StaleProof(ProofRejected):
    """Made against another head than the one it would follow (replayed, or lost a race)."""


class Membership(msgspec.Struct, frozen=True):
    """Who is in a collab, with which role, under which key epoch."""

    collab_id: str
    members: dict[str, Member]
    epoch: int

    def role_of(self, account_id: str) -> Role | None:
        m = self.members.get(account_id)
        return None if m is None else m.role

    def readers(self) -> list[Member]:
        """Everyone the current epoch key must be wrapped for (humans and agents)."""
        return sorted(self.members.values(), key=lambda m: m.account_id)


_encoder = msgspec.msgpack.Encoder()
_proof_decoder = msgspec.msgpack.Decoder(Proof)


def genesis(collab_id: str, owner: Member) -> Membership:
    """The state right after collab creation: its creator as the only owner, epoch 0."""
    if owner.kind is not MemberKind.HUMAN or owner.role is not Role.OWNER:
        raise ProofRejected("bad_genesis", "a collab is created by a human who becomes its owner")
    return Membership(collab_id=collab_id, members={owner.account_id: owner}, epoch=0)


def sign_proof(signing_key: nacl.signing.SigningKey, proof: Proof) -> SignedProof:
    body = _encoder.encode(proof)
    return SignedProof(body=body, sig=_crypto.sign(signing_key, DOMAIN_MANAGEMENT + body))


def open_proof(signed: SignedProof, state: Membership) -> Proof:
    """Decode a proof and check its signature against the *member's pinned key* in `state`.

    Raises `ProofRejected` for a non-member signer or a malformed proof, and `BadSignature`
    when the signature does not hold — including any proof the relay made up.
    """
    try:
        proof = _proof_decoder.decode(signed.body)
    except DECODE_ERRORS:
        raise ProofRejected("malformed", "the proof does not decode") from None
    if proof.v != PROOF_VERSION:
        raise ProofRejected("malformed", f"proof version {proof.v} is not supported")
    signer = state.members.get(proof.signer_id)
    if signer is None:
        raise ProofRejected("not_a_member", "the signer is not a member of this collab")
    if not _crypto.verify(signer.sign_pk, DOMAIN_MANAGEMENT + signed.body, signed.sig):
        raise BadSignature("the proof is not signed by the member's key")
    if _encoder.encode(proof) != signed.body:
        raise ProofRejected("malformed", "the proof is not in canonical encoding")
    return proof


def apply(state: Membership, proof: Proof, placed_after: Head) -> Membership:
    """The membership after `proof`, which the ledger placed right after `placed_after`.

    Raises `StaleProof` if the proof was made against another head, and `ProofRejected`
    naming the rule for anything the signer may not do. Pure: `state` is not modified.
    """
    if proof.collab_id != state.collab_id:
        raise ProofRejected("wrong_collab", "the proof was made for another collab")
    if (proof.base_seq, proof.base_chain) != (placed_after.seq, placed_after.chain):
        raise StaleProof(
            "stale", f"made against seq {proof.base_seq}, but the head is {placed_after.seq}"
        )
    signer = state.members.get(proof.signer_id)
    if signer is None:
        raise ProofRejected("not_a_member", "the signer is not a member of this collab")
    if signer.kind is not MemberKind.HUMAN:
        raise ProofRejected("agent_signer", "agents have no management powers")
    members = dict(state.members)
    match proof.op:
        case AddMember(member=new):
            _require(
                signer.role in (Role.OWNER, Role.MANAGER),
                "role",
                "only owners and managers add members",
            )
            _require(
                new.account_id not in members, "already_member", "that account is a member already"
            )
            _require(is_id(new.account_id, "a"), "malformed", "the new member's id is malformed")
            _require(
                len(new.sign_pk) == 32 and len(new.box_pk) == 32, "malformed", "bad public keys"
            )
            if signer.role is Role.MANAGER:
                _require(
                    new.role is Role.MEMBER, "role", "managers add members, not owners or managers"
                )
            if new.kind is MemberKind.AGENT:
                _require(new.role is Role.MEMBER, "agent_role", "agents can only be plain members")
            members[new.account_id] = new
            return msgspec.structs.replace(state, members=members)
        case ChangeRole(account_id=target, role=role):
            _require(signer.role is Role.OWNER, "role", "only owners change roles")
            current = members.get(target)
            _require(current is not None, "not_a_member", "that account is not a member")
            assert current is not None
            _require(
                current.kind is MemberKind.HUMAN, "agent_role", "agents can only be plain members"
            )
            members[target] = msgspec.structs.replace(current, role=role)
            _require(_owners(members) > 0, "last_owner", "a collab always keeps an owner")
            return msgspec.structs.replace(state, members=members)
        case RemoveMember(account_id=target, new_epoch=epoch):
            current = members.get(target)
            _require(current is not None, "not_a_member", "that account is not a member")
            assert current is not None
            leaving = target == signer.account_id
            allowed = (
                leaving
                or signer.role is Role.OWNER
                or (signer.role is Role.MANAGER and current.role is Role.MEMBER)
            )
            _require(
                allowed, "role", "owners remove anyone, managers remove members, anyone can leave"
            )
            _require(
                epoch == state.epoch + 1, "epoch", f"removal must rotate to epoch {state.epoch + 1}"
            )
            del members[target]
            _require(_owners(members) > 0, "last_owner", "a collab always keeps an owner")
            return Membership(collab_id=state.collab_id, members=members, epoch=epoch)
        case RotateKey(new_epoch=epoch):
            _require(
                signer.role in (Role.OWNER, Role.MANAGER),
                "role",
                "only owners and managers rotate the key",
            )
            _require(
                epoch == state.epoch + 1, "epoch", f"rotation must go to epoch {state.epoch + 1}"
            )
            return msgspec.structs.replace(state, epoch=epoch)
    raise ProofRejected("malformed", "unknown operation")  # pragma: no cover — exhaustive match


def _owners(members: dict[str, Member]) -> int:
    return sum(1 for m in members.values() if m.role is Role.OWNER)


def _require(condition: bool, code: str, message: str) -> None:
    if not condition:
        raise ProofRejected(code, message)
