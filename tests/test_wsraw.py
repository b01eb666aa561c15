"""relay/_wsraw.py, the relay's own WebSocket server: a stock client talks to it, and it keeps
the promises trio-websocket's server kept for the relay.

Over a real loopback socket, with trio-websocket's client (what clientkit uses): messages both
ways, pre-built frames (every length encoding) interleaved with its own sends, pings answered,
the close handshake from either side with its code, the message size cap (1009), a malformed
frame (1002), a refused upgrade, an upgrade that never comes, and the direct write's rules.
The wsproto version it was checked against is pinned.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.connection
from trio_websocket import ConnectionClosed

from clientkit import AccessRefused, connect
from clientkit._transport import open_websocket
from fanout import Message, ws_binary_frame
from relay import _wsraw

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from relay._wsraw import UpgradeRequest, WebSocket


async def _serve(
    nursery: trio.Nursery,
    handler: Callable[[WebSocket], Awaitable[None]],
    *,
    max_message_size: int = 1024 * 1024,
    connect_timeout: float = 10.0,
    on_request: Callable[[UpgradeRequest], Awaitable[None]] | None = None,
) -> str:
    """A loopback server accepting every upgrade and running `handler` on the connection (or
    `on_request` on the request itself); its URL."""

    async def accept(request: UpgradeRequest) -> None:
        if on_request is not None:
            await on_request(request)
        else:
            await handler(await request.accept())

    server = _wsraw.WebSocketServer(
        accept,
        handler_nursery=nursery,
        max_message_size=max_message_size,
        receive_buffer_size=64 * 1024,
        connect_timeout=connect_timeout,
    )
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return f"ws://127.0.0.1:{port}/"


async def _until_closed(ws: WebSocket) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.get_message()


async def _never(ws: WebSocket) -> None:
    raise AssertionError("no connection should open")


async def _raw_stream(url: str) -> trio.SocketStream:
    """A plain TCP connection to the server at `url`, to speak to it byte by byte."""
    return await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/")))


@dataclass
class _Ends:
    """Why the server's side of a connection ended, once `record` saw it end."""

    reasons: list[trio_websocket.CloseReason | None] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    async def record(self, ws: WebSocket) -> None:
        """A handler's last step: read until the connection ends, then record why."""
        await _until_closed(ws)
        self.reasons.append(ws.closed)
        self.done.set()


def test_the_installed_wsproto_is_a_checked_version() -> None:
    # If this fails after an upgrade: re-read wsproto's `Connection` (its events, states and
    # close handling) against relay/_wsraw.py, then extend CHECKED_WSPROTO_VERSIONS.
    assert wsproto.__version__ in _wsraw.CHECKED_WSPROTO_VERSIONS
    _wsraw.check_compatible()


def test_wsproto_queues_events_only_where_this_server_never_goes() -> None:
    # `_drop_event_queue` swaps an open connection's `_events` deque for an empty tuple; that
    # holds while wsproto appends to it only in `receive_data(None)`, which the server never
    # calls (an ended stream is handled before wsproto sees it).
    source = inspect.getsource(wsproto.connection.Connection)
    assert source.count("self._events.append(") == 1
    receive = inspect.getsource(wsproto.connection.Connection.receive_data)
    none_branch = receive[receive.index("if data is None:") : receive.index("return")]
    assert "self._events.append(" in none_branch
    fed = [
        node.args[0]
        for node in ast.walk(ast.parse(inspect.getsource(_wsraw)))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "receive_data"
    ]
    assert fed
    assert all(isinstance(arg, ast.Name) and arg.id == "data" for arg in fed)  # never None


def test_an_unchecked_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wsproto, "__version__", "99.0.0")
    with pytest.raises(_wsraw.IncompatibleWebSocketLibrary, match="re-check its `Connection`"):
        _wsraw.check_compatible()


def test_frame_headers_follow_rfc6455() -> None:
    assert ws_binary_frame(b"ab") == b"\x82\x02ab"
    assert ws_binary_frame(b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert ws_binary_frame(b"x" * 65536)[:10] == b"\x82\x7f" + (65536).to_bytes(8, "big")
    msg = Message(b"payload", 3)
    assert msg.framed == ws_binary_frame(b"payload")
    assert (len(msg), msg.events) == (9, 3)


async def test_a_stock_client_talks_reads_prebuilt_frames_and_gets_pings_answered() -> None:
    payloads = [b"", b"a", b"b" * 125, b"c" * 126, b"d" * 65535, b"e" * 65536, b"f" * 300_000]
    got_by_server: list[bytes | str] = []

    async def handler(ws: WebSocket) -> None:
        got_by_server.append(await ws.get_message())
        got_by_server.append(await ws.get_message())  # a big one, in many reads
        for i, p in enumerate(payloads):
            if i % 2:
                await ws.send_message(p)  # framed by wsproto, in the same send turn order
            else:
                await ws.send_framed(Message(p, 1).framed)
        # Several frames in one write, as a writer sends a drained outbox.
        await ws.send_framed(b"".join(ws_binary_frame(p) for p in (b"x", b"yy", b"zzz")))
        await ws.send_message("text too")
        await _until_closed(ws)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, handler)
            async with open_websocket(url, nursery) as client:
                await client.send_message(b"hello")
                await client.send_message(b"g" * 200_000)
                await client.ping(b"p1")  # answered by the server's request loop
                got = [await client.get_message() for _ in range(len(payloads) + 4)]
            nursery.cancel_scope.cancel()
    assert got_by_server == [b"hello", b"g" * 200_000]
    assert got == [*payloads, b"x", b"yy", b"zzz", "text too"]


async def test_the_client_closes_and_the_server_sees_its_code() -> None:
    ends = _Ends()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, ends.record)
            async with open_websocket(url, nursery) as client:
                await client.aclose(4000, "done")
            assert client.closed is not None
            assert client.closed.code == 4000  # the server answered the close
            await ends.done.wait()
            nursery.cancel_scope.cancel()
    assert ends.reasons[0] is not None
    assert (ends.reasons[0].code, ends.reasons[0].reason) == (4000, "done")


async def test_nothing_is_written_once_the_connection_is_closing() -> None:
    outcome: list[str] = []
    done = trio.Event()

    async def handler(ws: WebSocket) -> None:
        async def close() -> None:
            await ws.aclose(4008, "bye")  # returns once the request loop read the answer
            outcome.append("closed")

        await ws.send_framed(ws_binary_frame(b"before"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close)
            await trio.sleep(0.1)
            for send in (ws.send_framed(ws_binary_frame(b"after")), ws.send_message(b"after")):
                try:
                    await send
                except ConnectionClosed:
                    outcome.append("refused")
            await _until_closed(ws)
        done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, handler)
            async with open_websocket(url, nursery) as client:
                assert await client.get_message() == b"before"
                with pytest.raises(ConnectionClosed) as closed:
                    await client.get_message()
            await done.wait()
            nursery.cancel_scope.cancel()
    assert closed.value.reason is not None
    assert (closed.value.reason.code, closed.value.reason.reason) == (4008, "bye")
    assert outcome == ["refused", "refused", "closed"]


async def test_a_message_over_the_cap_is_answered_with_1009_and_ends_the_connection() -> None:
    ends = _Ends()

    async def handler(ws: WebSocket) -> None:
        assert await ws.get_message() == b"s" * 1000  # at the cap: fine
        await ends.record(ws)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, handler, max_message_size=1000)
            async with open_websocket(url, nursery) as client:
                await client.send_message(b"s" * 1000)
                await client.send_message(b"s" * 1001)
                with pytest.raises(ConnectionClosed) as closed:
                    await client.get_message()
            await ends.done.wait()
            nursery.cancel_scope.cancel()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1009
    assert ends.reasons[0] is not None
    assert ends.reasons[0].code == 1009


async def test_a_malformed_frame_is_answered_with_1002() -> None:
    ends = _Ends()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, ends.record)
            stream = await _raw_stream(url)
            await stream.send_all(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some()
            assert answer.startswith(b"HTTP/1.1 101")
            await stream.send_all(b"\x82\x02hi")  # unmasked: a client must mask (RFC 6455 5.1)
            rest = b""
            while chunk := await stream.receive_some():
                rest += chunk
            await stream.aclose()
            await ends.done.wait()
            nursery.cancel_scope.cancel()
    assert rest[:1] == b"\x88"  # a close frame
    assert int.from_bytes(rest[2:4], "big") == 1002
    assert ends.reasons[0] is not None
    assert ends.reasons[0].code == 1002


async def test_a_refused_upgrade_gets_its_status_and_body_and_no_websocket() -> None:
    async def refuse(request: UpgradeRequest) -> None:
        assert (b"cf-access-token", b"t0ken") in request.headers  # as trio-websocket gave them
        await request.reject(403, body=b"not you")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, _never, on_request=refuse)
            with pytest.raises(AccessRefused) as refused:  # the kit's word for a 403 upgrade
                async with connect(url, access_token="t0ken"):
                    pass
            nursery.cancel_scope.cancel()
    assert (refused.value.status, refused.value.reason) == (403, "not you")


async def test_a_socket_that_never_upgrades_is_dropped_after_the_connect_timeout() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, _never, connect_timeout=0.2)
            stream = await _raw_stream(url)
            await stream.send_all(b"GET / HTTP/1.1\r\n")  # and nothing more
            assert await stream.receive_some() == b""  # the server hung up
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_an_upgrade_request_that_never_ends_is_refused_before_it_grows() -> None:
    """The cheapest memory attack on the handshake: one header line that never ends. h11
    (under wsproto) holds at most 16 KiB of an unfinished request, so the server answers 400
    and hangs up long before the connect timeout, instead of buffering what is sent."""

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, _never, connect_timeout=15)
            stream = await _raw_stream(url)
            await stream.send_all(b"GET / HTTP/1.1\r\nX-Long: ")
            answer = b""
            with trio.fail_after(5):  # well before the 15 s connect timeout
                with contextlib.suppress(trio.BrokenResourceError):
                    for _ in range(64):  # up to 1 MiB, 16 KiB at a time
                        await stream.send_all(b"a" * 16384)
                while chunk := await stream.receive_some():
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_peer_that_ignores_the_close_is_cut_off_by_abort() -> None:
    ended = trio.Event()

    async def handler(ws: WebSocket) -> None:
        async def close() -> None:
            with trio.move_on_after(0.2) as scope:
                await ws.aclose(4001, "go")
            assert scope.cancelled_caught  # the peer never answered
            await ws.abort()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close)
            await _until_closed(ws)  # ends: the stream was closed under it
        ended.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, handler)
            stream = await _raw_stream(url)
            await stream.send_all(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await ended.wait()  # read nothing, answer nothing
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_write_now_writes_until_the_kernel_takes_nothing_and_never_beside_a_send() -> None:
    """The direct write is tried whenever no send is in progress, with no guess at the send
    buffer (a peer's delayed ACKs kept a TIOCOUTQ check refusing most live messages); a full
    buffer is a refusal, a frame taken in part is finished by `flush`, and the peer reads
    every frame written, whole and in order."""
    results: dict[str, object] = {}
    written: list[bytes] = []
    filled = trio.Event()

    async def handler(ws: WebSocket) -> None:
        results["drained"] = ws.write_now(ws_binary_frame(b"now"))
        await ws._take_turn()  # another send of the connection is in progress
        results["sending"] = ws.write_now(ws_binary_frame(b"never"))
        ws._end_turn()
        results["too_big"] = ws.write_now(ws_binary_frame(b"z" * _wsraw.WRITE_NOW_BYTES))
        # The client does not read: write directly until the kernel takes nothing more.
        n = 0
        while not ws.tail_pending:
            payload = n.to_bytes(4, "big") * 2000  # 8 KB, numbered
            if not ws.write_now(ws_binary_frame(payload)):
                break
            written.append(payload)
            n += 1
        results["refused_while_half_sent"] = not ws.write_now(ws_binary_frame(b"x"))
        filled.set()
        await ws.flush()  # returns once the client reads again
        await _until_closed(ws)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, handler)
            async with open_websocket(url, nursery, message_queue_size=0) as client:
                assert await client.get_message() == b"now"
                await filled.wait()
                got = [await client.get_message() for _ in written]
            nursery.cancel_scope.cancel()
    assert results == {
        "drained": True,
        "sending": False,
        "too_big": False,
        "refused_while_half_sent": True,
    }
    assert len(written) > 10  # the kernel took many before it was full
    assert got == written


async def test_a_frame_the_kernel_took_in_part_is_finished_before_any_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel may take part of a direct write; the rest must go out before the next
    # frame (here a message sent by another task) or the stream would be corrupt.
    real_write = os.write
    taken: list[bool] = []

    def half(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])

    async def handler(ws: WebSocket) -> None:
        with monkeypatch.context() as m:
            m.setattr(os, "write", half)
            taken.append(ws.write_now(ws_binary_frame(b"h" * 1000)))
        taken.append(ws.tail_pending)
        await ws.send_message(b"next")  # its turn writes the rest of the first frame first
        await _until_closed(ws)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, handler)
            async with open_websocket(url, nursery) as client:
                assert await client.get_message() == b"h" * 1000
                assert await client.get_message() == b"next"
            nursery.cancel_scope.cancel()
    assert taken == [True, True]


async def test_writers_take_turns_in_order_and_a_cancelled_one_gives_its_turn_up() -> None:
    async def handler(ws: WebSocket) -> None:
        await ws._take_turn()  # a send in progress: the writers below wait, in order
        scopes = [trio.CancelScope() for _ in range(3)]

        async def send(i: int) -> None:
            with scopes[i]:
                await ws.send_framed(ws_binary_frame(b"%d" % i))

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(send, i)
                await trio.testing.wait_all_tasks_blocked()
            scopes[1].cancel()  # gives up while waiting
            await trio.testing.wait_all_tasks_blocked()
            ws._end_turn()
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await ws.send_framed(ws_binary_frame(b"never"))  # cancelled before its turn
        await ws.send_framed(ws_binary_frame(b"last"))  # the turn was not kept by it
        await _until_closed(ws)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve(nursery, handler)
            async with open_websocket(url, nursery) as client:
                got = [await client.get_message() for _ in range(3)]
            nursery.cancel_scope.cancel()
    assert got == [b"0", b"2", b"last"]
