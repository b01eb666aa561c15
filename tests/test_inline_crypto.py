"""Small crypto work runs on the Trio loop while the crypto pool is idle (relay/_cryptopool.py).

A crypto-pool round costs two thread hand-offs, ~130 µs of loop time each on a 2-core VM, and
whatever it carries waits for the round already running. At a trickle of appends, a batch of a
few signatures and a commit group's receipts (one checkpoint signature, a proof per event) cost
less than that, so they are done on the loop; while the pool is busy (a hundred collabs
committing together) they still go to it, so they run on every core in one round.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
import trio

from model import wire
from model.equivocation import SignedReceipt, open_receipt
from relay._verifying import INLINE_VERIFY
from tests.relay_harness import session, sign_up

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ledger import AppendRequest
    from relay._server import Relay
    from relay._writer import Written


async def test_a_few_appends_are_verified_and_receipted_on_the_loop_while_the_pool_is_idle(
    relay: Relay,
) -> None:
    """Old code: a batch of more than two signatures took a pool round, and so did every
    group's receipts."""
    pool = relay._sequencers._crypto
    alice = await sign_up(relay.url, "alice")
    async with session(relay.url, alice) as client:
        await client.append(alice.event("the actor starts"))
        rounds = pool.rounds
        acks = await client.append_many([alice.event(f"m{i}") for i in range(INLINE_VERIFY)])
        assert pool.rounds == rounds, "a few appends waited for a crypto-pool round"
    assert [a.seq for a in acks] == list(range(acks[0].seq, acks[0].seq + INLINE_VERIFY))
    _assert_proven(relay, acks)


async def test_a_lone_groups_receipts_skip_an_idle_crypto_pool_but_queue_behind_a_busy_one(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trickle of appends (one per commit group) gets its receipts made on the loop: the
    pool's round would cost two thread hand-offs, more loop time than the signature itself.
    While the pool is busy they still go to it, so a hundred collabs committing together sign
    on every core instead of on the loop. Either way the receipt proves the event stored.
    Old code: every group's receipts took a pool round. Without the idle check, the second
    append is acked while the pool is still held."""
    pool = relay._sequencers._crypto
    writer = relay._sequencers._writer
    alice = await sign_up(relay.url, "alice")
    async with session(relay.url, alice) as client, trio.open_nursery() as nursery:
        await client.append(alice.event("the actor starts"))
        rounds = pool.rounds
        lone = await client.append(alice.event("alone in its group"))
        assert pool.rounds == rounds, "a lone group's receipts waited for a crypto-pool round"

        # Next, the pool is made busy between the commit and the receipts: the event was
        # verified on the loop, and only its receipts can wait for the pool.
        holding, release = threading.Event(), threading.Event()

        def hold(items: Sequence[int]) -> list[bool]:
            holding.set()
            return [release.wait(10) for _ in items]

        write = writer.write

        async def write_then_hold(
            request: AppendRequest, timing: list[float] | None = None
        ) -> Written:
            written = await write(request, timing)
            nursery.start_soon(pool.map, hold, [0])
            await trio.to_thread.run_sync(holding.wait, 10)
            return written

        monkeypatch.setattr(writer, "write", write_then_hold)
        acked: list[wire.Appended] = []

        async def append_while_busy() -> None:
            acked.append(await client.append(alice.event("behind a busy pool")))

        nursery.start_soon(append_while_busy)
        await trio.to_thread.run_sync(holding.wait, 10)
        await trio.sleep(0.5)
        assert not acked, "receipts were made on the loop while the crypto pool was busy"
        release.set()
    _assert_proven(relay, [lone, *acked])


def _assert_proven(relay: Relay, acks: Sequence[wire.Appended]) -> None:
    """Each ack's receipt opens under the relay's key and covers the ack's seq."""
    for ack in acks:
        head = open_receipt(relay.relay_pk, SignedReceipt.of_ack(ack))
        assert head is not None
        assert head.size >= ack.seq
