"""The sequencer's admission rules (model/admission.py) against an independent model of them.

A hypothesis state machine plays a collab's life at the sequencer: members, removed members,
strangers, and agents with and without `post` submit content, direct messages and management
changes (adds, removals, rotations, role changes, capability grants and revocations, rekeys) —
at the right and wrong key epochs, against fresh and stale heads, signed with the pinned key or
another. The machine keeps its own plain model of who is in the collab (a dict of account id →
kind, role, capabilities and pinned key, and an epoch number), predicts for every event whether
it is admitted or which typed refusal it gets, and checks `admit` against that prediction; after
every step the membership the admission rules carry equals the model.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import hypothesis.strategies as st
import nacl.public
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from model import wire
from model.admission import Admitted, Refused, Stored, admit, identify
from model.chain import Head, next_head, start_of
from model.envelope import EVENT_VERSION, KIND_DM, KIND_MANAGEMENT, EventBody
from model.epochs import new_epoch_key, wrap_for
from model.ids import new_id
from model.membership import (
    AddMember,
    ChangeRole,
    CreateCollab,
    MemberKind,
    Membership,
    Operation,
    RekeyMember,
    RemoveMember,
    Role,
    RotateKey,
    SetCaps,
    apply,
    encode_proof,
)
from model.proofs import KeyPair, sign_collab_rekey
from tests.helpers import TS0, Person

COLLAB = new_id("c")
KEY = new_epoch_key()
CAPS = st.sets(st.sampled_from(["read", "post", "tool:deploy"])).map(lambda s: tuple(sorted(s)))

RARELY = st.integers(0, 4).map(lambda n: n == 0)

UNAUTHORIZED = wire.ErrorCode.UNAUTHORIZED
INVALID = wire.ErrorCode.INVALID_EVENT
STALE = wire.ErrorCode.STALE

# What the model predicts: None (admitted) or the refusal's (code, rule).
Expected = tuple[wire.ErrorCode, str] | None


@dataclass
class Seat:
    """The model's record of one member: plain values, nothing from model/membership.py."""

    kind: str  # "human" | "agent"
    role: str  # "owner" | "manager" | "member"
    caps: frozenset[str]
    sign_pk: bytes  # the key the model expects the collab to pin for them


def content_body(
    author: str, *, kind: str = "msg", refs: tuple[str, ...] = (), epoch: int = 0
) -> EventBody:
    return EventBody(
        EVENT_VERSION, COLLAB, author, kind, TS0, refs, secrets.token_bytes(24), b"sealed", epoch
    )


def change_body(signer: Person, op: Operation, base: Head, collab: str = COLLAB) -> EventBody:
    proof = signer.propose(op, base, collab)
    return EventBody(
        EVENT_VERSION, collab, signer.id, KIND_MANAGEMENT, TS0, (), b"", encode_proof(proof)
    )


class AdmissionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.people = [
            Person(),
            *(Person() for _ in range(3)),
            *(Person(MemberKind.AGENT) for _ in range(4)),
        ]
        self.by_id = {p.id: p for p in self.people}
        founder = self.people[0]
        owner = founder.as_member(Role.OWNER)
        genesis = founder.propose(
            CreateCollab(owner, wrap_for([owner], KEY)), start_of(COLLAB), COLLAB
        )
        self.state: Membership = apply(None, genesis, start_of(COLLAB), actor_id=founder.id)
        self.heads = [start_of(COLLAB)]
        self._advance()
        # The independent model.
        self.seats: dict[str, Seat] = {
            founder.id: Seat("human", "owner", frozenset(), bytes(founder.key.verify_key))
        }
        self.epoch = 0
        self.admitted = {"content": 0, "dm": 0, "change": 0}
        self.refused: dict[str, int] = {}

    # --- plumbing ------------------------------------------------------------------------------

    @property
    def head(self) -> Head:
        return self.heads[-1]

    def _advance(self) -> None:
        h = self.head
        self.heads.append(Head(h.seq + 1, next_head(h.chain, secrets.token_bytes(32))))

    def _kind(self, p: Person) -> str:
        return "agent" if p.kind is MemberKind.AGENT else "human"

    def _readers(self, leaving: str | None = None) -> dict[str, bytes]:
        """The wraps an honest proposer makes, addressed from the *model's* member list."""
        stay = [self.by_id[i].as_member(Role.MEMBER) for i in sorted(self.seats) if i != leaving]
        return wrap_for(stay, KEY)

    def _submit(self, body: EventBody, author_pk: bytes, expected: Expected) -> Admitted | None:
        before = self.state
        decision = admit(self.state, self.head, body, author_pk)
        if expected is None:
            assert isinstance(decision, Admitted), f"expected admission, got {decision}"
            self.state = decision.membership
            self._advance()
            return decision
        assert isinstance(decision, Refused), f"expected {expected}, admitted {body!r}"
        assert (decision.code, decision.rule) == expected, (decision, expected)
        assert decision.message
        # A stale refusal names the head the author must re-read; no other refusal does.
        assert decision.head_seq == (self.head.seq if decision.code is STALE else None)
        assert self.state is before
        self.refused[decision.rule] = self.refused.get(decision.rule, 0) + 1
        return None

    def _signed_by(self, signer: Person, stale: bool, wrong_key: bool) -> tuple[Expected, bytes]:
        """The checks every change meets before its operation: a member's pinned key, a fresh
        head, a human signer. Returns the refusal they give (or None) and the signing key."""
        key = secrets.token_bytes(32) if wrong_key else bytes(signer.key.verify_key)
        seat = self.seats.get(signer.id)
        if seat is None:
            return (UNAUTHORIZED, "not_a_member"), key
        if wrong_key:
            return (UNAUTHORIZED, "wrong_signer"), key
        if stale:
            return (STALE, "stale"), key
        if seat.kind == "agent":
            return (UNAUTHORIZED, "agent_signer"), key
        return None, key

    def _pick(self, data: st.DataObject, label: str, *, agents_only: bool = False) -> Person:
        """Someone: a current member three times in four, else anyone (removed, stranger)."""
        pool = [p for p in self.people if not agents_only or p.kind is MemberKind.AGENT]
        members = [p for p in pool if p.id in self.seats]
        if members and data.draw(st.integers(0, 3), label=f"{label} is a member") > 0:
            pool = members
        return data.draw(st.sampled_from(pool), label=label)

    def _base(self, data: st.DataObject, stale: bool) -> Head:
        if not stale:
            return self.head
        return data.draw(st.sampled_from(self.heads[:-1]), label="stale base")

    # --- management ----------------------------------------------------------------------------

    @rule(
        data=st.data(),
        role=st.sampled_from(Role),
        caps=CAPS,
        stale=RARELY,
        wrong_key=RARELY,
    )
    def add(
        self,
        data: st.DataObject,
        role: Role,
        caps: tuple[str, ...],
        stale: bool,
        wrong_key: bool,
    ) -> None:
        s, w = self._pick(data, "signer"), self._pick(data, "target")
        if w.kind is MemberKind.HUMAN:  # people hold tool grants only
            caps = tuple(c for c in caps if c.startswith("tool:"))
        new = w.as_member(role, caps)
        body = change_body(s, AddMember(new, wrap_for([new], KEY)), self._base(data, stale))
        expected, key = self._signed_by(s, stale, wrong_key)
        if expected is None:
            seat = self.seats[s.id]
            if seat.role not in ("owner", "manager"):
                expected = (UNAUTHORIZED, "role")
            elif w.id in self.seats:
                expected = (INVALID, "already_member")
            elif seat.role == "manager" and role.value != "member":
                expected = (UNAUTHORIZED, "role")
            elif self._kind(w) == "agent" and role.value != "member":
                expected = (INVALID, "agent_role")
        if self._submit(body, key, expected):
            self.seats[w.id] = Seat(
                self._kind(w), role.value, frozenset(caps), bytes(w.key.verify_key)
            )
            self.admitted["change"] += 1

    @rule(
        data=st.data(),
        skew=st.sampled_from([0, 0, 0, -1, 1]),
        stale=RARELY,
        wrong_key=RARELY,
    )
    def remove(
        self,
        data: st.DataObject,
        skew: int,
        stale: bool,
        wrong_key: bool,
    ) -> None:
        s, w = self._pick(data, "signer"), self._pick(data, "target")
        op = RemoveMember(w.id, self.epoch + 1 + skew, self._readers(leaving=w.id))
        body = change_body(s, op, self._base(data, stale))
        expected, key = self._signed_by(s, stale, wrong_key)
        if expected is None:
            seat, target = self.seats[s.id], self.seats.get(w.id)
            if target is None:
                expected = (UNAUTHORIZED, "not_a_member")
            elif w.id == s.id:
                expected = (UNAUTHORIZED, "self_removal")
            elif not (seat.role == "owner" or (seat.role == "manager" and target.role == "member")):
                expected = (UNAUTHORIZED, "role")
            elif skew != 0:
                expected = (INVALID, "epoch")
        decision = self._submit(body, key, expected)
        if decision:
            assert decision.removed == w.id
            del self.seats[w.id]
            self.epoch += 1
            self.admitted["change"] += 1

    @rule(
        data=st.data(),
        skew=st.sampled_from([0, 0, -1, 1]),
        stale=RARELY,
        wrong_key=RARELY,
        foreign=RARELY,
    )
    def rotate(
        self,
        data: st.DataObject,
        skew: int,
        stale: bool,
        wrong_key: bool,
        foreign: bool,
    ) -> None:
        s = self._pick(data, "signer")
        op = RotateKey(self.epoch + 1 + skew, self._readers())
        # A proof made for another collab, carried by an event of this one.
        body = change_body(s, op, self._base(data, stale))
        if foreign:
            proof = s.propose(op, self._base(data, stale), new_id("c"))
            body = EventBody(
                EVENT_VERSION, COLLAB, s.id, KIND_MANAGEMENT, TS0, (), b"", encode_proof(proof)
            )
        expected, key = self._signed_by(s, stale, wrong_key)
        if foreign:
            expected = (INVALID, "wrong_collab")
        elif expected is None:
            if self.seats[s.id].role not in ("owner", "manager"):
                expected = (UNAUTHORIZED, "role")
            elif skew != 0:
                expected = (INVALID, "epoch")
        decision = self._submit(body, key, expected)
        if decision:
            assert decision.removed is None
            self.epoch += 1
            self.admitted["change"] += 1

    @rule(data=st.data(), role=st.sampled_from(Role), wrong_key=RARELY)
    def change_role(self, data: st.DataObject, role: Role, wrong_key: bool) -> None:
        s, w = self._pick(data, "signer"), self._pick(data, "target")
        body = change_body(s, ChangeRole(w.id, role), self.head)
        expected, key = self._signed_by(s, False, wrong_key)
        if expected is None:
            target = self.seats.get(w.id)
            owners_after = sum(
                1
                for i, seat in self.seats.items()
                if (role.value if i == w.id else seat.role) == "owner"
            )
            if self.seats[s.id].role != "owner":
                expected = (UNAUTHORIZED, "role")
            elif target is None:
                expected = (UNAUTHORIZED, "not_a_member")
            elif target.kind == "agent":
                expected = (INVALID, "agent_role")
            elif owners_after == 0:
                expected = (INVALID, "last_owner")
        if self._submit(body, key, expected):
            self.seats[w.id].role = role.value
            self.admitted["change"] += 1

    @rule(data=st.data(), caps=CAPS, stale=RARELY, wrong_key=RARELY)
    def set_caps(
        self, data: st.DataObject, caps: tuple[str, ...], stale: bool, wrong_key: bool
    ) -> None:
        """A grant or a revocation: a member's capabilities replaced (no rotation)."""
        s, w = self._pick(data, "signer"), self._pick(data, "target")
        body = change_body(s, SetCaps(w.id, caps), self._base(data, stale))
        expected, key = self._signed_by(s, stale, wrong_key)
        if expected is None:
            seat, target = self.seats[s.id], self.seats.get(w.id)
            if target is None:
                expected = (UNAUTHORIZED, "not_a_member")
            elif not (seat.role == "owner" or (seat.role == "manager" and target.role == "member")):
                expected = (UNAUTHORIZED, "role")
            elif target.kind == "human" and any(not c.startswith("tool:") for c in caps):
                expected = (INVALID, "caps")
        decision = self._submit(body, key, expected)
        if decision:
            assert decision.removed is None
            self.seats[w.id].caps = frozenset(caps)
            self.admitted["change"] += 1

    @rule(data=st.data(), caps=CAPS)
    def reseat_with_other_capabilities(self, data: st.DataObject, caps: tuple[str, ...]) -> None:
        """An owner takes an agent out and seats it again with other capabilities."""
        a = self._pick(data, "agent", agents_only=True)
        owner = next(self.by_id[i] for i, s in sorted(self.seats.items()) if s.role == "owner")
        if a.id in self.seats:
            op = RemoveMember(a.id, self.epoch + 1, self._readers(leaving=a.id))
            key = bytes(owner.key.verify_key)
            assert self._submit(change_body(owner, op, self.head), key, None)
            del self.seats[a.id]
            self.epoch += 1
        new = a.as_member(Role.MEMBER, caps)
        body = change_body(owner, AddMember(new, wrap_for([new], KEY)), self.head)
        assert self._submit(body, bytes(owner.key.verify_key), None)
        self.seats[a.id] = Seat("agent", "member", frozenset(caps), bytes(a.key.verify_key))

    @rule(
        data=st.data(),
        skew=st.sampled_from([0, 0, 0, 1]),
        stale=RARELY,
        wrong_key=RARELY,
        forged_possession=RARELY,
    )
    def rekey(
        self,
        data: st.DataObject,
        skew: int,
        stale: bool,
        wrong_key: bool,
        forged_possession: bool,
    ) -> None:
        """A member re-pins their own keys (signed by the pinned key, proven by the new one)."""
        s = self._pick(data, "signer")
        new_key, new_box = nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()
        old = KeyPair(bytes(s.key.verify_key), bytes(s.box.public_key))
        new = KeyPair(bytes(new_key.verify_key), bytes(new_box.public_key))
        prover = nacl.signing.SigningKey.generate() if forged_possession else new_key
        op = RekeyMember(
            old_sign_pk=old.sign_pk,
            sign_pk=new.sign_pk,
            box_pk=new.box_pk,
            possession=sign_collab_rekey(prover, COLLAB, s.id, old, new),
            new_epoch=self.epoch + 1 + skew,
            wraps=self._readers(),
        )
        body = change_body(s, op, self._base(data, stale))
        expected, key = self._signed_by(s, stale, wrong_key)
        if expected is None:
            if forged_possession:
                expected = (INVALID, "rekey_possession")
            elif skew != 0:
                expected = (INVALID, "epoch")
        decision = self._submit(body, key, expected)
        if decision:
            assert decision.removed is None
            s.key, s.box = new_key, new_box
            self.seats[s.id].sign_pk = new.sign_pk
            self.epoch += 1
            self.admitted["change"] += 1

    # --- content -------------------------------------------------------------------------------

    def _content_expectation(
        self, author: Person, wrong_key: bool, epoch: int, dm_to: list[str] | None
    ) -> Expected:
        seat = self.seats.get(author.id)
        if seat is None:
            return (UNAUTHORIZED, "not_a_member")
        if wrong_key:
            return (UNAUTHORIZED, "pinned_key")
        if seat.kind == "agent" and "post" not in seat.caps:
            return (UNAUTHORIZED, "no_post")
        if dm_to is not None and (len(dm_to) != 1 or dm_to[0] not in self.seats):
            return (INVALID, "dm_recipient")
        if epoch != self.epoch:
            return (STALE, "epoch")
        return None

    def _content_key(self, author: Person, wrong_key: bool) -> bytes:
        """The key the event verified under: the author's own, or one the collab does not pin
        for them (a key they held before a rekey, a key the relay made up)."""
        return secrets.token_bytes(32) if wrong_key else bytes(author.key.verify_key)

    @rule(data=st.data(), skew=st.sampled_from([0, 0, 0, -1, 1, -2]), wrong_key=RARELY)
    def post(self, data: st.DataObject, skew: int, wrong_key: bool) -> None:
        a = self._pick(data, "author")
        epoch = max(self.epoch + skew, 0)
        body = content_body(a.id, epoch=epoch)
        key = self._content_key(a, wrong_key)
        if self._submit(body, key, self._content_expectation(a, wrong_key, epoch, None)):
            self.admitted["content"] += 1

    @rule(data=st.data(), skew=st.sampled_from([0, 0, 0, -1, 1]), wrong_key=RARELY)
    def dm(self, data: st.DataObject, skew: int, wrong_key: bool) -> None:
        a = self._pick(data, "sender")
        # Usually one recipient; sometimes none, several, or a stranger's id.
        count = data.draw(st.sampled_from([1, 1, 1, 0, 2, 3]), label="recipients")
        refs = [
            new_id("a")
            if data.draw(st.integers(0, 5), label="stranger") == 0
            else self._pick(data, "recipient").id
            for _ in range(count)
        ]
        epoch = max(self.epoch + skew, 0)
        body = content_body(a.id, kind=KIND_DM, refs=tuple(refs), epoch=epoch)
        key = self._content_key(a, wrong_key)
        if self._submit(body, key, self._content_expectation(a, wrong_key, epoch, refs)):
            self.admitted["dm"] += 1

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def the_rules_carry_the_models_membership(self) -> None:
        state = self.state
        assert state.epoch == self.epoch
        assert set(state.members) == set(self.seats)
        for account_id, seat in self.seats.items():
            m = state.members[account_id]
            assert (m.kind.value, m.role.value, frozenset(m.caps), m.sign_pk) == (
                seat.kind,
                seat.role,
                seat.caps,
                seat.sign_pk,
            )

    @invariant()
    def a_collab_always_keeps_a_human_owner(self) -> None:
        assert any(s.role == "owner" and s.kind == "human" for s in self.seats.values())


TestAdmissionMachine = pytest.mark.objective("SO-5")(AdmissionMachine.TestCase)
TestAdmissionMachine.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)


def test_refusals_name_their_rule_code_and_next_step() -> None:
    """The table of content refusals, one line each, as an author sees them."""
    founder, agent = Person(), Person(MemberKind.AGENT)
    owner = founder.as_member(Role.OWNER)
    head = start_of(COLLAB)
    state = apply(
        None,
        founder.propose(CreateCollab(owner, wrap_for([owner], KEY)), head, COLLAB),
        head,
        actor_id=founder.id,
    )
    reader = agent.as_member(Role.MEMBER, ("read",))
    state = Membership(COLLAB, {**state.members, agent.id: reader}, 3)
    cases = {
        "not_a_member": content_body(new_id("a"), epoch=3),
        "no_post": content_body(agent.id, epoch=3),
        "dm_recipient": content_body(founder.id, kind=KIND_DM, refs=(), epoch=3),
        "epoch": content_body(founder.id, epoch=2),
    }
    keys = {founder.id: bytes(founder.key.verify_key), agent.id: bytes(agent.key.verify_key)}
    for rule_name, body in cases.items():
        decision = admit(state, head, body, keys.get(body.actor_id, b""))
        assert isinstance(decision, Refused)
        assert decision.rule == rule_name
    stale = admit(state, head, content_body(founder.id, epoch=2), keys[founder.id])
    assert isinstance(stale, Refused)
    assert "re-read the collab" in stale.message
    assert stale.head_seq == head.seq
    dm = content_body(founder.id, kind=KIND_DM, refs=(agent.id,), epoch=3)
    assert admit(state, head, dm, keys[founder.id]) == Admitted(state)
    wrong = admit(state, head, dm, keys[agent.id])
    assert isinstance(wrong, Refused)
    assert wrong.rule == "pinned_key"


@given(
    code=st.sampled_from(list(wire.ErrorCode)),
    stored=st.none() | st.tuples(st.integers(1, 2**40), st.binary(min_size=32, max_size=32)),
)
def test_identity_comes_before_admission(
    code: wire.ErrorCode, stored: tuple[int, bytes] | None
) -> None:
    """Whatever a rule refused, a stored event is answered with its stored position, and a
    refusal survives only for an event the ledger does not hold."""
    refusal = Refused(code, "rule", "message", head_seq=3)
    answer = identify(refusal, stored)
    if stored is None:
        assert answer is refusal
    else:
        assert answer == Stored(*stored)
