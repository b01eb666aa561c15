"""Collab membership as a pure fold over signed management events (SO-5, SO-7).

The relay must not be able to grant itself power: if it could add a member, clients would wrap
the next collab key for whoever it named. So every change — create the collab, add a member,
change a role, remove a member, rotate the key — is a `Proof` carried in plaintext by a `mgmt`
event that a *human* member signs with their account key (ADR-0010). The relay (to authorize
and route) and every client (to verify) fold the same proofs with the same code, here.

A proof names the collab and the head (seq + chain hash) it was made against, and it must be
placed by the ledger right after that head, so it cannot be replayed into another collab or
later in the same one; of two concurrent changes made against one head the sequencer accepts
the first and the other is stale (as in MLS, RFC 9420 §14).

Members' public keys are pinned *in the proofs* that add them (the owner's in the genesis
proof), so whoever verifies an event or a proof never needs the relay's account directory. A
member re-pins their *own* keys with a `rekey` proof (`cozy account rotate-keys`, ADR-0017):
signed by the key pinned so far, carrying the new signing key's proof of possession, and
rotating the epoch so the old box key opens nothing sealed after it. Nobody re-pins anyone
else: the operation has no target, it always re-pins its signer. From the `rekey` on, events
and proofs signed by the old key do not verify (the fold pins only the new one).

Key epochs: every proof that changes who may read carries the epoch key wrapped for exactly the
right readers — the genesis and every rotation for all readers of the resulting state, an
addition for the new member only (who then reads the current epoch, not earlier ones). The fold
checks the *recipient set* against the verified membership, so the relay refuses, and every
client rejects, a removal that still wraps the next key for the removed member.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING, Final

import msgspec

from model.envelope import EVENT_VERSION, KIND_MANAGEMENT, EventBody, SignedEvent, sign_body
from model.errors import DECODE_ERRORS, ModelError
from model.ids import is_id
from model.note import ALG_COSIGNATURE_V1, NoteError, NoteVerifier
from model.proofs import KeyPair, verify_collab_rekey

if TYPE_CHECKING:
    import nacl.signing

    from model.chain import Head

PROOF_VERSION: Final = 1
MAX_MEMBERS: Final = 1000
MAX_CAPS: Final = 32
MAX_WITNESSES: Final = 16


class Role(enum.StrEnum):
    OWNER = "owner"
    MANAGER = "manager"
    MEMBER = "member"


class MemberKind(enum.StrEnum):
    HUMAN = "human"
    AGENT = "agent"


class Member(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    account_id: str
    role: Role
    kind: MemberKind
    sign_pk: bytes
    box_pk: bytes
    # What the member was granted, in the signed `add` proof and later `caps` proofs, so the
    # relay cannot widen it: an agent's `read`, `post` and `tool:NAME`; a person's `tool:NAME`
    # only (people read and post by membership). Every tool needs its grant, for people too.
    caps: tuple[str, ...] = ()

    def may(self, capability: str) -> bool:
        if capability.startswith(CAP_TOOL_PREFIX):
            return capability in self.caps
        return self.kind is MemberKind.HUMAN or capability in self.caps


CAP_READ: Final = "read"
CAP_POST: Final = "post"
CAP_TOOL_PREFIX: Final = "tool:"
_TOOL_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def valid_cap(cap: str) -> bool:
    return cap in (CAP_READ, CAP_POST) or (
        cap.startswith(CAP_TOOL_PREFIX) and bool(_TOOL_NAME.fullmatch(cap[len(CAP_TOOL_PREFIX) :]))
    )


# --- operations -------------------------------------------------------------------------------
# `wraps` maps account id → sealed box (model/epochs.py) of an epoch key. They travel inside the
# signed event, so nobody but the signer can add, drop or move one.


class CreateCollab(msgspec.Struct, frozen=True, tag="create", forbid_unknown_fields=True):
    """The genesis proof (seq 1): the signer becomes the owner; epoch 0 begins."""

    owner: Member
    wraps: dict[str, bytes]


class AddMember(msgspec.Struct, frozen=True, tag="add", forbid_unknown_fields=True):
    """Adds `member`; `wraps` holds the *current* epoch key for the new member only."""

    member: Member
    wraps: dict[str, bytes]


class ChangeRole(msgspec.Struct, frozen=True, tag="role", forbid_unknown_fields=True):
    account_id: str
    role: Role


class SetCaps(msgspec.Struct, frozen=True, tag="caps", forbid_unknown_fields=True):
    """Replaces a member's capabilities with `caps` (a grant or a revocation): an agent's `read`,
    `post` and `tool:NAME`, a person's `tool:NAME` only. Owners change anyone's, managers plain
    members'. It does not rotate the key: an agent whose `read` is taken away keeps the current
    epoch key it already holds (remove it to shut it out)."""

    account_id: str
    caps: tuple[str, ...]


class SetWitnesses(msgspec.Struct, frozen=True, tag="witnesses", forbid_unknown_fields=True):
    """The collab's witness policy (issue 16, docs/witness.md): members accept a checkpoint of
    this collab only when at least `quorum` of the witnesses named by `vkeys` (C2SP verifier key
    strings, type 0x04 cosignature/v1) cosigned it. Owners only: the policy decides which views
    members can be shown. `quorum` 0 with no keys removes the policy."""

    quorum: int
    vkeys: tuple[str, ...]


class RemoveMember(msgspec.Struct, frozen=True, tag="remove", forbid_unknown_fields=True):
    """Removal always rotates: `new_epoch` is the current epoch + 1, wrapped for who stays."""

    account_id: str
    new_epoch: int
    wraps: dict[str, bytes]


class RotateKey(msgspec.Struct, frozen=True, tag="rotate", forbid_unknown_fields=True):
    new_epoch: int
    wraps: dict[str, bytes]


class RekeyMember(msgspec.Struct, frozen=True, tag="rekey", forbid_unknown_fields=True):
    """The signer re-pins their own keys: `sign_pk`/`box_pk` replace `old_sign_pk` (which must be
    the pinned key, and signs the event). `possession` is the new signing key's signature over
    `model.proofs.collab_rekey_bytes`. A rekey always rotates: `new_epoch` is the current epoch
    + 1, wrapped for every member, the signer's wrap sealed to the new box key."""

    old_sign_pk: bytes
    sign_pk: bytes
    box_pk: bytes
    possession: bytes
    new_epoch: int
    wraps: dict[str, bytes]

    def __repr__(self) -> str:
        return f"RekeyMember(new_epoch={self.new_epoch})"


Operation = (
    CreateCollab | AddMember | ChangeRole | RemoveMember | RotateKey | RekeyMember | SetCaps
    | SetWitnesses
)  # fmt: skip


class Proof(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A management change, made by `signer_id` against the head (`base_seq`, `base_chain`)."""

    v: int
    collab_id: str
    signer_id: str
    base_seq: int
    base_chain: bytes
    op: Operation

    def __repr__(self) -> str:
        return f"Proof({type(self.op).__name__} by {self.signer_id} at {self.base_seq})"


class ProofRejected(ModelError):
    """The proof is not acceptable in this membership state. `code` names the rule."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class StaleProof(ProofRejected):
    """Made against another head than the one it would follow (replayed, or lost a race)."""


class WitnessPolicy(msgspec.Struct, frozen=True, array_like=True):
    """`quorum` of these witnesses must cosign a checkpoint before a member accepts it."""

    quorum: int
    vkeys: tuple[str, ...]

    def verifiers(self) -> list[NoteVerifier]:
        return [NoteVerifier.from_vkey(v) for v in self.vkeys]


class Membership(msgspec.Struct, frozen=True):
    """Who is in a collab, with which role, under which key epoch, and its witness policy."""

    collab_id: str
    members: dict[str, Member]
    epoch: int
    witnesses: WitnessPolicy | None = None

    def role_of(self, account_id: str) -> Role | None:
        m = self.members.get(account_id)
        return None if m is None else m.role

    def readers(self) -> list[Member]:
        """Everyone the current epoch key must be wrapped for (humans and agents)."""
        return sorted(self.members.values(), key=lambda m: m.account_id)


_encoder = msgspec.msgpack.Encoder()
_proof_decoder = msgspec.msgpack.Decoder(Proof)


def encode_proof(proof: Proof) -> bytes:
    return _encoder.encode(proof)


def decode_proof(data: bytes) -> Proof:
    """Strictly decode a proof. Raises `ProofRejected("malformed")` on anything else."""
    try:
        proof = _proof_decoder.decode(data)
    except DECODE_ERRORS:
        raise ProofRejected("malformed", "the proof does not decode") from None
    if proof.v != PROOF_VERSION:
        raise ProofRejected("malformed", f"proof version {proof.v} is not supported")
    if _encoder.encode(proof) != data:
        raise ProofRejected("malformed", "the proof is not in canonical encoding")
    return proof


def management_event(signing_key: nacl.signing.SigningKey, proof: Proof, *, ts: int) -> SignedEvent:
    """The `mgmt` event that carries `proof`: its signature by the signer *is* the proof's."""
    body = EventBody(
        EVENT_VERSION, proof.collab_id, proof.signer_id, KIND_MANAGEMENT, ts, (), b"",
        encode_proof(proof),
    )  # fmt: skip
    return sign_body(signing_key, body)


def proof_of(body: EventBody) -> Proof:
    """The proof a `mgmt` event body carries, bound to the event's collab."""
    proof = decode_proof(body.ciphertext)
    if proof.collab_id != body.collab_id:
        raise ProofRejected("wrong_collab", "the proof was made for another collab")
    return proof


def signer_key(state: Membership | None, proof: Proof) -> bytes:
    """The key the event carrying `proof` must be signed with: the signer's *pinned* key.

    The genesis proof is self-certifying (signed by the owner key it pins); every later proof
    is signed by a key an earlier proof pinned. Raises `ProofRejected` for anyone else.
    """
    if state is None:
        if not isinstance(proof.op, CreateCollab):
            raise ProofRejected("not_a_member", "a collab's first event must create it")
        return proof.op.owner.sign_pk
    signer = state.members.get(proof.signer_id)
    if signer is None:
        raise ProofRejected("not_a_member", "the signer is not a member of this collab")
    return signer.sign_pk


def apply(
    state: Membership | None, proof: Proof, placed_after: Head, *, actor_id: str
) -> Membership:
    """The membership after `proof`, which the ledger placed right after `placed_after`.

    `state` is None before the genesis proof. `actor_id` is the signed event's author, which
    must be the proof's signer. Raises `StaleProof` if the proof was made against another head,
    and `ProofRejected` naming the rule for anything the signer may not do. Pure.
    """
    if proof.signer_id != actor_id:
        raise ProofRejected("wrong_signer", "the proof names another signer than its event")
    if (proof.base_seq, proof.base_chain) != (placed_after.seq, placed_after.chain):
        raise StaleProof(
            "stale", f"made against seq {proof.base_seq}, but the head is {placed_after.seq}"
        )
    if state is None:
        return _genesis(proof)
    if proof.collab_id != state.collab_id:
        raise ProofRejected("wrong_collab", "the proof was made for another collab")
    signer = state.members.get(proof.signer_id)
    if signer is None:
        raise ProofRejected("not_a_member", "the signer is not a member of this collab")
    if signer.kind is not MemberKind.HUMAN:
        raise ProofRejected("agent_signer", "agents have no management powers")
    members = dict(state.members)
    match proof.op:
        case CreateCollab():
            raise ProofRejected("exists", "the collab exists already")
        case AddMember(member=new, wraps=wraps):
            _require(
                signer.role in (Role.OWNER, Role.MANAGER),
                "role",
                "only owners and managers add members",
            )
            _require(
                new.account_id not in members, "already_member", "that account is a member already"
            )
            _check_member(new)
            _require(
                len(members) < MAX_MEMBERS, "full", f"a collab has at most {MAX_MEMBERS} members"
            )
            if signer.role is Role.MANAGER:
                _require(
                    new.role is Role.MEMBER, "role", "managers add members, not owners or managers"
                )
            if new.kind is MemberKind.AGENT:
                _require(new.role is Role.MEMBER, "agent_role", "agents can only be plain members")
            _require_wraps(wraps, {new.account_id}, "the current key, for the new member only")
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
        case SetCaps(account_id=target, caps=caps):
            current = members.get(target)
            _require(current is not None, "not_a_member", "that account is not a member")
            assert current is not None
            _require(
                signer.role is Role.OWNER
                or (signer.role is Role.MANAGER and current.role is Role.MEMBER),
                "role",
                "owners change anyone's capabilities, managers plain members'",
            )
            _check_caps(current.kind, caps)
            members[target] = msgspec.structs.replace(current, caps=caps)
            return msgspec.structs.replace(state, members=members)
        case SetWitnesses(quorum=quorum, vkeys=vkeys):
            _require(signer.role is Role.OWNER, "role", "only owners set the witness policy")
            return msgspec.structs.replace(state, witnesses=witness_policy(quorum, vkeys))
        case RemoveMember(account_id=target, new_epoch=epoch, wraps=wraps):
            current = members.get(target)
            _require(current is not None, "not_a_member", "that account is not a member")
            assert current is not None
            # Whoever removes draws the next key, so nobody removes themselves: a leaver would
            # know the key meant to shut them out. Ask an owner or manager instead.
            _require(
                target != signer.account_id,
                "self_removal",
                "you cannot remove yourself; an owner or manager removes you and rotates",
            )
            _require(
                signer.role is Role.OWNER
                or (signer.role is Role.MANAGER and current.role is Role.MEMBER),
                "role",
                "owners remove anyone, managers remove plain members",
            )
            _require(
                epoch == state.epoch + 1, "epoch", f"removal must rotate to epoch {state.epoch + 1}"
            )
            del members[target]
            _require_wraps(wraps, set(members), "the next key, for exactly the remaining members")
            return msgspec.structs.replace(state, members=members, epoch=epoch)
        case RotateKey(new_epoch=epoch, wraps=wraps):
            _require(
                signer.role in (Role.OWNER, Role.MANAGER),
                "role",
                "only owners and managers rotate the key",
            )
            _require(
                epoch == state.epoch + 1, "epoch", f"rotation must go to epoch {state.epoch + 1}"
            )
            _require_wraps(wraps, set(members), "the next key, for exactly the members")
            return msgspec.structs.replace(state, epoch=epoch)
        case RekeyMember():
            return _rekey(state, signer, proof.op)
    raise ProofRejected("malformed", "unknown operation")  # pragma: no cover — exhaustive match


def _rekey(state: Membership, signer: Member, op: RekeyMember) -> Membership:
    """`signer` re-pins their own keys (any human member may; nobody may for someone else)."""
    _require(
        op.old_sign_pk == signer.sign_pk,
        "rekey_old_key",
        "a rekey replaces the signing key pinned for its signer, and is signed by it",
    )
    _require(len(op.sign_pk) == 32 and len(op.box_pk) == 32, "malformed", "bad public keys")
    _require(
        op.sign_pk != signer.sign_pk and op.box_pk != signer.box_pk,
        "rekey_same_key",
        "a rekey replaces both keys with new ones",
    )
    _require(
        all(
            op.sign_pk != m.sign_pk and op.box_pk != m.box_pk
            for m in state.members.values()
            if m.account_id != signer.account_id
        ),
        "rekey_key_in_use",
        "another member's key cannot be pinned for you",
    )
    old, new = KeyPair(signer.sign_pk, signer.box_pk), KeyPair(op.sign_pk, op.box_pk)
    _require(
        verify_collab_rekey(state.collab_id, signer.account_id, old, new, op.possession),
        "rekey_possession",
        "the new signing key must sign the rekey (proof of possession)",
    )
    _require(
        op.new_epoch == state.epoch + 1,
        "epoch",
        f"a rekey must rotate the key to epoch {state.epoch + 1}",
    )
    members = dict(state.members)
    members[signer.account_id] = msgspec.structs.replace(
        signer, sign_pk=op.sign_pk, box_pk=op.box_pk
    )
    _require_wraps(op.wraps, set(members), "the next key, for exactly the members")
    return msgspec.structs.replace(state, members=members, epoch=op.new_epoch)


def witness_policy(quorum: int, vkeys: tuple[str, ...]) -> WitnessPolicy | None:
    """The policy a `witnesses` op sets (None: no policy). Raises `ProofRejected("witnesses")`."""
    if quorum == 0 and not vkeys:
        return None
    _require(
        len(vkeys) <= MAX_WITNESSES and 1 <= quorum <= len(vkeys),
        "witnesses",
        f"a witness policy is k of at most {MAX_WITNESSES} witness keys, 1 <= k <= their number",
    )
    try:
        verifiers = [NoteVerifier.from_vkey(v) for v in vkeys]
    except (NoteError, ValueError):
        raise ProofRejected("witnesses", "a witness key is not a verifier key string") from None
    _require(
        all(v.alg == ALG_COSIGNATURE_V1 for v in verifiers),
        "witnesses",
        "witness keys are cosignature/v1 (type 0x04) verifier keys",
    )
    _require(
        len({v.name for v in verifiers}) == len(verifiers),
        "witnesses",
        "each witness is named once",
    )
    return WitnessPolicy(quorum, tuple(v.vkey() for v in verifiers))


def _genesis(proof: Proof) -> Membership:
    if not isinstance(proof.op, CreateCollab):
        raise ProofRejected("not_a_member", "a collab's first event must create it")
    owner = proof.op.owner
    _require(is_id(proof.collab_id, "c"), "malformed", "the collab id is malformed")
    _require(owner.account_id == proof.signer_id, "bad_genesis", "the creator becomes the owner")
    _require(
        owner.kind is MemberKind.HUMAN and owner.role is Role.OWNER,
        "bad_genesis",
        "a collab is created by a human who becomes its owner",
    )
    _check_member(owner)
    _require_wraps(proof.op.wraps, {owner.account_id}, "epoch 0's key, for the owner")
    return Membership(collab_id=proof.collab_id, members={owner.account_id: owner}, epoch=0)


def _check_member(m: Member) -> None:
    _require(is_id(m.account_id, "a"), "malformed", "the member's id is malformed")
    _require(len(m.sign_pk) == 32 and len(m.box_pk) == 32, "malformed", "bad public keys")
    _check_caps(m.kind, m.caps)


def _check_caps(kind: MemberKind, caps: tuple[str, ...]) -> None:
    _require(
        len(caps) <= MAX_CAPS and len(set(caps)) == len(caps) and all(map(valid_cap, caps)),
        "caps",
        f"capabilities are `read`, `post` and `tool:NAME`, each at most once, at most {MAX_CAPS}",
    )
    _require(
        kind is MemberKind.AGENT or all(c.startswith(CAP_TOOL_PREFIX) for c in caps),
        "caps",
        "people read and post by membership: grant them only `tool:NAME` capabilities",
    )


def _require_wraps(wraps: dict[str, bytes], expected: set[str], what: str) -> None:
    _require(set(wraps) == expected, "wraps", f"the wraps must carry {what}")


def _owners(members: dict[str, Member]) -> int:
    return sum(1 for m in members.values() if m.role is Role.OWNER)


def _require(condition: bool, code: str, message: str) -> None:
    if not condition:
        raise ProofRejected(code, message)
