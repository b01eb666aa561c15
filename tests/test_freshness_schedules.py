"""Witness-dated freshness over generated schedules (issue 16; docs/ordering.md, "Whose date").

A relay (a real `LeafTree` and `CheckpointSigner`) and two witnesses (the real decision
`model.tlog.witness_add_checkpoint` with real keys, their record in memory) are stepped one
second at a time, as `relay/_witnessing.py` runs them: a round each second submits a grown head,
or an unchanged one whose newest cosignature is `REFRESH` old; a heartbeat every `T` seconds
(after that second's round, as `CollabTrees.heartbeat` waits for it) carries the lines of the
current tree. A follower takes each heartbeat as the client kit does (`require_quorum`,
`CheckpointBook.check_head`, `witnessed_at`).

- Honest schedules — commits at any second, reconnects, a witness restarting (missing a round,
  shorter than the heartbeat's wait for cosignatures) — never alarm, and the follower's age
  never exceeds the bound. (A quorum witness down for longer than that wait at two heartbeats
  in a row does make a follower stale: by design, not an alarm; docs/witness.md.)
- A relay that freezes the follower's head (re-signing it with fresh dates and the lines it had,
  and asking the witnesses to date it again) while the witnesses see the tree grow leaves the
  follower stale within the bound of the first larger cosignature; the witnesses refuse (409).

The end-to-end versions, with real witness processes and relay, are in tests/test_withholding.py.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clientkit._checkpoints import CheckpointBook
from clientkit._quorum import require_quorum, witnessed_at
from clientkit.errors import QuorumNotMet
from model.checkpoints import CheckpointSigner, collab_origin
from model.membership import WitnessPolicy
from model.merkle import LeafTree, leaf_hash
from model.note import ALG_COSIGNATURE_V1, ALG_ED25519, NoteSignature, NoteSigner, NoteVerifier
from model.tlog import (
    AddCheckpointRequest,
    Checkpoint,
    add_signatures,
    parse_cosignature_reply,
    witness_add_checkpoint,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

T = 3  # heartbeat interval (s)
REFRESH = 1  # the relay re-submits an unchanged head whose newest cosignature is this old
BOUND = 6  # the follower's stale_after (T + grace)
RELAY = "relay.test"
CID = "c_schedule"
TRIED: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_schedules(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print("\nschedules tried per class:", dict(sorted(TRIED.items())))
        return
    with capman.global_and_fixture_disabled():
        print("\nschedules tried per class:", dict(sorted(TRIED.items())))


@dataclass
class Witness:
    signer: NoteSigner
    latest: dict[str, Checkpoint] = field(default_factory=dict)

    def add(
        self, request: AddCheckpointRequest, logs: dict[str, list[NoteVerifier]], now: int
    ) -> tuple[int, list[NoteSignature]]:
        reply = witness_add_checkpoint(
            request.encode(), logs=logs, latest=self.latest, cosigner=self.signer, now=now
        )
        if reply.status == 200:
            assert reply.cosigned is not None
            self.latest[reply.cosigned.origin] = reply.cosigned
            return reply.status, list(parse_cosignature_reply(reply.body))
        return reply.status, []


class World:
    """The relay, its two witnesses and one follower, one second per `step`."""

    def __init__(self) -> None:
        seed = hashlib.sha256(b"relay").digest()
        self.relay_pk = bytes(nacl.signing.SigningKey(seed).verify_key)
        self.signer = CheckpointSigner(RELAY, seed)
        self.origin = collab_origin(RELAY, CID)
        self.logs = {self.origin: [NoteVerifier(self.origin, ALG_ED25519, self.relay_pk)]}
        self.witnesses = [
            Witness(
                NoteSigner(f"w{i}.test", hashlib.sha256(b"w%d" % i).digest(), ALG_COSIGNATURE_V1)
            )
            for i in (1, 2)
        ]
        self.policy = WitnessPolicy(2, tuple(w.signer.verifier.vkey() for w in self.witnesses))
        self.tree = LeafTree([leaf_hash(b"genesis")])  # never empty
        self.lines: dict[str, NoteSignature] = {}  # witness -> its line for `cosigned`
        self.cosigned: tuple[int, bytes] | None = None
        self.last_cosign: dict[str, int] = {}
        self.book = CheckpointBook()
        self.fresh = 0
        self.started = 0

    def commit(self, n: int, t: int) -> None:
        for i in range(n):
            self.tree.append(leaf_hash(b"%d-%d" % (t, i)))

    def round(self, t: int, down: int | None) -> None:
        size = self.tree.size
        root = self.tree.root(size)
        note = self.signer.sign(CID, size, root, t)
        for i, w in enumerate(self.witnesses):
            name = w.signer.name
            old = w.latest.get(self.origin)
            grown = old is None or old.size != size
            if i == down or not (grown or t - self.last_cosign.get(name, -99) >= REFRESH):
                continue
            start = 0 if old is None else old.size
            request = AddCheckpointRequest(start, self.tree.consistency_proof(start, size), note)
            status, lines = w.add(request, self.logs, t)
            assert status == 200, status
            if self.cosigned != (size, root):
                self.cosigned, self.lines = (size, root), {}
            self.lines.update({line.name: line for line in lines})
            self.last_cosign[name] = t

    def head_note(self, size: int, t: int) -> bytes:
        root = self.tree.root(size)
        note = self.signer.sign(CID, size, root, t)
        lines = list(self.lines.values()) if self.cosigned == (size, root) else []
        return add_signatures(note, lines) if lines else note

    def take(self, note: bytes, size: int) -> None:
        """The follower's handling of a heartbeat or `caught_up` (clientkit/_history.py)."""
        try:
            dated = require_quorum(self.relay_pk, CID, note, self.policy)
        except QuorumNotMet:
            self.book.compare(self.relay_pk, CID, note)
            return
        held = self.book.tree_size(self.relay_pk, CID)
        proof = self.tree.consistency_proof(held, size) if held <= size else ()
        signed = self.book.check_head(self.relay_pk, CID, note, held, proof)
        assert dated == witnessed_at(self.relay_pk, signed, self.policy)
        self.fresh = max(self.fresh, dated)

    def age(self, t: int) -> int:
        return t - max(self.fresh, self.started)


second = st.tuples(
    st.integers(0, 3),  # events committed this second
    st.sampled_from([None, None, None, 0, 1]),  # a witness restarting (misses this round)
    st.booleans(),  # the follower reconnects (a fresh caught_up)
)


@pytest.mark.objective("SO-4")
@settings(max_examples=60, deadline=None)
@given(st.lists(second, min_size=4, max_size=30))
def test_honest_schedules_with_heartbeats_reconnects_and_witness_restarts_stay_fresh(
    schedule: list[tuple[int, int | None, bool]],
) -> None:
    TRIED["honest"] += 1
    world = World()
    world.round(0, None)
    world.take(world.head_note(world.tree.size, 0), world.tree.size)
    for t, (commits, down, reconnect) in enumerate(schedule, start=1):
        world.commit(commits, t)
        world.round(t, down)
        if t % T == 0 or reconnect:
            if world.cosigned != (world.tree.size, world.tree.root()) or len(world.lines) < 2:
                # The heartbeat waits for every witness's line, up to the next round
                # (`CollabTrees.cosign_wait`): the restarted witness answers it.
                world.round(t, None)
            world.take(world.head_note(world.tree.size, t), world.tree.size)
        assert world.age(t) <= BOUND, (t, world.fresh)


@pytest.mark.objective("SO-4")
@settings(max_examples=60, deadline=None)
@given(
    st.lists(second, min_size=2, max_size=12),
    st.lists(st.integers(0, 3), min_size=1, max_size=6).filter(any),
)
def test_a_frozen_head_goes_stale_within_the_bound_once_the_witnesses_saw_more(
    before: list[tuple[int, int | None, bool]], hidden: list[int]
) -> None:
    TRIED["freeze"] += 1
    world = World()
    world.round(0, None)
    world.take(world.head_note(world.tree.size, 0), world.tree.size)
    t = 0
    for t, (commits, down, _) in enumerate(before, start=1):
        world.commit(commits, t)
        world.round(t, None if down is None else down)
    world.round(t, None)  # the head the follower is frozen at, cosigned by both
    frozen = world.tree.size
    world.take(world.head_note(frozen, t), frozen)
    frozen_note = world.head_note(frozen, t)
    saw_more: int | None = None
    for commits in [*hidden, *([0] * (BOUND + T + 2))]:
        t += 1
        world.commit(commits, t)
        world.round(t, None)  # honest towards its witnesses
        if saw_more is None and world.cosigned is not None and world.cosigned[0] > frozen:
            saw_more = t
        # The best the relay can do: ask the witnesses to date the frozen head again, and
        # re-sign it itself with a fresh date and whatever lines it has.
        again = world.signer.sign(CID, frozen, world.tree.root(frozen), t)
        for w in world.witnesses:
            status, _ = w.add(AddCheckpointRequest(frozen, (), again), world.logs, t)
            assert status == 409 or saw_more is None
        old_lines = list(_witness_lines(frozen_note))
        if t % T == 0:
            world.take(add_signatures(again, old_lines), frozen)
    assert saw_more is not None
    assert world.age(saw_more + BOUND + T) > BOUND
    # On the relay's own date (the rule before issue 16's witness dating) it looked fresh.
    held = world.book.held(world.relay_pk, CID)
    assert held is not None
    assert held.size == frozen
    assert t - held.timestamp < T


def _witness_lines(note: bytes) -> Iterator[NoteSignature]:
    from model.note import parse_note

    for sig in parse_note(note).signatures:
        if sig.name.startswith("w"):
            yield sig
