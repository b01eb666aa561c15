"""The membership fold (SO-5): only human members with the right role change membership, never
the relay; proofs are bound to their collab and head; a collab always keeps an owner; removal
always rotates the key epoch."""

from __future__ import annotations

import hypothesis.strategies as st
import msgspec
import msgspec.inspect
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from model.chain import Head, next_head, start_of
from model.epochs import new_epoch_key, wrap_for
from model.ids import new_id
from model.membership import (
    AddMember,
    ChangeRole,
    CreateCollab,
    MemberKind,
    Membership,
    Operation,
    ProofRejected,
    RemoveMember,
    Role,
    RotateKey,
    SetCaps,
    SetWitnesses,
    StaleProof,
    WitnessPolicy,
    apply,
)
from model.note import ALG_COSIGNATURE_V1, NoteSigner
from tests.helpers import Person

COLLAB = new_id("c")
KEY = new_epoch_key()


def _fresh() -> tuple[Person, Membership, Head]:
    owner = Person()
    member = owner.as_member(Role.OWNER)
    head = start_of(COLLAB)
    create = owner.propose(CreateCollab(member, wrap_for([member], KEY)), head, COLLAB)
    state = apply(None, create, head, actor_id=owner.id)
    return owner, state, Head(1, next_head(head.chain, b"\x00" * 32))


def add(person: Person, role: Role) -> AddMember:
    member = person.as_member(role)
    return AddMember(member, wrap_for([member], KEY))


def remove(state: Membership, who: str, epoch: int | None = None) -> RemoveMember:
    stay = [m for m in state.readers() if m.account_id != who]
    return RemoveMember(who, state.epoch + 1 if epoch is None else epoch, wrap_for(stay, KEY))


def rotate(state: Membership, epoch: int | None = None) -> RotateKey:
    return RotateKey(state.epoch + 1 if epoch is None else epoch, wrap_for(state.readers(), KEY))


def step(state: Membership, signer: Person, op: Operation, head: Head) -> Membership:
    return apply(state, signer.propose(op, head, COLLAB), head, actor_id=signer.id)


@pytest.mark.objective("SO-5")
def test_a_proof_is_bound_to_its_collab_its_head_and_its_signer() -> None:
    owner, state, head = _fresh()
    bob = Person()
    with pytest.raises(ProofRejected, match="wrong_collab"):
        apply(
            state, owner.propose(add(bob, Role.MEMBER), head, new_id("c")), head, actor_id=owner.id
        )
    later = Head(head.seq + 1, next_head(head.chain, b"\x01" * 32))
    proof = owner.propose(add(bob, Role.MEMBER), head, COLLAB)
    with pytest.raises(StaleProof):
        apply(state, proof, later, actor_id=owner.id)  # replayed later, or lost a race
    with pytest.raises(ProofRejected, match="wrong_signer"):
        apply(state, proof, head, actor_id=bob.id)  # someone else's event carrying it
    assert bob.id in apply(state, proof, head, actor_id=owner.id).members


@pytest.mark.objective("SO-5")
def test_agents_and_strangers_have_no_management_powers() -> None:
    owner, state, head = _fresh()
    bot, stranger = Person(MemberKind.AGENT), Person()
    state = step(state, owner, add(bot, Role.MEMBER), head)
    with pytest.raises(ProofRejected, match="agent_role"):
        step(state, owner, add(Person(MemberKind.AGENT), Role.MANAGER), head)
    with pytest.raises(ProofRejected, match="agent_signer"):
        step(state, bot, rotate(state), head)
    with pytest.raises(ProofRejected, match="not_a_member"):
        step(state, stranger, add(stranger, Role.OWNER), head)


@pytest.mark.objective("SO-7")
def test_wraps_must_address_exactly_the_members_the_fold_names() -> None:
    owner, state, head = _fresh()
    bob, carol = Person(), Person()
    state = step(state, owner, add(bob, Role.MEMBER), head)
    state = step(state, owner, add(carol, Role.MEMBER), head)
    leaky = RemoveMember(carol.id, 1, wrap_for(state.readers(), KEY))  # still wraps for carol
    with pytest.raises(ProofRejected, match="wraps"):
        step(state, owner, leaky, head)
    short = RotateKey(1, wrap_for([state.members[owner.id]], KEY))  # forgets bob and carol
    with pytest.raises(ProofRejected, match="wraps"):
        step(state, owner, short, head)
    extra = AddMember(Person().as_member(Role.MEMBER), wrap_for(state.readers(), KEY))
    with pytest.raises(ProofRejected, match="wraps"):
        step(state, owner, extra, head)
    after = step(state, owner, remove(state, carol.id), head)
    assert (sorted(after.members), after.epoch) == (sorted([owner.id, bob.id]), 1)


@pytest.mark.objective("SO-9")
def test_grants_are_signed_changes_people_hold_only_tool_grants() -> None:
    owner, state, head = _fresh()
    bob, carol, bot = Person(), Person(), Person(MemberKind.AGENT)
    state = step(state, owner, add(bob, Role.MANAGER), head)
    state = step(state, owner, add(carol, Role.MEMBER), head)
    state = step(state, owner, add(bot, Role.MEMBER), head)
    assert not state.members[carol.id].may("tool:raw")  # membership alone: no tool
    assert state.members[carol.id].may("read")
    assert state.members[carol.id].may("post")
    state = step(state, bob, SetCaps(carol.id, ("tool:raw",)), head)  # a manager, a member
    assert state.members[carol.id].may("tool:raw")
    assert not state.members[carol.id].may("tool:b64")
    with pytest.raises(ProofRejected, match="caps"):
        step(state, owner, SetCaps(carol.id, ("read",)), head)  # people read by membership
    with pytest.raises(ProofRejected, match="caps"):
        step(state, owner, SetCaps(carol.id, ("tool:../x",)), head)
    with pytest.raises(ProofRejected, match="role"):
        step(state, carol, SetCaps(carol.id, ("tool:raw", "tool:b64")), head)  # not herself
    with pytest.raises(ProofRejected, match="role"):
        step(state, bob, SetCaps(owner.id, ("tool:raw",)), head)  # managers: plain members only
    with pytest.raises(ProofRejected, match="agent_signer"):
        step(state, bot, SetCaps(bot.id, ("read", "post", "tool:raw")), head)
    with pytest.raises(ProofRejected, match="not_a_member"):
        step(state, owner, SetCaps(Person().id, ("tool:raw",)), head)
    state = step(state, owner, SetCaps(bot.id, ("tool:raw",)), head)  # read and post taken
    assert [state.members[bot.id].may(c) for c in ("read", "post", "tool:raw")] == [
        False,
        False,
        True,
    ]
    state = step(state, owner, SetCaps(carol.id, ()), head)
    assert not state.members[carol.id].may("tool:raw")
    assert state.epoch == 0  # a grant or revocation does not rotate the key


def test_only_owners_set_the_witness_policy_and_it_survives_later_changes() -> None:
    owner, state, head = _fresh()
    bob = Person()
    state = step(state, owner, add(bob, Role.MANAGER), head)
    w1, w2 = (
        NoteSigner(f"witness.example/w{i}", bytes([i]) * 32, ALG_COSIGNATURE_V1) for i in (1, 2)
    )
    vkeys = (w1.verifier.vkey(), w2.verifier.vkey())
    with pytest.raises(ProofRejected, match="role"):
        step(state, bob, SetWitnesses(1, vkeys), head)  # a manager cannot change who confirms
    state = step(state, owner, SetWitnesses(2, vkeys), head)
    assert state.witnesses == WitnessPolicy(2, vkeys)
    for bad in (
        SetWitnesses(3, vkeys),  # more than listed
        SetWitnesses(0, vkeys),  # a policy needs at least one
        SetWitnesses(1, ("not a key",)),
        SetWitnesses(1, (vkeys[0], vkeys[0])),  # one witness named twice
        SetWitnesses(1, (NoteSigner("log", bytes(32)).verifier.vkey(),)),  # a log key (0x01)
    ):
        with pytest.raises(ProofRejected, match="witnesses"):
            step(state, owner, bad, head)
    # Removing a member and rotating keep the policy; an empty one removes it.
    state = step(state, owner, remove(state, bob.id), head)
    state = step(state, owner, rotate(state), head)
    assert state.witnesses == WitnessPolicy(2, vkeys)
    assert step(state, owner, SetWitnesses(0, ()), head).witnesses is None


# --- the state machine --------------------------------------------------------------------------

PERMITTED: dict[str, set[Role]] = {
    # Which signer roles may ever perform each kind of change (narrowed further by the target).
    "add": {Role.OWNER, Role.MANAGER},
    "role": {Role.OWNER},
    "remove": {Role.OWNER, Role.MANAGER},
    "rotate": {Role.OWNER, Role.MANAGER},
    "caps": {Role.OWNER, Role.MANAGER},
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
        head = start_of(COLLAB)
        member = founder.as_member(Role.OWNER)
        create = founder.propose(CreateCollab(member, wrap_for([member], KEY)), head, COLLAB)
        self.state = apply(None, create, head, actor_id=founder.id)
        self.head = Head(1, next_head(head.chain, b"\x00" * 32))
        self.accepted = 0

    def _propose(self, signer: Person, op: Operation, stale: bool) -> None:
        base = Head(self.head.seq - 1, b"\x00" * 32) if stale else self.head
        before = self.state
        try:
            after = apply(
                self.state, signer.propose(op, base, COLLAB), self.head, actor_id=signer.id
            )
        except ProofRejected:
            assert self.state is before
            return
        assert not stale, "a stale proof was accepted"
        signer_member = before.members[signer.id]
        assert signer_member.kind is MemberKind.HUMAN
        kind = msgspec.inspect.type_info(type(op)).tag  # type: ignore[union-attr]
        assert signer_member.role in PERMITTED[kind], f"{signer_member.role} did {kind}"
        if isinstance(op, RemoveMember):
            assert op.account_id != signer.id, "someone removed themselves"
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
        self._propose(self.people[signer], add(who, role), stale)

    @rule(signer=st.integers(0, 6), who=st.integers(0, 6), role=st.sampled_from(Role))
    def change_role(self, signer: int, who: int, role: Role) -> None:
        self._propose(self.people[signer], ChangeRole(self.people[who].id, role), stale=False)

    @rule(signer=st.integers(0, 6), who=st.integers(0, 6), skew=st.integers(-1, 1))
    def remove(self, signer: int, who: int, skew: int) -> None:
        op = remove(self.state, self.people[who].id, self.state.epoch + 1 + skew)
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
        self._propose(
            self.people[signer], rotate(self.state, self.state.epoch + 1 + skew), stale=False
        )

    @rule(
        signer=st.integers(0, 6),
        who=st.integers(0, 6),
        caps=st.lists(st.sampled_from(["read", "post", "tool:raw", "tool:b64"]), unique=True),
    )
    def set_caps(self, signer: int, who: int, caps: list[str]) -> None:
        target = self.state.members.get(self.people[who].id)
        self._propose(self.people[signer], SetCaps(self.people[who].id, tuple(caps)), stale=False)
        after = self.state.members.get(self.people[who].id)
        if target is not None and after is not None and after.caps != target.caps:
            signer_member = self.state.members[self.people[signer].id]
            assert signer_member.role is Role.OWNER or target.role is Role.MEMBER

    @invariant()
    def people_hold_only_tool_grants(self) -> None:
        for m in self.state.members.values():
            if m.kind is MemberKind.HUMAN:
                assert all(c.startswith("tool:") for c in m.caps)
                assert m.may("read")
                assert m.may("post")

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

    def do(signer: Person, op: Operation) -> None:
        nonlocal state, head
        state = step(state, signer, op, head)
        head = Head(head.seq + 1, next_head(head.chain, bytes([head.seq]) * 32))

    do(alice, add(bob, Role.MANAGER))
    do(bob, add(carol, Role.MEMBER))
    with pytest.raises(ProofRejected, match="role"):
        do(bob, add(dave, Role.MANAGER))  # managers add plain members only
    with pytest.raises(ProofRejected, match="role"):
        do(carol, remove(state, bob.id))  # plain members remove nobody
    with pytest.raises(ProofRejected, match="self_removal"):
        do(carol, remove(state, carol.id))  # a leaver would know the key meant to exclude them
    do(bob, remove(state, carol.id))
    assert (sorted(state.members), state.epoch) == (sorted([alice.id, bob.id]), 1)
    with pytest.raises(ProofRejected, match="epoch"):
        do(alice, remove(state, bob.id, 1))  # removal must move to the next epoch
    do(alice, remove(state, bob.id))
    with pytest.raises(ProofRejected, match="last_owner"):
        do(alice, ChangeRole(alice.id, Role.MEMBER))
    assert [m.account_id for m in state.readers()] == [alice.id]
    assert state.epoch == 2
