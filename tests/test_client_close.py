"""Closing a client connection: a prompt close handshake (code 1000), even when cancelled.

trio-websocket's `aclose` waits for its reader task to see the relay's answering close frame;
a caller cancelled from outside used to cancel that reader too, so every such close sat out the
whole timeout (2 s) and never completed the handshake. The bound must still hold for a peer
that never answers.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

import trio
import wsproto
import wsproto.events

import clientkit._transport as transport
from clientkit import connect
from clientkit._transport import open_websocket
from model import wire

if TYPE_CHECKING:
    import pytest

    from relay._connection import Connection
    from relay._server import Relay

PROMPT = 0.5  # seconds: generous for a loopback close that takes about a millisecond


def _only_connection(relay: Relay) -> Connection:
    [conn] = relay._connections
    return conn


async def test_a_client_closes_promptly_with_code_1000(relay: Relay) -> None:
    with trio.fail_after(10):
        async with connect(relay.url) as client:
            await client.request(lambda rid: wire.Ping(rid=rid), wire.Pong)
            conn = _only_connection(relay)
            started = time.monotonic()
        took = time.monotonic() - started
        assert took < PROMPT, took
        assert conn.ws.closed is not None
        assert conn.ws.closed.code == 1000


async def test_a_cancelled_client_still_closes_promptly_with_code_1000(relay: Relay) -> None:
    with trio.fail_after(10):
        # Cancelled from outside while connected: the reader task must survive to finish the
        # close handshake.
        with trio.move_on_after(60) as scope:
            async with connect(relay.url) as client:
                await client.request(lambda rid: wire.Ping(rid=rid), wire.Pong)
                conn = _only_connection(relay)
                started = time.monotonic()
                scope.cancel()
                await trio.sleep_forever()
        took = time.monotonic() - started
        assert scope.cancelled_caught
        assert took < PROMPT, took
        assert conn.ws.closed is not None
        assert conn.ws.closed.code == 1000


async def test_cancelling_the_nursery_before_the_websocket_closes_stays_prompt(
    relay: Relay,
) -> None:
    with trio.fail_after(10):
        for _ in range(3):
            async with trio.open_nursery() as nursery, open_websocket(relay.url, nursery) as ws:
                await ws.get_message()  # the welcome
                conn = _only_connection(relay)
                started = time.monotonic()
                nursery.cancel_scope.cancel()
            took = time.monotonic() - started
            assert took < PROMPT, took
            assert conn.ws.closed is not None
            assert conn.ws.closed.code == 1000


async def _accept_and_ignore(stream: trio.SocketStream) -> None:
    """A WebSocket server that accepts the upgrade and then never reads again."""
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    while True:
        server.receive_data(await stream.receive_some())
        if any(isinstance(e, wsproto.events.Request) for e in server.events()):
            break
    await stream.send_all(server.send(wsproto.events.AcceptConnection()))
    await trio.sleep_forever()


async def test_a_peer_that_never_answers_the_close_costs_only_the_bound(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport, "CLOSE_TIMEOUT", 0.3)
    with trio.fail_after(10):
        [listener] = await nursery.start(
            partial(trio.serve_tcp, _accept_and_ignore, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        for cancelled in (False, True):
            with trio.move_on_after(60) as scope:
                async with trio.open_nursery() as conns:
                    async with open_websocket(f"ws://127.0.0.1:{port}/", conns):
                        started = time.monotonic()
                        if cancelled:
                            scope.cancel()
            took = time.monotonic() - started
            assert scope.cancelled_caught is cancelled
            assert 0.3 <= took < 0.3 + PROMPT, (cancelled, took)
