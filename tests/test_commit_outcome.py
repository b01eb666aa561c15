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
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ledger import Ledger, LedgerUnavailable
from tests.helpers import make_account, make_collab, make_events

if TYPE_CHECKING:
    from collections.abc import Iterator

COMMIT = b"COMMIT\x00"


class CuttingProxy:
    """TCP on loopback → the Postgres unix socket; `arm(mode)` cuts the next COMMIT.

    ``after_commit``: forward COMMIT, swallow the server's reply, then close both sides.
    ``instead_of_commit``: close both sides without forwarding COMMIT.
    """

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path
        self.port = 0
        self.mode: str | None = None
        self.cuts = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_unix_socket(self._socket_path)
        swallow = trio.Event()
        async with client, server, trio.open_nursery() as nursery:

            async def upstream() -> None:
                async for data in client:
                    if self.mode is not None and COMMIT in data:
                        mode, self.mode = self.mode, None
                        self.cuts += 1
                        if mode == "after_commit":
                            swallow.set()
                            await server.send_all(data)
                            await trio.sleep(0.5)  # the server commits; its reply is dropped
                        nursery.cancel_scope.cancel()
                        return
                    await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                async for data in server:
                    if not swallow.is_set():
                        await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)


@pytest.fixture
def direct(database_url: str) -> Iterator[Ledger]:
    store = Ledger(database_url)
    store.open()
    try:
        yield store
    finally:
        store.close()


async def _through_proxy(database_url: str, nursery: trio.Nursery) -> tuple[CuttingProxy, str]:
    params = conninfo_to_dict(database_url)
    socket_path = f"{params['host']}/.s.PGSQL.{params.get('port') or 5432}"
    proxy = CuttingProxy(socket_path)
    await nursery.start(proxy.serve)
    # sslmode=disable: the proxy is plain TCP on loopback to a unix socket.
    url = make_conninfo(database_url, host="127.0.0.1", port=str(proxy.port), sslmode="disable")
    return proxy, url


async def test_a_commit_whose_reply_is_lost_is_found_committed(
    database_url: str, direct: Ledger
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy, url = await _through_proxy(database_url, nursery)
            owner = make_account(direct)
            collab_id, key = make_collab(direct, owner)
            events = make_events(owner, collab_id, key, 5)
            ledger = Ledger(url)
            await trio.to_thread.run_sync(ledger.open)
            try:
                proxy.mode = "after_commit"
                head, assigned = await trio.to_thread.run_sync(
                    ledger.append_batch, collab_id, direct.head(collab_id), events
                )
            finally:
                ledger.close()
            assert proxy.cuts == 1  # the reply to COMMIT really was lost
            stored = direct.read_range(collab_id, 2, 100)
            assert [(e.seq, e.chain) for e in stored] == [(a.seq, a.chain) for a in assigned]
            assert [a.seq for a in assigned] == [2, 3, 4, 5, 6]
            assert direct.head(collab_id) == head
            nursery.cancel_scope.cancel()


async def test_a_commit_that_never_reached_the_server_is_refused(
    database_url: str, direct: Ledger
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy, url = await _through_proxy(database_url, nursery)
            owner = make_account(direct)
            collab_id, key = make_collab(direct, owner)
            events = make_events(owner, collab_id, key, 5)
            ledger = Ledger(url)
            await trio.to_thread.run_sync(ledger.open)
            try:
                proxy.mode = "instead_of_commit"
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
            assert [a.seq for a in assigned] == [2, 3, 4, 5, 6]
            assert not any(a.duplicate for a in assigned)
            nursery.cancel_scope.cancel()
