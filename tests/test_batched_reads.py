"""A long history read on every core (clientkit/_verifiers.py), against a real relay.

Frames come off a subscription in batches; worker threads check each batch's signatures and
open its content with the reader's epoch keys while the fold takes in the batch before. What a
reader sees must not depend on it: every message as it was posted, and content signed by a
member that does not open shown as unreadable, exactly as the fold alone shows it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clientkit import _verifiers
from model._crypto import random_bytes
from model.envelope import seal_event
from tests.collab_sim import text_of
from tests.relay_harness import session, sign_up

if TYPE_CHECKING:
    import pytest

    from relay._server import Relay

TS0 = 1_700_000_000_000


async def test_a_history_longer_than_a_batch_reads_as_posted_with_the_workers_opening_it(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
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
    opened_ahead: list[int] = []
    precheck = _verifiers.precheck

    def counted(batch: Any, keys: Any, collab_keys: Any = None) -> Any:
        checked = precheck(batch, keys, collab_keys)
        opened_ahead.append(len(checked._opened))
        return checked

    monkeypatch.setattr(_verifiers, "precheck", counted)
    async with session(relay.url, alice) as reader:
        async with reader.history(alice.collab_id, alice.box_key) as history:
            entries = [entry async for entry in history]
    read = [text_of(e) for e in entries if e.seq > 1]  # after the genesis
    assert read == [*texts[:garbled_at], None, *texts[garbled_at:]]
    assert "does not open" in (entries[garbled_at + 1].unreadable or "")
    assert sum(opened_ahead) > 0  # the workers ran, and opened content
