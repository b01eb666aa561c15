"""A commit whose reply is lost is settled by asking Postgres, never guessed (SPEC §9).

The ledger reaches Postgres through a loopback proxy that can cut the connection at the worst
moment: right after forwarding COMMIT (the server commits, the reply never arrives) or instead
of forwarding it (the server rolls back). Either way the ledger must tell which happened: return
the assignments only when the rows are stored, and raise `LedgerUnavailable` when they are not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from ledger import Ledger, LedgerUnavailable
from ledger._events import PIPELINED_EVENTS
from tests.fault_harness import CuttingProxy
from tests.helpers import make_account, make_collab, make_events

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def direct(database_url: str) -> Iterator[Ledger]:
    store = Ledger(database_url)
    store.open()
    try:
        yield store
    finally:
        store.close()


async def _through_proxy(database_url: str, nursery: trio.Nursery) -> tuple[CuttingProxy, str]:
    proxy = CuttingProxy(database_url)
    await nursery.start(proxy.serve)
    return proxy, proxy.url()


# A small group is written in pipeline mode, a large one with COPY (ledger/_events.py): both
# must learn their transaction id before COMMIT is sent.
GROUP_SIZES = pytest.mark.parametrize("size", [5, PIPELINED_EVENTS + 1], ids=["pipelined", "copy"])


@GROUP_SIZES
async def test_a_commit_whose_reply_is_lost_is_found_committed(
    database_url: str, direct: Ledger, size: int
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy, url = await _through_proxy(database_url, nursery)
            owner = make_account(direct)
            collab_id, key = make_collab(direct, owner)
            events = make_events(owner, collab_id, key, size)
            ledger = Ledger(url)
            await trio.to_thread.run_sync(ledger.open)
            try:
                proxy.arm("after_commit")
                head, assigned = await trio.to_thread.run_sync(
                    ledger.append_batch, collab_id, direct.head(collab_id), events
                )
            finally:
                ledger.close()
            assert proxy.cuts == 1  # the reply to COMMIT really was lost
            stored = direct.read_range(collab_id, 2, 100)
            assert [(e.seq, e.chain) for e in stored] == [(a.seq, a.chain) for a in assigned]
            assert [a.seq for a in assigned] == list(range(2, 2 + size))
            assert direct.head(collab_id) == head
            nursery.cancel_scope.cancel()


@GROUP_SIZES
async def test_a_commit_that_never_reached_the_server_is_refused(
    database_url: str, direct: Ledger, size: int
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy, url = await _through_proxy(database_url, nursery)
            owner = make_account(direct)
            collab_id, key = make_collab(direct, owner)
            events = make_events(owner, collab_id, key, size)
            ledger = Ledger(url)
            await trio.to_thread.run_sync(ledger.open)
            try:
                proxy.arm("instead_of_commit")
                with pytest.raises(LedgerUnavailable, match="nothing was stored"):
                    await trio.to_thread.run_sync(
                        ledger.append_batch, collab_id, direct.head(collab_id), events
                    )
                assert proxy.cuts == 1
                assert direct.head(collab_id).seq == 1  # only the genesis
                # The same ledger (its pool replaced the dropped connection) appends again.
                _, assigned = await trio.to_thread.run_sync(
                    ledger.append_batch, collab_id, direct.head(collab_id), events
                )
            finally:
                ledger.close()
            assert [a.seq for a in assigned] == list(range(2, 2 + size))
            assert not any(a.duplicate for a in assigned)
            nursery.cancel_scope.cancel()
