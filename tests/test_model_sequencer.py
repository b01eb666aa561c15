"""The sequencer's pure core, driven the way the relay drives it: batches, retries, duplicates."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from model import chain
from model.chain import Head
from model.ids import new_id
from model.sequencer import Assignment, assign

COLLAB = new_id("c")


def eid(n: int) -> bytes:
    return hashlib.sha256(b"event-%d" % n).digest()


# Small id space so batches repeat ids within and across batches (retries) often.
batches = st.lists(st.integers(0, 30).map(eid), max_size=12)


class SequencerMachine(RuleBasedStateMachine):
    """A relay loop in miniature: the ledger is a dict, and every batch may repeat old ids.

    Besides the sequencer's own contract it checks that an observer replaying the sequenced
    events with `chain.advance` — what every client does — never raises an alarm.
    """

    @initialize()
    def start(self) -> None:
        self.head = chain.start_of(COLLAB)
        self.ledger: dict[bytes, tuple[int, bytes]] = {}  # event id -> (seq, chain)
        self.log: list[tuple[int, bytes, bytes]] = []  # (seq, event id, chain) in seq order
        self.submitted: list[list[bytes]] = []

    def _submit(self, batch: list[bytes]) -> None:
        # The relay looks up only this batch's ids in the ledger, as `Ledger.append_batch` does.
        known = {i: self.ledger[i] for i in batch if i in self.ledger}
        before = dict(self.ledger)
        old_head = self.head
        new_head, out = assign(self.head, batch, known)

        assert len(out) == len(batch)
        assert [a.event_id for a in out] == batch
        fresh = [a for a in out if not a.duplicate]
        # New ids get the next contiguous seqs, in order of first appearance.
        first_seen = list(dict.fromkeys(i for i in batch if i not in before))
        assert [a.event_id for a in fresh] == first_seen
        assert [a.seq for a in fresh] == list(
            range(old_head.seq + 1, old_head.seq + 1 + len(fresh))
        )
        for a in fresh:
            self.ledger[a.event_id] = (a.seq, a.chain)
            self.log.append((a.seq, a.event_id, a.chain))
        # Every repeat — of an already sequenced id or within the batch — reports the original.
        for a in out:
            assert (a.seq, a.chain) == self.ledger[a.event_id]
            if a.event_id in before:
                assert a.duplicate
        assert new_head == (Head(fresh[-1].seq, fresh[-1].chain) if fresh else old_head)
        self.head = new_head
        self.submitted.append(batch)

    @rule(batch=batches)
    def submit(self, batch: list[bytes]) -> None:
        self._submit(batch)

    @rule(data=st.data())
    def retry_a_whole_batch(self, data: st.DataObject) -> None:
        # A client whose ack was lost resends exactly what it sent before.
        if not self.submitted:
            return
        batch = data.draw(st.sampled_from(self.submitted), label="retried batch")
        head_before = self.head
        expected = [self.ledger[i][0] for i in batch]
        self._submit(batch)
        assert self.head == head_before
        assert [self.ledger[i][0] for i in batch] == expected

    @invariant()
    def seqs_are_contiguous_and_unique(self) -> None:
        assert [seq for seq, _, _ in self.log] == list(range(1, self.head.seq + 1))
        assert len({i for _, i, _ in self.log}) == len(self.log)
        assert len(self.ledger) == self.head.seq

    @invariant()
    def clients_replay_the_log_without_alarm(self) -> None:
        head = chain.start_of(COLLAB)
        for seq, event_id, claimed in self.log:
            head = chain.advance(head, seq, event_id, claimed)
        assert head == self.head


TestSequencerMachine = pytest.mark.objective("SO-4")(SequencerMachine.TestCase)
TestSequencerMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_empty_batch_changes_nothing() -> None:
    head = chain.start_of(COLLAB)
    assert assign(head, [], {}) == (head, [])


def test_first_batch_starts_at_seq_one_and_chains_from_genesis() -> None:
    head, out = assign(chain.start_of(COLLAB), [eid(1), eid(2)], {})
    c1 = chain.next_head(chain.genesis_head(COLLAB), eid(1))
    c2 = chain.next_head(c1, eid(2))
    assert out == [
        Assignment(seq=1, event_id=eid(1), chain=c1, duplicate=False),
        Assignment(seq=2, event_id=eid(2), chain=c2, duplicate=False),
    ]
    assert head == Head(2, c2)


def test_duplicate_within_a_batch_is_sequenced_once() -> None:
    head, out = assign(chain.start_of(COLLAB), [eid(1), eid(2), eid(1), eid(1)], {})
    assert [(a.seq, a.duplicate) for a in out] == [(1, False), (2, False), (1, True), (1, True)]
    assert out[2].chain == out[0].chain
    assert head.seq == 2


def test_known_ids_keep_their_original_position() -> None:
    start = chain.start_of(COLLAB)
    head, first = assign(start, [eid(1), eid(2)], {})
    known = {a.event_id: (a.seq, a.chain) for a in first}
    head2, again = assign(head, [eid(2), eid(3), eid(1)], known)
    assert [(a.seq, a.duplicate) for a in again] == [(2, True), (3, False), (1, True)]
    assert again[0].chain == first[1].chain
    assert head2.seq == 3


@settings(max_examples=100, deadline=None)
@given(first=batches, second=batches)
def test_resubmitting_batches_is_idempotent(first: list[bytes], second: list[bytes]) -> None:
    head, a1 = assign(chain.start_of(COLLAB), first, {})
    known = {a.event_id: (a.seq, a.chain) for a in a1 if not a.duplicate}
    head2, a2 = assign(head, second, {i: known[i] for i in second if i in known})
    known |= {a.event_id: (a.seq, a.chain) for a in a2 if not a.duplicate}
    # Retrying both batches in one go assigns nothing new and reports every original position.
    head3, a3 = assign(head2, first + second, {i: known[i] for i in first + second})
    assert head3 == head2
    assert all(a.duplicate for a in a3)
    assert [(a.seq, a.chain) for a in a3] == [known[i] for i in first + second]
    assert head2.seq == len(set(first) | set(second))
