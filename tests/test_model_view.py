"""The client's own fold (model/view.py): who can read what, and what every client refuses.

The relay here is `tests.collab_sim.Sim` — honest where a test says so, lying (`force`) where
the test is about a lying relay. Every reader folds the same events with real keys.
"""

from __future__ import annotations

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from clientkit import _collab
from model import _crypto
from model._crypto import CryptoError
from model.dm import open_dm
from model.envelope import decode_body, event_id, plan_precheck, seal_event, verify_event
from model.epochs import NotARecipient, new_epoch_key, open_wrap
from model.membership import (
    MemberKind,
    RemoveMember,
    Role,
    decode_proof,
)
from model.merkle import leaf_hash, tree_root
from model.view import CollabView, Entry, ViewRejected
from model.viewsnap import SnapshotRejected, open_snapshot, seal_snapshot
from sigworker import check_signatures
from tests.collab_sim import FORGERIES, Sim, forged_collab, text_of
from tests.helpers import TS0, Person


def _team() -> tuple[Sim, Person, Person, Person]:
    alice, bob, carol = Person(), Person(), Person()
    sim = Sim(alice)
    sim.add(alice, bob)
    sim.add(alice, carol)
    return sim, alice, bob, carol


@pytest.mark.objective("SO-7")
def test_after_removal_the_removed_member_reads_nothing_new() -> None:
    sim, alice, bob, carol = _team()
    before = sim.post(alice, "hello all")
    views = {p.id: sim.view(p) for p in (alice, bob, carol)}
    for view in views.values():
        entries = sim.read(view)[1]
        assert [text_of(e) for e in entries if e.seq == before] == ["hello all"]
    removal = sim.remove(alice, carol)
    after = [sim.post(alice, "carol is gone"), sim.post(bob, "indeed")]
    for p in (alice, bob):
        entries = sim.read(views[p.id])[1]
        assert [text_of(e) for e in entries if e.seq in after] == ["carol is gone", "indeed"]
    # Carol keeps folding (a relay could keep feeding her): she verifies, but cannot read.
    entries = sim.read(views[carol.id])[1]
    assert [e.seq for e in entries if e.content is not None] == []
    assert all("removed" in e.unreadable for e in entries if e.seq in after)
    assert not views[carol.id].is_member
    with pytest.raises(NotARecipient):
        views[carol.id].current_key()
    # Nor does the removal's own wrap help her: it has no entry for her.
    op = decode_body(sim.events[removal - 1][1].body)
    proof = decode_proof(op.ciphertext)
    assert isinstance(proof.op, RemoveMember)
    with pytest.raises(NotARecipient):
        open_wrap(proof.op.wraps, carol.id, carol.box)
    assert views[alice.id].current_key()[0] == 1
    assert views[alice.id].current_key() == views[bob.id].current_key()


@pytest.mark.objective("SO-1")
@pytest.mark.objective("ADR-0023")
def test_a_third_member_cannot_read_a_dm() -> None:
    sim, alice, bob, carol = _team()
    assert sim.state is not None
    seq = sim.dm(alice, sim.state.members[bob.id], "just between us")
    read = {p.id: sim.read(sim.view(p))[1][seq - 1] for p in (alice, bob, carol)}
    assert text_of(read[alice.id]) == text_of(read[bob.id]) == "just between us"
    assert read[carol.id].content is None
    assert "between others" in read[carol.id].unreadable
    # At the crypto layer: Carol holding the ciphertext opens it with no key pairing she has.
    signed = sim.events[seq - 1][1]
    verified = verify_event(signed, bytes(alice.key.verify_key))
    for other in (alice, bob):
        with pytest.raises(CryptoError):
            open_dm(verified, carol.box, bytes(other.box.public_key))


@pytest.mark.objective("SO-1")
@pytest.mark.objective("ADR-0023")
def test_a_dm_readdressed_to_someone_else_does_not_open() -> None:
    sim, alice, bob, carol = _team()
    assert sim.state is not None
    seq = sim.dm(alice, sim.state.members[bob.id], "for bob")
    verified = verify_event(sim.events[seq - 1][1], bytes(alice.key.verify_key))
    assert open_dm(verified, bob.box, bytes(alice.box.public_key))
    with pytest.raises(CryptoError):
        open_dm(verified, bob.box, bytes(carol.box.public_key))  # not from carol


# --- a lying relay: every client refuses what the fold does not allow ----------------------------


@pytest.mark.objective("SO-5")
@pytest.mark.parametrize("how", FORGERIES)
def test_every_client_rejects_what_the_fold_does_not_allow(how: str) -> None:
    sim, (alice, bob, bot, mallory) = forged_collab(how)
    forged_seq = sim.head.seq
    for person in (alice, bob, bot, mallory):
        view = sim.view(person)
        with pytest.raises(ViewRejected, match=f"seq {forged_seq}"):
            sim.read(view)
        assert view.head.seq == forged_seq - 1, "the view stops before the forged event"
        assert view.membership is None or mallory.id not in view.membership.members


# --- the state machine ---------------------------------------------------------------------------


class ReadersMachine(RuleBasedStateMachine):
    """Random people (humans, an agent, strangers) add, remove, re-role, rotate, post and DM
    through an honest relay. After every step, every person's own fold agrees with the relay's,
    and each event is readable by exactly the members at its position (DMs: its two people)."""

    def __init__(self) -> None:
        super().__init__()
        self.people = [Person(), *(Person() for _ in range(4)), Person(MemberKind.AGENT)]
        self.sim = Sim(self.people[0])
        self.views = {p.id: self.sim.view(p) for p in self.people}
        self.audience: dict[int, set[str]] = {}  # content seq -> who must be able to read it

    def _try(self, action: object) -> None:
        try:
            action()  # type: ignore[operator]
        except (ValueError, NotARecipient, Exception) as exc:
            from model.membership import ProofRejected

            assert isinstance(exc, (ProofRejected, ValueError, NotARecipient)), repr(exc)

    @rule(signer=st.integers(0, 5), who=st.integers(0, 5), role=st.sampled_from(Role))
    def add(self, signer: int, who: int, role: Role) -> None:
        self._try(lambda: self.sim.add(self.people[signer], self.people[who], role))

    @rule(signer=st.integers(0, 5), who=st.integers(0, 5))
    def remove(self, signer: int, who: int) -> None:
        self._try(lambda: self.sim.remove(self.people[signer], self.people[who]))

    @rule(signer=st.integers(0, 5), who=st.integers(0, 5), role=st.sampled_from(Role))
    def change_role(self, signer: int, who: int, role: Role) -> None:
        target = self.people[who].id
        self._try(
            lambda: self.sim.change(
                self.people[signer], lambda _v: _collab.change_role(target, role)
            )
        )

    @rule(signer=st.integers(0, 5))
    def rotate(self, signer: int) -> None:
        self._try(lambda: self.sim.change(self.people[signer], _collab.rotate))

    @rule(author=st.integers(0, 5))
    def post(self, author: int) -> None:
        state = self.sim.state
        assert state is not None
        if self.people[author].id not in state.members:
            return
        seq = self.sim.post(self.people[author], f"post {len(self.sim.events)}")
        self.audience[seq] = set(state.members)

    @rule(sender=st.integers(0, 5), to=st.integers(0, 5))
    def dm(self, sender: int, to: int) -> None:
        state = self.sim.state
        assert state is not None
        a, b = self.people[sender].id, self.people[to].id
        if a not in state.members or b not in state.members:
            return
        seq = self.sim.dm(self.people[sender], state.members[b], "psst")
        self.audience[seq] = {a, b}

    @invariant()
    def every_fold_agrees_and_reads_exactly_its_share(self) -> None:
        for person in self.people:
            view = self.views[person.id]
            _, entries = self.sim.read(view)
            assert view.membership == self.sim.state
            assert view.head == self.sim.head
            for e in entries:
                if e.seq in self.audience:
                    readable = text_of(e) is not None
                    assert readable == (person.id in self.audience[e.seq]), (person.id, e)


TestReadersMachine = pytest.mark.objective("SO-7")(ReadersMachine.TestCase)
TestReadersMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


@pytest.mark.objective("SO-5")
def test_a_member_who_signs_garbage_cannot_halt_everyone_elses_history() -> None:
    # The signature proves the author sent it (the relay cannot sign for members), so readers
    # show it as unreadable and read on: one member cannot make every client raise an alarm.
    sim, alice, bob, carol = _team()
    garbage = seal_event(
        signing_key=bob.key,
        collab_key=new_epoch_key(),  # not the collab's key
        collab_id=sim.collab_id,
        actor_id=bob.id,
        kind="msg",
        ts=TS0,
        content=b"noise",
    )
    bad = sim.submit(garbage)
    after = sim.post(alice, "still here")
    for person in (alice, carol):
        entries = {e.seq: e for e in sim.read(sim.view(person))[1]}
        assert "author" in entries[bad].unreadable
        assert text_of(entries[after]) == "still here"


@pytest.mark.objective("SO-7")
def test_a_member_added_mid_epoch_reads_the_epochs_earlier_events_on_a_primed_pass() -> None:
    alice, bob = Person(), Person()
    sim = Sim(alice)
    early = sim.post(alice, "before bob")
    sim.add(alice, bob)
    first = {e.seq: e for e in sim.read(sim.view(bob))[1]}
    assert "before this account joined" in first[early].unreadable
    keys = sim.read(sim.view(bob))[0].known_keys()
    primed = CollabView(sim.collab_id, bob.id, bob.box, keys)
    assert text_of({e.seq: e for e in sim.read(primed)[1]}[early]) == "before bob"
    # A key from another epoch opens nothing it should not: rotation leaves bob's old one behind.
    sim.change(alice, _collab.rotate)
    later = sim.post(alice, "epoch 1")
    assert text_of({e.seq: e for e in sim.read(primed)[1]}[later]) == "epoch 1"


def _one_pass(sim: Sim, person: Person) -> list[Entry]:
    """What a reader with `hold` (one pass, clientkit's `History`) hands out, settled at the end."""
    view = CollabView(sim.collab_id, person.id, person.box, hold=True)
    out: list[Entry] = []
    for seq, signed, chain in sim.events:
        view.ingest(seq, signed, chain)
        out += view.drain()
    view.settle()
    return out + view.drain()


def _primed(sim: Sim, person: Person) -> list[Entry]:
    """The two passes clientkit used to make: a key pass, then a pass primed with its keys."""
    keys = sim.read(sim.view(person))[0].known_keys()
    return sim.read(CollabView(sim.collab_id, person.id, person.box, keys))[1]


@pytest.mark.objective("SO-7")
@settings(max_examples=25, deadline=None)
@given(
    script=st.lists(
        st.sampled_from(["post_a", "post_c", "add_b", "remove_b", "rotate", "dm"]), max_size=14
    )
)
def test_one_pass_reads_exactly_what_a_pass_primed_with_every_key_reads(script: list[str]) -> None:
    alice, bob, carol = Person(), Person(), Person()
    sim = Sim(alice)
    sim.add(alice, carol)
    bob_in = False
    for step in script:
        if step == "post_a":
            sim.post(alice, "from alice")
        elif step == "post_c":
            sim.post(carol, "from carol")
        elif step == "add_b" and not bob_in:
            sim.add(alice, bob)
            bob_in = True
        elif step == "remove_b" and bob_in:
            sim.remove(alice, bob)
            bob_in = False
        elif step == "rotate":
            sim.change(alice, _collab.rotate)
        elif step == "dm":
            sim.dm(alice, carol.as_member(Role.MEMBER), "psst")
    for person in (alice, bob, carol):
        assert _one_pass(sim, person) == _primed(sim, person)


def test_one_pass_holds_the_epochs_earlier_events_until_the_key_comes() -> None:
    alice, bob = Person(), Person()
    sim = Sim(alice)
    early = sim.post(alice, "before bob")
    added = sim.add(alice, bob)
    view = CollabView(sim.collab_id, bob.id, bob.box, hold=True)
    handed: list[Entry] = []
    for seq, signed, chain in sim.events:
        view.ingest(seq, signed, chain)
        if seq == early:
            assert view.settled_head.seq == early - 1  # held: not checked through yet
        handed += view.drain()
    assert [e.seq for e in handed] == list(range(1, added + 1))
    assert text_of({e.seq: e for e in handed}[early]) == "before bob"


def test_verdicts_from_ahead_spare_the_fold_its_checks_only_for_the_key_it_pins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader checks a batch's signatures ahead of its fold (in worker processes,
    clientkit/_verifiers.py), under its guess of each author's key. The fold skips its own
    check only where a check held for exactly the key it pins: with a right guess it checks
    no content signature itself, with a wrong one (Carol's events checked under Alice's key)
    it checks those itself, and either way reads what it reads alone. Verdicts that do not
    match the checks one for one are refused."""
    alice, carol = Person(), Person()
    sim = Sim(alice)
    sim.add(alice, carol)
    for i in range(3):
        sim.post(alice, f"a{i}")
        sim.post(carol, f"c{i}")
    sim.change(alice, _collab.rotate)
    sim.post(carol, "after the rotation")
    final, plain = sim.read(sim.view(carol))
    assert final.membership is not None
    members = {a: m.sign_pk for a, m in final.membership.members.items()}
    signed = [s for _, s, _ in sim.events]
    checked: list[bytes] = []
    real = _crypto.verify

    def counted(public_key: bytes, message: bytes, signature: bytes) -> bool:
        checked.append(public_key)
        return real(public_key, message, signature)

    for keys, fold_checks in (
        (members, 0),
        ({**members, carol.id: bytes(alice.key.verify_key)}, 4),
    ):
        plan = plan_precheck(signed, keys)
        ahead = plan.result(check_signatures(plan.checks))
        with pytest.raises(ValueError, match="verdicts"):
            plan.result([True] * (len(plan.checks) - 1))
        monkeypatch.setattr(_crypto, "verify", counted)
        checked.clear()
        view = CollabView(sim.collab_id, carol.id, carol.box)
        entries = [view.ingest(seq, s, chain, prechecked=ahead) for seq, s, chain in sim.events]
        monkeypatch.setattr(_crypto, "verify", real)
        assert entries == plain
        management = sum(1 for e in entries if e.proof is not None)
        assert len(checked) == management + fold_checks


def test_the_fold_keeps_the_tree_a_signed_head_of_its_size_must_have_and_a_kept_fold_too() -> None:
    """The fold's tree is ADR-0020's (leaves are the event ids in seq order), so a relay's
    checkpoint of the fold's size can be compared with it; a kept fold carries it, and one kept
    without it (an older client) or with a tree of another size is not resumed."""
    sim, alice, bob, _carol = _team()
    sim.post(alice, "one")
    sim.post(bob, "two")
    view = sim.read(sim.view(bob))[0]
    ids = [event_id(signed) for _seq, signed, _chain in sim.events]
    assert view.head.seq == len(ids)
    assert view.tree_root() == tree_root([leaf_hash(i) for i in ids])
    sealed = view.seal()
    assert sealed is not None
    resumed = CollabView.resume(sealed, view.head, sim.collab_id, bob.id, bob.box)
    assert resumed.tree_root() == view.tree_root()
    sim.post(alice, "three")
    seq, signed, chain = sim.events[-1]
    resumed.ingest(seq, signed, chain)
    assert resumed.tree_root() == tree_root([leaf_hash(i) for i in [*ids, event_id(signed)]])
    snap, _ = open_snapshot(sealed, view.head, sim.collab_id, bob.id, bob.box)
    for tree in (None, snap.tree[:-1] if snap.tree else [b"\0" * 32]):
        other = seal_snapshot(msgspec.structs.replace(snap, tree=tree), bob.box)
        with pytest.raises(SnapshotRejected):
            CollabView.resume(other, view.head, sim.collab_id, bob.id, bob.box)
