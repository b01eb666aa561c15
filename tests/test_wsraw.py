"""relay/_wsraw.py writes pre-framed messages beside trio-websocket: pin what it relies on.

The relay's writers send `fanout.Message` frames (built once for every subscriber) through
trio-websocket's private stream lock and stream. These tests fail loudly when an upgrade of
trio-websocket changes the internals (or the version) that module was checked against, and
show over a real loopback socket that a stock trio-websocket client reads the frames — every
length encoding, interleaved with the library's own sends — and that nothing is written once
the connection is closing.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import termios
from typing import TYPE_CHECKING

import pytest
import trio
import trio_websocket
import wsproto
from trio_websocket import ConnectionClosed, serve_websocket

from clientkit._transport import open_websocket
from fanout import Message, ws_binary_frame
from relay import _wsraw

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_websocket import WebSocketConnection, WebSocketRequest


async def _serve_one(
    nursery: trio.Nursery, handler: Callable[[WebSocketConnection], Awaitable[None]]
) -> str:
    """A loopback WebSocket server running `handler` on each connection; its URL."""

    async def accept(request: WebSocketRequest) -> None:
        await handler(await request.accept())

    server = await nursery.start(serve_websocket, accept, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/"


def test_the_installed_trio_websocket_is_a_checked_version() -> None:
    # If this fails after an upgrade: re-read trio_websocket/_impl.py (WebSocketConnection._send,
    # aclose, _abort_web_socket) against relay/_wsraw.py, then extend CHECKED_VERSIONS.
    assert trio_websocket.__version__ in _wsraw.CHECKED_VERSIONS
    _wsraw.check_compatible()


def test_an_unchecked_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trio_websocket, "__version__", "99.0.0")
    with pytest.raises(_wsraw.IncompatibleWebSocketLibrary, match="re-check its internals"):
        _wsraw.check_compatible()


def test_frame_headers_follow_rfc6455() -> None:
    assert ws_binary_frame(b"ab") == b"\x82\x02ab"
    assert ws_binary_frame(b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert ws_binary_frame(b"x" * 65536)[:10] == b"\x82\x7f" + (65536).to_bytes(8, "big")
    msg = Message(b"payload", 3)
    assert msg.framed == ws_binary_frame(b"payload")
    assert (len(msg), msg.events) == (9, 3)


async def test_a_stock_client_reads_prebuilt_frames_interleaved_with_library_sends() -> None:
    payloads = [b"", b"a", b"b" * 125, b"c" * 126, b"d" * 65535, b"e" * 65536, b"f" * 300_000]
    checked: list[bool] = []

    async def handler(ws: WebSocketConnection) -> None:
        _wsraw.check_compatible(ws)  # a real server connection has what send_framed uses
        checked.append(True)
        for i, p in enumerate(payloads):
            if i % 2:
                await ws.send_message(p)  # trio-websocket's own path, under the same lock
            else:
                await _wsraw.send_framed(ws, Message(p, 1).framed)
        # Several frames in one write, as a writer sends a drained outbox.
        await _wsraw.send_framed(ws, b"".join(ws_binary_frame(p) for p in (b"x", b"yy", b"zzz")))
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()  # until the client closes

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve_one(nursery, handler)
            async with open_websocket(url, nursery) as client:
                got = [await client.get_message() for _ in range(len(payloads) + 3)]
            nursery.cancel_scope.cancel()
    assert checked == [True]
    assert got == [*payloads, b"x", b"yy", b"zzz"]


async def test_nothing_is_written_once_the_connection_is_closing() -> None:
    outcome: list[str] = []
    done = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        await _wsraw.send_framed(ws, ws_binary_frame(b"before"))
        await ws.aclose(4008, "bye")
        try:
            await _wsraw.send_framed(ws, ws_binary_frame(b"after"))
        except ConnectionClosed:
            outcome.append("refused")
        done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve_one(nursery, handler)
            async with open_websocket(url, nursery) as client:
                assert await client.get_message() == b"before"
                with pytest.raises(ConnectionClosed) as closed:
                    await client.get_message()
            await done.wait()
            nursery.cancel_scope.cancel()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 4008
    assert outcome == ["refused"]


async def test_write_now_writes_only_into_a_drained_socket_with_no_send_in_progress() -> None:
    results: dict[str, bool] = {}
    filled = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        results["drained"] = _wsraw.write_now(ws, ws_binary_frame(b"now"))
        async with ws._stream_lock:  # another send of the connection is in progress
            results["locked"] = _wsraw.write_now(ws, ws_binary_frame(b"never"))
        big = ws_binary_frame(b"z" * (_wsraw.WRITE_NOW_BYTES + 1))
        results["too_big"] = _wsraw.write_now(ws, big)
        # The client stops reading: fill the socket with whole frames until the kernel refuses.
        frame = ws_binary_frame(b"f" * 1000)
        with trio.move_on_after(5):
            while True:
                await _wsraw.send_framed(ws, frame)
                if _queued(ws) > _wsraw.WRITE_NOW_BYTES:
                    break
        results["queue_not_empty"] = _wsraw.write_now(ws, ws_binary_frame(b"late"))
        filled.set()
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()  # until the client closes

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve_one(nursery, handler)
            async with open_websocket(url, nursery, message_queue_size=0) as client:
                assert await client.get_message() == b"now"
                await filled.wait()
            nursery.cancel_scope.cancel()
    assert results == {"drained": True, "locked": False, "too_big": False, "queue_not_empty": False}


def _queued(ws: WebSocketConnection) -> int:
    """Bytes in the server socket's send buffer (what `write_now` checks)."""
    stream = ws._stream
    assert isinstance(stream, trio.SocketStream)
    queued = array.array("i", [0])
    fcntl.ioctl(stream.socket.fileno(), termios.TIOCOUTQ, queued)
    return queued[0]


async def test_a_partial_direct_write_aborts_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Never expected in practice (see write_now), but if the kernel took half a frame the
    # stream must end, not carry on with a corrupt frame.
    ended: list[str] = []
    server_done = trio.Event()

    real_write = os.write

    def half(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])

    async def handler(ws: WebSocketConnection) -> None:
        with monkeypatch.context() as m:
            m.setattr(os, "write", half)
            assert not _wsraw.write_now(ws, ws_binary_frame(b"h" * 1000))
        try:
            await ws.get_message()
        except ConnectionClosed:
            ended.append("server")
        server_done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve_one(nursery, handler)
            async with open_websocket(url, nursery) as client:
                with pytest.raises(ConnectionClosed):
                    await client.get_message()  # never a message made of the half frame
            await server_done.wait()
            nursery.cancel_scope.cancel()
    assert ended == ["server"]


def test_the_installed_wsproto_is_a_checked_version() -> None:
    # If this fails after an upgrade: re-read wsproto's WSConnection (what it asks of
    # `handshake` once `connection` is set) against `release_handshake`, then extend the list.
    assert wsproto.__version__ in _wsraw.CHECKED_WSPROTO_VERSIONS


async def test_a_connection_without_its_handshake_state_still_talks_pings_and_closes() -> None:
    """`release_handshake` drops the upgrade's parser once open; everything after the upgrade
    (messages both ways, the library's ping/pong, the close handshake with its code) works."""
    released: list[bool] = []
    got: list[bytes] = []

    async def handler(ws: WebSocketConnection) -> None:
        released.append(_wsraw.release_handshake(ws))
        released.append(_wsraw.release_handshake(ws))  # a second call changes nothing
        got.append(await ws.get_message())
        await ws.send_message(b"pong-me")
        await ws.ping(b"p1")  # answered by the client's reader: a pong through wsproto
        await _wsraw.send_framed(ws, ws_binary_frame(b"framed"))
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()  # until the client closes

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await _serve_one(nursery, handler)
            async with open_websocket(url, nursery) as client:
                await client.send_message(b"hello")
                assert await client.get_message() == b"pong-me"
                assert await client.get_message() == b"framed"
                await client.ping(b"p2")  # the server's wsproto answers it
                await client.aclose(4000, "done")
            assert client.closed is not None
            assert client.closed.code == 4000
            nursery.cancel_scope.cancel()
    assert released == [True, False]
    assert got == [b"hello"]
