"""How one collab's appends are grouped into transactions while a commit is under way.

The sequencer writes one collab's batches one at a time (each waits for the previous commit),
so whatever arrives meanwhile must go into the *next* transaction together: otherwise, under a
steady stream, every event queues behind one commit per batch ahead of it and the latency
grows with the queue (docs/performance.md, "Where the latency goes").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import trio

from model import wire
from model.envelope import event_id
from tests.fault_harness import CuttingProxy
from tests.relay_harness import relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from pathlib import Path

    from model.envelope import SignedEvent


async def test_appends_that_arrive_during_a_commit_share_the_next_transaction(
    database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            proxy = CuttingProxy(database_url)
            await nursery.start(proxy.serve)
            async with running_relay(relay_config(proxy.url(), tmp_path / "relay")) as relay:
                alice = await sign_up(relay.url)
                async with session(relay.url, alice) as client, trio.open_nursery() as appends:
                    acks: dict[bytes, wire.Appended] = {}

                    async def append(event: SignedEvent) -> None:
                        acks[event_id(event)] = await client.append(event, retry_for=0)

                    proxy.arm("hold_commit")
                    appends.start_soon(append, alice.event("held"))
                    await proxy.wait_cut()  # its COMMIT is held: the collab's writer waits
                    later = [alice.event(f"later {i}") for i in range(3)]
                    for event in later:  # each alone: three batches of the verify stage
                        appends.start_soon(append, event)
                        await trio.sleep(0.3)
                    proxy.release()
            nursery.cancel_scope.cancel()
    assert len(acks) == 4
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT event_id, xmin::text FROM events WHERE event_id = ANY(%s)",
            ([event_id(e) for e in later],),
        ).fetchall()
    transaction = {bytes(eid): xid for eid, xid in rows}
    first, second, _ = (transaction[event_id(e)] for e in later)
    # The first two were verified while the held commit ran: one transaction, not two.
    assert first == second, "appends queued behind a commit were written one transaction each"
