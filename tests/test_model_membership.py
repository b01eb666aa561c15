"""The membership fold (SO-5): only human members with the right role change membership, never
the relay; proofs are bound to their collab and head; a collab always keeps an owner; removal
always rotates the key epoch."""

from __future__ import annotations

import hypothesis.strategies as st
import msgspec
import msgspec.inspect
import nacl.public
import nacl.signing
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from model.chain import Head, next_head, start_of
from model.errors import BadSignature
from model.ids import new_id
from model.membership import (
    AddMember,
    ChangeRole,
    MemberKind,
    Membership,
    Operation,
    ProofRejected,
    RemoveMember,
    Role,
    RotateKey,
    StaleProof,
    apply,
    genesis,
    open_proof,
    sign_proof,
)
from tests.helpers import Person

COLLAB = new_id("c")


def _fresh() -> tuple[Person, Membership, Head]:
    owner = Person()
    return owner, genesis(COLLAB, owner.as_member(Role.OWNER)), start_of(COLLAB)


@pytest.mark.objective("SO-5")
def test_a_proof_the_relay_makes_up_does_not_open() -> None:
    owner, state, head = _fresh()
    relay_key = nacl.signing.SigningKey.generate()
    intruder = Person()
    forged = sign_proof(
        relay_key, owner.propose(AddMember(intruder.as_member(Role.OWNER)), head, COLLAB)
    )
    with pytest.raises(BadSignature):
        open_proof(forged, state)
    honest = sign_proof(
        owner.key, owner.propose(AddMember(intruder.as_member(Role.MEMBER)), head, COLLAB)
    )
    tampered = msgspec.structs.replace(honest, body=honest.body.replace(b"member", b"owner\x00"))
    with pytest.raises((BadSignature, ProofRejected)):
        open_proof(tampered, state)
    assert open_proof(honest, state).op == AddMember(intruder.as_member(Role.MEMBER))


@pytest.mark.objective("SO-5")
def test_a_proof_is_bound_to_its_collab_and_its_head() -> None:
    owner, state, head = _fresh()
    bob = Person()
    proof = owner.propose(AddMember(bob.as_member(Role.MEMBER)), head, COLLAB)
    with pytest.raises(ProofRejected, match="wrong_collab"):
        apply(state, owner.propose(AddMember(bob.as_member(Role.MEMBER)), head, new_id("c")), head)
    later = Head(head.seq + 1, next_head(head.chain, b"\x01" * 32))
    with pytest.raises(StaleProof):
        apply(state, proof, later)  # replayed later, or lost a race to a concurrent change
    assert bob.id in apply(state, proof, head).members


@pytest.mark.objective("SO-5")
def test_agents_and_strangers_have_no_management_powers() -> None:
    owner, state, head = _fresh()
    bot, stranger = Person(MemberKind.AGENT), Person()
    state = apply(state, owner.propose(AddMember(bot.as_member(Role.MEMBER)), head, COLLAB), head)
    with pytest.raises(ProofRejected, match="agent_role"):
        apply(
            state,
            owner.propose(
                AddMember(Person(MemberKind.AGENT).as_member(Role.MANAGER)), head, COLLAB
            ),
            head,
        )
    with pytest.raises(ProofRejected, match="agent_signer"):
        apply(state, bot.propose(RotateKey(state.epoch + 1), head, COLLAB), head)
    with pytest.raises(ProofRejected, match="not_a_member"):
        apply(
            state, stranger.propose(AddMember(stranger.as_member(Role.OWNER)), head, COLLAB), head
        )


# --- the state machine --------------------------------------------------------------------------

PERMITTED: dict[str, set[Role]] = {
    # Which signer roles may ever perform each kind of change (narrowed further by the target).
    "add": {Role.OWNER, Role.MANAGER},
    "role": {Role.OWNER},
    "remove": {Role.OWNER, Role.MANAGER, Role.MEMBER},  # members only for themselves
    "rotate": {Role.OWNER, Role.MANAGER},
}


class MembershipMachine(RuleBasedStateMachine):
    """Random signers (members, agents, strangers) propose random changes against random heads.

    Whatever is accepted must have been allowed; whatever is refused leaves the state alone;
    the invariants hold after every step.
    """

    def __init__(self) -> None:
        super().__init__()
        founder = Person()
        self.people = [
            founder,
            *(Person() for _ in range(4)),
            Person(MemberKind.AGENT),
            Person(MemberKind.AGENT),
        ]
        self.state = genesis(COLLAB, founder.as_member(Role.OWNER))
        self.head = start_of(COLLAB)
        self.accepted = 0

    def _propose(self, signer: Person, op: Operation, stale: bool) -> None:
        base = Head(self.head.seq - 1, b"\x00" * 32) if stale else self.head
        signed = sign_proof(signer.key, signer.propose(op, base, COLLAB))
        before = self.state
        try:
            proof = open_proof(signed, self.state)
            after = apply(self.state, proof, self.head)
        except (ProofRejected, BadSignature):
            assert self.state is before
            return
        assert not stale, "a stale proof was accepted"
        signer_member = before.members[signer.id]
        assert signer_member.kind is MemberKind.HUMAN
        kind = msgspec.inspect.type_info(type(op)).tag  # type: ignore[union-attr]
        assert signer_member.role in PERMITTED[kind], f"{signer_member.role} did {kind}"
        if isinstance(op, RemoveMember) and signer_member.role is Role.MEMBER:
            assert op.account_id == signer.id, "a member removed someone else"
        self.state = after
        self.head = Head(
            self.head.seq + 1, next_head(self.head.chain, self.accepted.to_bytes(32, "big"))
        )
        self.accepted += 1

    @rule(
        signer=st.integers(0, 6),
        who=st.integers(0, 6),
        role=st.sampled_from(Role),
        stale=st.booleans(),
    )
    def add(self, signer: int, who: int, role: Role, stale: bool) -> None:
        who = self.people[who]
        self._propose(self.people[signer], AddMember(who.as_member(role)), stale)

    @rule(signer=st.integers(0, 6), who=st.integers(0, 6), role=st.sampled_from(Role))
    def change_role(self, signer: int, who: int, role: Role) -> None:
        self._propose(self.people[signer], ChangeRole(self.people[who].id, role), stale=False)

    @rule(signer=st.integers(0, 6), who=st.integers(0, 6), skew=st.integers(-1, 1))
    def remove(self, signer: int, who: int, skew: int) -> None:
        op = RemoveMember(self.people[who].id, self.state.epoch + 1 + skew)
        epoch_before = self.state.epoch
        self._propose(self.people[signer], op, stale=False)
        if (
            self.people[who].id not in self.state.members
            and skew == 0
            and self.state.epoch != epoch_before
        ):
            assert self.state.epoch == epoch_before + 1

    @rule(signer=st.integers(0, 6), skew=st.integers(-1, 1))
    def rotate(self, signer: int, skew: int) -> None:
        self._propose(self.people[signer], RotateKey(self.state.epoch + 1 + skew), stale=False)

    @invariant()
    def always_an_owner_and_agents_stay_members(self) -> None:
        roles = [m.role for m in self.state.members.values()]
        assert Role.OWNER in roles
        for m in self.state.members.values():
            if m.kind is MemberKind.AGENT:
                assert m.role is Role.MEMBER

    @invariant()
    def keys_are_the_ones_pinned_when_added(self) -> None:
        for person in self.people:
            m = self.state.members.get(person.id)
            if m is not None:
                assert m.sign_pk == bytes(person.key.verify_key)


TestMembershipMachine = pytest.mark.objective("SO-5")(MembershipMachine.TestCase)
TestMembershipMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@pytest.mark.objective("SO-5")
def test_a_typical_life_of_a_collab_folds_as_expected() -> None:
    alice, state, head = _fresh()
    bob, carol, dave = Person(), Person(), Person()

    def step(signer: Person, op: Operation) -> None:
        nonlocal state, head
        proof = open_proof(sign_proof(signer.key, signer.propose(op, head, COLLAB)), state)
        state = apply(state, proof, head)
        head = Head(head.seq + 1, next_head(head.chain, bytes([head.seq]) * 32))

    step(alice, AddMember(bob.as_member(Role.MANAGER)))
    step(bob, AddMember(carol.as_member(Role.MEMBER)))
    with pytest.raises(ProofRejected, match="role"):
        step(bob, AddMember(dave.as_member(Role.MANAGER)))  # managers add plain members only
    with pytest.raises(ProofRejected, match="role"):
        step(carol, RemoveMember(bob.id, state.epoch + 1))  # members only remove themselves
    step(carol, RemoveMember(carol.id, 1))  # leaving rotates the key
    assert (sorted(state.members), state.epoch) == (sorted([alice.id, bob.id]), 1)
    with pytest.raises(ProofRejected, match="epoch"):
        step(alice, RemoveMember(bob.id, 1))  # removal must move to the next epoch
    step(alice, RemoveMember(bob.id, 2))
    with pytest.raises(ProofRejected, match="last_owner"):
        step(alice, RemoveMember(alice.id, 3))
    with pytest.raises(ProofRejected, match="last_owner"):
        step(alice, ChangeRole(alice.id, Role.MEMBER))
    assert [m.account_id for m in state.readers()] == [alice.id]
    assert state.epoch == 2
