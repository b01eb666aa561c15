"""A loopback TCP proxy that records every byte between clients and a relay, and a parser that
turns one recorded direction back into its WebSocket messages (RFC 6455 §5).

Tests put a `Tap` between real clients and a real relay to see exactly what a network observer
(or the relay's own front end) sees. Client-to-relay frames are XOR-masked on the wire, so a
plain search of the recorded bytes would miss everything the clients sent: use `payloads` (or
`parse_websocket` for message-level access), which unmask.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import partial

import trio


class Direction(enum.Enum):
    TO_RELAY = "client→relay"
    TO_CLIENT = "relay→client"


@dataclass
class Recording:
    """One direction of one connection through the tap, byte for byte."""

    connection: int  # 1 for the first connection the tap accepted
    direction: Direction
    data: bytearray = field(default_factory=bytearray)


class Tap:
    """Forwards every connection to `upstream_port` on loopback and records both directions."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.recordings: list[Recording] = []
        self.connections = 0
        self._open = 0
        self._idle = trio.Event()
        self._idle.set()

    def payloads(self) -> bytes:
        """Every handshake and every WebSocket payload seen, unmasked, in one buffer."""
        out = bytearray()
        for rec in self.recordings:
            parsed = parse_websocket(bytes(rec.data))
            out += parsed.handshake
            for message in parsed.messages:
                out += message.payload
            out += parsed.trailing
        return bytes(out)

    async def serve(self, nursery: trio.Nursery) -> int:
        """Start listening (in `nursery`) on a free loopback port; return the port."""
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        return int(listeners[0].socket.getsockname()[1])

    async def wait_idle(self) -> None:
        """Return once every connection through the tap has closed (all bytes are recorded)."""
        await self._idle.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        self._open += 1
        if self._open == 1:
            self._idle = trio.Event()
        try:
            async with (
                client,
                await trio.open_tcp_stream("127.0.0.1", self.upstream_port) as upstream,
                trio.open_nursery() as nursery,
            ):

                async def pump(
                    src: trio.SocketStream, dst: trio.SocketStream, direction: Direction
                ) -> None:
                    captured = Recording(number, direction)
                    self.recordings.append(captured)
                    try:
                        async for chunk in src:
                            # Recorded before forwarding, with no checkpoint in between: a
                            # byte the peer received is always in the recording.
                            captured.data += chunk
                            await dst.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, upstream, Direction.TO_RELAY)
                nursery.start_soon(pump, upstream, client, Direction.TO_CLIENT)
        finally:
            self._open -= 1
            if self._open == 0:
                self._idle.set()


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


@dataclass(frozen=True)
class Message:
    """One WebSocket message (fragments joined), unmasked."""

    opcode: int
    payload: bytes
    rsv: int  # the RSV1-3 bits of its first frame: non-zero means an extension (compression)


@dataclass(frozen=True)
class ParsedStream:
    handshake: bytes  # the HTTP upgrade request or response, headers and all
    messages: list[Message]
    trailing: bytes  # the unmasked bytes of a frame or message the stream ended in the middle of


def parse_websocket(stream: bytes) -> ParsedStream:
    """Split one recorded direction into its HTTP handshake and WebSocket messages."""
    end = stream.find(b"\r\n\r\n")
    pos = 0 if end < 0 else end + 4
    handshake = stream[:pos]
    messages: list[Message] = []
    fragments = bytearray()
    first: tuple[int, int] | None = None  # opcode and rsv of the message being reassembled
    while pos + 2 <= len(stream):
        b0, b1 = stream[pos], stream[pos + 1]
        fin, rsv, opcode = b0 & 0x80, (b0 >> 4) & 0x7, b0 & 0x0F
        masked, length = b1 & 0x80, b1 & 0x7F
        header_end = pos + 2 + (2 if length == 126 else 8 if length == 127 else 0)
        header_end += 4 if masked else 0
        if header_end > len(stream):
            break
        if length == 126:
            length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        elif length == 127:
            length = int.from_bytes(stream[pos + 2 : pos + 10], "big")
        mask = stream[header_end - 4 : header_end] if masked else b"\0\0\0\0"
        payload = _unmask(stream[header_end : header_end + length], mask)
        if header_end + length > len(stream):
            fragments += payload
            pos = len(stream)
            break
        pos = header_end + length
        if opcode >= Opcode.CLOSE:  # control frames are never fragmented
            messages.append(Message(opcode, payload, rsv))
            continue
        if opcode != Opcode.CONTINUATION:
            first = (opcode, rsv)
        fragments += payload
        if fin:
            op, first_rsv = first if first is not None else (opcode, rsv)
            messages.append(Message(op, bytes(fragments), first_rsv))
            fragments, first = bytearray(), None
    return ParsedStream(bytes(handshake), messages, bytes(fragments) + stream[pos:])


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if mask == b"\0\0\0\0":
        return payload
    # XOR with the 4-byte key repeated: one big-integer operation instead of a loop per byte.
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
        len(payload), "big"
    )
