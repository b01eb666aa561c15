"""A long history read on every core (clientkit/_verifiers.py, ADR-0023), against a real relay.

Frames come off a subscription in batches; worker processes check each batch's signatures
while the fold takes in the batch before. What a reader sees must not depend on it: every
message as it was posted, content signed by a member that does not open shown as unreadable,
exactly as the fold alone shows it, and a relay that tampers with one event in the middle of a
batch caught at that event, as the fold alone catches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from clientkit import TamperDetected, _sigprocs, _verifiers, connect
from clientkit.testing import Lie, LyingRelay, Misbehaviour
from model._crypto import random_bytes
from model.envelope import seal_event
from tests.collab_sim import text_of
from tests.relay_harness import User, session, sign_up

if TYPE_CHECKING:
    from relay._server import Relay

TS0 = 1_700_000_000_000


async def test_a_history_longer_than_a_batch_reads_as_posted_with_the_workers_checking_it(
    relay: Relay,
) -> None:
    alice = await sign_up(relay.url, "alice")
    texts = [f"message {i}" for i in range(_verifiers.BATCH + 256)]
    events = [alice.event(t, ts=TS0 + i) for i, t in enumerate(texts)]
    garbled_at = len(events) // 2  # signed by alice, sealed under a key nobody holds
    events.insert(
        garbled_at,
        seal_event(
            signing_key=alice.signing_key,
            collab_key=random_bytes(32),
            collab_id=alice.collab_id,
            actor_id=alice.account_id,
            kind="msg",
            ts=TS0 + len(events),
            content=b"lost",
            epoch=0,
        ),
    )
    async with session(relay.url, alice) as poster:
        await poster.append_many(events)
    answered = _sigprocs.checkers().answered
    async with session(relay.url, alice) as reader:
        async with reader.history(alice.collab_id, alice.box_key) as history:
            await trio.sleep(0.5)  # the history arrives meanwhile: it is read in large batches
            entries = [entry async for entry in history]
    read = [text_of(e) for e in entries if e.seq > 1]  # after the genesis
    assert read == [*texts[:garbled_at], None, *texts[garbled_at:]]
    assert "does not open" in (entries[garbled_at + 1].unreadable or "")
    # Worker processes checked batches (how many events arrive in a batch depends on timing).
    assert _sigprocs.checkers().answered > answered


async def posted(relay: Relay, count: int) -> User:
    alice = await sign_up(relay.url, "alice")
    async with session(relay.url, alice) as poster:
        await poster.append_many([alice.event(f"m{i}", ts=TS0 + i) for i in range(count)])
    return alice


@pytest.mark.objective("SO-3")
async def test_a_relay_that_forges_inside_a_checked_batch_is_caught_at_that_event(
    relay: Relay,
) -> None:
    """A byte of one event's ciphertext flipped by the relay, which re-chains the history from
    it (`Lie.FORGE`: the chain holds, only the author's signature shows the lie), deep inside a
    batch the worker processes check: their verdict for it is "does not hold", the fold checks
    it itself and raises `TamperDetected` there, and nothing from it on is handed out. Seen
    failing with a plan whose result marks every check as held: the forged event was read."""
    alice = await posted(relay, _verifiers.BATCH + 100)
    at = _verifiers.BATCH // 2 + 7  # mid-batch, with checked events on both sides
    read: list[int] = []
    forge = Misbehaviour(Lie.FORGE, at)
    async with LyingRelay(relay.url, plan=lambda _n: forge).running() as url:
        async with connect(url) as client:
            await client.authenticate(alice.token)
            with pytest.raises(TamperDetected, match=f"at seq {at}: .*signature"):
                async with client.history(alice.collab_id, alice.box_key) as history:
                    await trio.sleep(1)  # the history arrives meanwhile: it is read in batches
                    async for entry in history:
                        read.append(entry.seq)
    assert read == list(range(1, at))
