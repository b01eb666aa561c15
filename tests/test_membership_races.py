"""A removal racing an authorization (issue 14, bug 4; SO-7).

The relay checks a sender's membership with a database lookup, then caches it on the
connection. A removal that commits while that lookup is in flight must win: before the fix the
lookup's stale "member" answer was cached after the removal had evicted the cache, and the
subscription it authorized registered after the eviction, so the removed member kept a live
feed (and the stale cache authorized tool calls and downloads for the rest of the connection).
The database is slowed exactly where the race is: the member's own lookup is held until the
removal has committed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
import trio

from clientkit import RelayRefused, _collab
from model import wire
from tests.relay_harness import post, session, sign_up
from tests.test_membership_relay import add

if TYPE_CHECKING:
    from relay._server import Relay

QUIET = 1.0


@pytest.mark.objective("SO-7")
async def test_a_removal_that_commits_during_a_subscribes_lookup_leaves_no_live_feed(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await sign_up(relay.url)
    bob = await sign_up(relay.url)
    async with session(relay.url, alice) as owner:
        await add(owner, alice, bob)

    looked_up = threading.Event()
    removal_committed = threading.Event()
    real_member = relay.ledger.member

    def slow_member(collab_id: str, account_id: str) -> tuple[str, tuple[str, ...]] | None:
        """Bob's lookup reads his membership, then waits for the removal before answering."""
        found = real_member(collab_id, account_id)
        if account_id == bob.account_id and not removal_committed.is_set():
            looked_up.set()
            removal_committed.wait(timeout=20)
        return found

    monkeypatch.setattr(relay.ledger, "member", slow_member)

    after: list[wire.Reply] = []
    refused: list[RelayRefused] = []
    with trio.fail_after(60):
        async with session(relay.url, bob) as reader, session(relay.url, alice) as owner:

            async def subscribe_as_bob() -> None:
                try:
                    async with reader.subscribe(alice.collab_id) as frames:
                        while True:
                            with trio.move_on_after(QUIET * 3):
                                after.append(await frames.receive())
                                continue
                            return
                except RelayRefused as exc:
                    refused.append(exc)
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(subscribe_as_bob)
                staged = await trio.to_thread.run_sync(looked_up.wait, 20)
                assert staged, "Bob's membership lookup never reached the ledger: no race was run"
                await owner.manage(
                    alice.signing_key,
                    alice.box_key,
                    alice.collab_id,
                    lambda v: _collab.remove(v, bob.account_id),
                )
                removal_committed.set()
                await trio.sleep(QUIET)  # the stale answer reaches the relay's cache now
                seq = await post(owner, alice, alice.collab_id, "after bob left")
            # The stale answer was not cached either: the same connection is checked afresh.
            with pytest.raises(RelayRefused) as later:
                async with reader.subscribe(alice.collab_id):
                    pass
    assert later.value.code is wire.ErrorCode.UNAUTHORIZED
    delivered = [f.seq for f in after if isinstance(f, wire.Event)]
    assert seq not in delivered, "a removed member kept a live feed through a racing lookup"
    if not refused:  # accepted before the removal: then it must have been ended by it
        assert any(isinstance(f, wire.SubscriptionEnded) for f in after), after
