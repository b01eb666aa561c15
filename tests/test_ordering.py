"""A relay that lies about order is caught (SO-4): property tests over generated histories.

Honest histories come from `tests.collab_sim.Sim` (three members posting, each with a random
lag: it wrote concurrently with the last few events). A `clientkit.testing.lie` then rewrites
the history the way a compromised relay could — re-chaining it so that the chain alone looks
fine — and a fresh reader folds what it is shown. For each class the test states when the lie
is provable (docs/ordering.md) and checks: provable ⇒ an alarm of the right kind, never an
alarm on the honest history, and for the lies no evidence can expose (a consistent reorder of
concurrent events, a dropped event nobody later built on) — no alarm either, because then the
presented history is one an honest relay could have produced.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given, settings

from clientkit._history import _link
from clientkit.testing import Lie, Misbehaviour, lie, withheld_lie
from fanout._fanout import _encode_withheld, _frame_for
from model import content as contentmod
from model import wire
from model.envelope import (
    KIND_MANAGEMENT,
    SequencedEvent,
    audience_of,
    decode_body,
    open_content,
    verify_event,
)
from model.errors import ModelError
from model.membership import Role
from model.view import (
    CollabView,
    ForkProven,
    ReorderProven,
    ReplayProven,
    ViewRejected,
    WithholdingProven,
)
from tests.collab_sim import Sim
from tests.helpers import Person

if TYPE_CHECKING:
    from collections.abc import Iterator

TRIED: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_schedules(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else _nothing():
        print("\nschedules tried per misbehaviour class:", dict(sorted(TRIED.items())))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


# A history: after the setup (genesis, two adds), posts by (author index, lag).
POSTS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=2, max_size=14)


def honest(posts: list[tuple[int, int]]) -> tuple[Sim, list[Person], int]:
    people = [Person(), Person(), Person()]
    sim = Sim(people[0])
    sim.add(people[0], people[1])
    sim.add(people[0], people[2])
    setup = sim.head.seq
    for n, (who, lag) in enumerate(posts):
        sim.post(people[who], f"post {n}", lag=min(lag, n))
    return sim, people, setup


def history(sim: Sim) -> list[SequencedEvent]:
    return [SequencedEvent(sim.collab_id, seq, e, c) for seq, e, c in sim.events]


def read(sim: Sim, reader: Person, presented: list[SequencedEvent]) -> ModelError | None:
    view = CollabView(sim.collab_id, reader.id, reader.box)
    try:
        for e in presented:
            view.ingest(e.seq, e.event, e.chain)
    except ModelError as exc:
        return exc
    return None


def _evidence(sim: Sim, reader: Person) -> list[tuple[int, str, int, int]]:
    """(seq, author, seen_seq, device counter) of every content event, as the reader reads it."""
    view = CollabView(sim.collab_id, reader.id, reader.box)
    out = []
    for seq, signed, chain in sim.events:
        view.ingest(seq, signed, chain)
        body = decode_body(signed.body)
        if body.kind == KIND_MANAGEMENT:
            continue

        key = view.key_for(body.epoch)
        assert key is not None
        verified = verify_event(signed, decode_author_pk(sim, body.actor_id), decoded=body)
        _, ev = contentmod.decode_content(open_content(verified, key))
        assert ev is not None
        out.append((seq, body.actor_id, ev.seen_seq, ev.counter))
    return out


def decode_author_pk(sim: Sim, account_id: str) -> bytes:
    assert sim.state is not None
    return sim.state.members[account_id].sign_pk


@pytest.mark.objective("SO-4")
@settings(max_examples=150, deadline=None)
@given(posts=POSTS, reader=st.integers(0, 2))
def test_an_honest_history_never_alarms(posts: list[tuple[int, int]], reader: int) -> None:
    TRIED["honest"] += 1
    sim, people, _ = honest(posts)
    assert read(sim, people[reader], history(sim)) is None


ALWAYS = {
    Lie.GAP: WithholdingProven,
    Lie.DUPLICATE: ReorderProven,
    Lie.REPLAY: ReplayProven,
    Lie.TAMPER: ViewRejected,
}


@pytest.mark.objective("SO-4")
@settings(max_examples=400, deadline=None)
@given(
    posts=POSTS,
    lie_kind=st.sampled_from(sorted(ALWAYS)),
    at=st.integers(0, 13),
    reader=st.integers(0, 2),
)
def test_gaps_duplicates_replays_and_tampering_are_always_caught(
    posts: list[tuple[int, int]], lie_kind: Lie, at: int, reader: int
) -> None:
    TRIED[lie_kind.value] += 1
    sim, people, setup = honest(posts)
    # A gap at the very end is a withheld tail (below), not a gap.
    seq = setup + 1 + at % (len(posts) - (lie_kind is Lie.GAP))
    alarm = read(sim, people[reader], lie(history(sim), Misbehaviour(lie_kind, seq)))
    assert isinstance(alarm, ALWAYS[lie_kind]), alarm


@pytest.mark.objective("SO-4")
@settings(max_examples=60, deadline=None)
@given(posts=POSTS, at=st.integers(0, 13), reader=st.integers(0, 2))
def test_an_event_spliced_in_from_another_collab_is_caught(
    posts: list[tuple[int, int]], at: int, reader: int
) -> None:
    TRIED["splice"] += 1
    sim, people, setup = honest(posts)
    other, _, _ = honest(posts[:2])
    foreign = history(other)[-1]
    seq = setup + 1 + at % len(posts)
    alarm = read(sim, people[reader], lie(history(sim), Misbehaviour(Lie.SPLICE, seq, foreign)))
    assert isinstance(alarm, ViewRejected), alarm


@pytest.mark.objective("SO-4")
@settings(max_examples=300, deadline=None)
@given(posts=POSTS, at=st.integers(0, 13), reader=st.integers(0, 2))
def test_a_dropped_event_is_caught_exactly_when_a_later_event_built_on_it(
    posts: list[tuple[int, int]], at: int, reader: int
) -> None:
    # The relay drops one event and renumbers and re-chains the rest (a consistent fork). It is
    # provable as soon as any later event's author had seen it (their seen head no longer
    # matches) or the dropped event's author posted again (their stream skips a number).
    TRIED["drop"] += 1
    sim, people, setup = honest(posts)
    k = setup + 1 + at % len(posts)
    evidence = _evidence(sim, people[reader])
    dropped_author = next(a for s, a, _, _ in evidence if s == k)
    provable = any(s > k and (seen >= k or a == dropped_author) for s, a, seen, _ in evidence)
    alarm = read(sim, people[reader], lie(history(sim), Misbehaviour(Lie.DROP, k)))
    if provable:
        assert isinstance(alarm, (ForkProven, ReorderProven, WithholdingProven)), alarm
    else:
        assert alarm is None, "an unprovable drop was flagged: honest concurrency would be too"


@pytest.mark.objective("SO-4")
@settings(max_examples=300, deadline=None)
@given(posts=POSTS, at=st.integers(0, 12), reader=st.integers(0, 2))
def test_a_reorder_is_caught_exactly_when_someone_saw_the_true_order(
    posts: list[tuple[int, int]], at: int, reader: int
) -> None:
    # Two neighbours k, k+1 swapped (re-chained). Provable when they share an author (its stream
    # runs backwards), when k+1's author had seen k, or when a later author saw either position.
    TRIED["swap"] += 1
    sim, people, setup = honest(posts)
    k = setup + 1 + at % (len(posts) - 1)
    evidence = {s: (a, seen) for s, a, seen, _ in _evidence(sim, people[reader])}
    (a1, _), (a2, seen2) = evidence[k], evidence[k + 1]
    provable = (
        a1 == a2 or seen2 >= k or any(s > k + 1 and seen >= k for s, (_, seen) in evidence.items())
    )
    alarm = read(sim, people[reader], lie(history(sim), Misbehaviour(Lie.SWAP, k)))
    if provable:
        # The alarm names the first proof met: a stream that skips (#2 before #1) is one too.
        assert isinstance(alarm, (ForkProven, ReorderProven, WithholdingProven)), alarm
    else:
        assert alarm is None, "an unprovable reorder was flagged: it is a valid honest order"


@pytest.mark.objective("SO-4")
@settings(max_examples=60, deadline=None)
@given(posts=POSTS, cut=st.integers(1, 13), reader=st.integers(0, 2))
def test_a_withheld_tail_reads_clean_alone_and_is_caught_against_a_saved_head(
    posts: list[tuple[int, int]], cut: int, reader: int
) -> None:
    # Withholding the newest events from a reader who never saw them is indistinguishable from
    # a quiet collab (docs/ordering.md); a reader who saved a later head catches it.
    TRIED["truncate"] += 1
    sim, people, _ = honest(posts)
    full = history(sim)
    k = len(full) - cut % len(posts)
    presented = lie(full, Misbehaviour(Lie.TRUNCATE, k))
    assert read(sim, people[reader], presented) is None
    saved = full[-1]
    view = CollabView(sim.collab_id, people[reader].id, people[reader].box)
    for e in presented:
        view.ingest(e.seq, e.event, e.chain)
    assert view.head.seq < saved.seq  # what `expect=` turns into ForkDetected (client level)


# --- DMs and withheld links -----------------------------------------------------------------

# After the setup: (author, recipient or None for a post, lag).
WITH_DMS = st.lists(
    st.tuples(st.integers(0, 2), st.none() | st.integers(0, 2), st.integers(0, 3)),
    min_size=1,
    max_size=10,
)


def with_dms(actions: list[tuple[int, int | None, int]]) -> tuple[Sim, list[Person]]:
    people = [Person(), Person(), Person()]
    sim = Sim(people[0])
    sim.add(people[0], people[1])
    sim.add(people[0], people[2])
    for n, (who, to, lag) in enumerate(actions):
        if to is None or to == who:
            sim.post(people[who], f"post {n}", lag=min(lag, n))
        else:
            sim.dm(people[who], people[to].as_member(Role.MEMBER), f"dm {n}")
    return sim, people


def read_frames(sim: Sim, reader: Person, frames: list[wire.Event | wire.Withheld]) -> CollabView:
    """Fold what `reader` is sent, as `clientkit` does (raises what the fold raises)."""
    view = CollabView(sim.collab_id, reader.id, reader.box)
    for frame in frames:
        if isinstance(frame, wire.Withheld):
            view.ingest_withheld(frame.seq, frame.event_id, frame.chain, _link(frame), frame.sig)
        else:
            view.ingest(frame.seq, frame.event, frame.chain)
    return view


def as_sent_to(sim: Sim, reader: Person) -> list[wire.Event | wire.Withheld]:
    """The frames the relay's fan-out sends `reader` for this history (its real encoder)."""
    out = []
    for e in history(sim):
        seq_event = SequencedEvent(e.collab_id, e.seq, e.event, e.chain,
                                   audience_of(decode_body(e.event.body)))  # fmt: skip
        frame = wire.decode_reply(_frame_for(seq_event, reader.id))
        assert isinstance(frame, wire.Event | wire.Withheld)
        out.append(frame)
    return out


@pytest.mark.objective("SO-4")
@settings(max_examples=60, deadline=None)
@given(actions=WITH_DMS)
def test_an_honest_history_with_dms_never_alarms_and_every_member_reaches_one_head(
    actions: list[tuple[int, int | None, int]],
) -> None:
    TRIED["honest with dms"] += 1
    sim, people = with_dms(actions)
    heads = set()
    for reader in people:
        frames = as_sent_to(sim, reader)
        view = read_frames(sim, reader, frames)  # no alarm
        heads.add((view.head.seq, view.head.chain))
        for frame in frames:
            if isinstance(frame, wire.Withheld):
                assert reader.id not in (frame.author_id, frame.recipient_id)
    assert len(heads) == 1


@pytest.mark.objective("SO-4")
@settings(max_examples=60, deadline=None)
@given(actions=WITH_DMS, reader=st.integers(0, 2), at=st.integers(0, 100), relabel=st.booleans())
def test_an_invented_or_relabelled_withheld_link_is_always_caught(
    actions: list[tuple[int, int | None, int]], reader: int, at: int, relabel: bool
) -> None:
    lie_kind = Lie.RELABEL_WITHHELD if relabel else Lie.INVENT_WITHHELD
    TRIED[lie_kind.value] += 1
    sim, people = with_dms(actions)
    full = history(sim)
    seq = 1 + at % len(full)
    honest_frames = {f.seq: f for f in as_sent_to(sim, people[reader])}
    presented = withheld_lie(full, Misbehaviour(lie_kind, seq))
    # The harness shows the reader the whole history; put back what the relay withholds from
    # it honestly, so the only lie is the one told.
    frames = [
        f if isinstance(f, wire.Withheld) or f.seq not in honest_frames else honest_frames[f.seq]
        for f in presented
    ]
    with pytest.raises(ViewRejected):
        read_frames(sim, people[reader], frames)


@pytest.mark.objective("SO-4")
def test_a_dm_shown_as_withheld_to_its_own_participants_is_caught() -> None:
    """The relay holds the DM and can send its genuine signed link, but not to the two people
    it is for: that would hide it from them."""
    alice, bob, carol = Person(), Person(), Person()
    sim = Sim(alice)
    sim.add(alice, bob)
    sim.add(alice, carol)
    sim.dm(alice, bob.as_member(Role.MEMBER), "for bob")
    *before, dm = history(sim)
    real_link = wire.decode_reply(
        _encode_withheld(msgspec.structs.replace(dm, audience=(alice.id, bob.id)))
    )
    assert isinstance(real_link, wire.Withheld)
    shown = [wire.Event(collab_id=e.collab_id, seq=e.seq, event=e.event, chain=e.chain)
             for e in before]  # fmt: skip
    assert read_frames(sim, carol, [*shown, real_link]).head.seq == dm.seq  # a third: fine
    for participant in (alice, bob):
        with pytest.raises(ViewRejected, match="it was hidden"):
            read_frames(sim, participant, [*shown, real_link])
