"""Subscriber load generator: a separate process holding many real WebSocket subscribers.

Run by the bench as ``python -m cozy.bench._subscribers SPEC_JSON``, one or more at once, so
the relay's fan-out is measured at subscribers that have their own interpreters (and the relay
is not starved by a load generator sharing its GIL). The conversation on stdin/stdout, one
JSON document per line:

1. the child opens ``count`` connections, authenticates each with ``token`` and subscribes to
   ``collab_id`` from ``from_seq``; once every subscription is caught up it prints
   ``{"ready": N, "failed": K}``;
2. the parent publishes and writes ``{"t0": T, "rate": R, "base_seq": B, "timeout": S}``
   (T on the machine-wide monotonic clock, when event seq B was due to be sent);
3. each subscriber reads until it has ``expect`` events from seq B on, is dropped (counted
   in ``dropped``), or ``timeout`` seconds after T passed; the child prints the counts and, when
   ``samples_path`` is set, writes each delivery's latency (receipt - the event's scheduled
   send time T + (seq - B)/R, in seconds) to that file as native doubles, and when
   ``receipts_path`` is set, each delivery's (local port, seq, receipt time) as three doubles
   (matched with the relay's stage times, relay/_stages.py). ``cpu_seconds_timed`` is the CPU
   it used from the go line on: the load generator's share of the measured phase.

Every delivery is counted, and each subscriber checks that its seqs are contiguous (the count
of breaks is reported as ``seq_errors``; the bench fails on any). The subscribers speak
WebSocket through `LeanSocket`, a minimal client of their own, so that the load generator is
not the bottleneck (see the class and docs/performance.md). A delivery's receipt time is when
the chunk of bytes that completed it came off the socket.

Times are `time.monotonic()` (CLOCK_MONOTONIC, shared by every process on the machine), not
Trio's clock, which carries a per-run offset.
"""

from __future__ import annotations

import array
import base64
import contextlib
import hashlib
import json
import os
import resource
import select
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
import trio

from cozy.bench._common import BenchError, raise_nofile_limit
from model import wire

OPEN_CONCURRENCY: Final = 64
RECV_BYTES: Final = 256 * 1024
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONT, _OP_BINARY, _OP_CLOSE, _OP_PING = 0x0, 0x2, 0x8, 0x9


class _Probe(msgspec.Struct):
    """The few fields of a relay frame the subscriber looks at; the rest (the event's body)
    is skipped by the decoder without being built."""

    t: str
    seq: int = 0
    frames: list[msgspec.Raw] = []
    code: str = ""
    message: str = ""


_probe = msgspec.msgpack.Decoder(_Probe)


class SubscriberError(Exception):
    """The relay refused the subscriber, sent a malformed stream, or closed it."""


class LeanSocket:
    """A minimal WebSocket client for the load generator: the opening handshake, masked
    sends, and a reader that takes large chunks off the socket and walks frame headers itself.

    Why not trio-websocket (which every real client here uses): the subscribers of `fanout` and
    `latency` receive up to ~100k messages/s on the same two cores as the relay and Postgres,
    and wsproto's per-frame Python (events, buffers, a task hand-off per message) made the load
    generator the bottleneck it was meant to measure, like a benchmark client written in C
    rather than in the server's language. It speaks only what the relay sends: unmasked binary
    messages (fragmented or not), pings (answered) and close (ends the stream).
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._parts: list[bytes] = []  # fragments of a message not yet complete
        self._pings: list[bytes] = []  # payloads of pings still to answer
        self.received_at = 0.0  # time.monotonic() when the last chunk came off the socket

    @classmethod
    async def connect(cls, url: str) -> LeanSocket:
        parts = urlsplit(url)
        if parts.scheme != "ws" or not parts.hostname:
            raise SubscriberError(f"the bench subscribers speak ws:// only, not {url!r}")
        port = parts.port or 80
        stream = await trio.open_tcp_stream(parts.hostname, port)
        key = base64.b64encode(os.urandom(16))
        await stream.send_all(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % ((parts.path or "/").encode(), parts.hostname.encode(), port, key)
        )
        sock = cls(stream)
        while b"\r\n\r\n" not in sock._buf:
            await sock._fill()
        head, _, rest = bytes(sock._buf).partition(b"\r\n\r\n")
        sock._buf = bytearray(rest)
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())  # noqa: S324 — RFC 6455
        lines = head.split(b"\r\n")
        headers = dict(
            (k.strip().lower(), v.strip()) for k, _, v in (ln.partition(b":") for ln in lines[1:])
        )
        if b" 101 " not in lines[0] + b" " or headers.get(b"sec-websocket-accept") != accept:
            raise SubscriberError(f"WebSocket upgrade refused: {lines[0].decode(errors='replace')}")
        return sock

    @property
    def local_port(self) -> int:
        port: int = self._stream.socket.getsockname()[1]
        return port

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(RECV_BYTES)
        if not chunk:
            raise SubscriberError("the relay closed the connection")
        self.received_at = time.monotonic()
        self._buf += chunk

    async def send(self, payload: bytes, opcode: int = _OP_BINARY) -> None:
        """One masked message (a client must mask every frame it sends)."""
        await self._stream.send_all(_masked_frame(payload, opcode))

    @property
    def fileno(self) -> int:
        return self._stream.socket.fileno()

    def feed(self, chunk: bytes) -> list[_Probe]:
        """The frames completed by `chunk` (read off the socket by the caller), batches
        unpacked; pings are answered with a direct write (they are rare and tiny)."""
        self._buf += chunk
        msgs = self.messages()
        while self._pings:
            with contextlib.suppress(BlockingIOError):
                os.write(self.fileno, _masked_frame(self._pings.pop(), 0xA))
        return _decode(msgs)

    def messages(self) -> list[bytes]:
        """Every complete message already buffered (possibly none); control frames handled."""
        out: list[bytes] = []
        buf = self._buf
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                raise SubscriberError("the relay sent a masked frame")
            n, hdr = b1 & 0x7F, 2
            if n == 126:
                if end - pos < 4:
                    break
                n, hdr = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, hdr = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if end - pos < hdr + n:
                break
            payload = bytes(buf[pos + hdr : pos + hdr + n])
            pos += hdr + n
            opcode = b0 & 0x0F
            if opcode in (_OP_BINARY, _OP_CONT):
                if b0 & 0x80:
                    if self._parts:
                        payload = b"".join([*self._parts, payload])
                        self._parts.clear()
                    out.append(payload)
                else:
                    self._parts.append(payload)
            elif opcode == _OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                raise SubscriberError(f"the relay closed the stream ({code}: {payload[2:]!r})")
            elif opcode == _OP_PING:
                self._pings.append(payload)
            # pongs and text frames (the relay sends none) are ignored
        del buf[:pos]
        return out

    async def frames(self) -> list[_Probe]:
        """The next relay frames (at least one), batches unpacked, in order."""
        while True:
            msgs = self.messages()
            while self._pings:
                await self.send(self._pings.pop(), 0xA)
            if msgs:
                break
            await self._fill()
        return _decode(msgs)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


def _decode(msgs: list[bytes]) -> list[_Probe]:
    out: list[_Probe] = []
    for msg in msgs:
        frame = _probe.decode(msg)
        if frame.t == "batch":
            out.extend(_probe.decode(raw) for raw in frame.frames)
        else:
            out.append(frame)
    return out


def _masked_frame(payload: bytes, opcode: int) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))  # requests are small
    return head + mask + masked


@dataclass
class _Sub:
    seqs: array.array[int] = field(default_factory=lambda: array.array("q"))
    times: array.array[float] = field(default_factory=lambda: array.array("d"))
    dropped: bool = False
    seq_errors: int = 0  # deliveries whose seq was not the one after the previous
    port: int = 0  # its local TCP port: how the relay's stage times name this subscriber
    sock: LeanSocket | None = None  # once ready, until the measured phase is over
    next_seq: int = 0


async def expect_frame(sock: LeanSocket, tag: str) -> list[_Probe]:
    """Read until a frame tagged `tag` arrives; what came after it in the same read."""
    while True:
        frames = await sock.frames()
        for i, f in enumerate(frames):
            if f.t == tag:
                return frames[i + 1 :]
            if f.t == "error":
                raise BenchError(f"bench subscriber refused: {f.code}: {f.message}")


async def _subscriber(
    spec: dict[str, Any],
    sub: _Sub,
    opening: trio.Semaphore,
    ready: trio.MemorySendChannel[bool],
) -> None:
    """Open, authenticate and subscribe one subscriber; the measured phase reads it in
    `_receive_all`."""
    sock: LeanSocket | None = None
    try:
        async with opening:
            sock = await LeanSocket.connect(spec["url"])
            sub.port = sock.local_port
            await expect_frame(sock, "welcome")
            await sock.send(wire.encode(wire.Authenticate(rid=0, token=spec["token"])))
            await expect_frame(sock, "authenticated")
            request = wire.Subscribe(rid=1, collab_id=spec["collab_id"], from_seq=spec["from_seq"])
            await sock.send(wire.encode(request))
            # Nothing is published before every subscriber is ready, so nothing that follows
            # `caught_up` in the same read is an event to count.
            await expect_frame(sock, "caught_up")
    except (SubscriberError, OSError, trio.BrokenResourceError, msgspec.DecodeError):
        sub.dropped = True
        if sock is not None:
            await sock.aclose()
        await ready.send(False)
        return
    sub.sock = sock
    sub.next_seq = spec["from_seq"]
    await ready.send(True)


def _receive_all(subs: list[_Sub], *, base: int, expect: int, deadline: float) -> None:
    """The measured phase: read every subscriber until it holds `expect` events from seq
    `base`, is dropped, or `deadline` (monotonic) passes.

    One plain epoll loop over every socket instead of a Trio task per subscriber: at 100k
    deliveries/s a task wakeup and an epoll re-arm per read made the load generator cost about
    a core of the two the relay runs on (issue 17); here a read is one `os.read` of whatever
    the socket holds. Nothing else runs in this process meanwhile, so blocking the Trio loop
    costs nothing.
    """
    poller = select.epoll()
    live: dict[int, _Sub] = {}
    for sub in subs:
        if sub.sock is not None and len(sub.seqs) < expect:
            live[sub.sock.fileno] = sub
            poller.register(sub.sock.fileno, select.EPOLLIN)
    try:
        while live:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for fd, _ in poller.poll(min(left, 1.0)):
                sub = live[fd]
                assert sub.sock is not None
                try:
                    chunk = os.read(fd, RECV_BYTES)
                    if not chunk:
                        raise SubscriberError("the relay closed the connection")
                    at = time.monotonic()
                    _count(sub, sub.sock.feed(chunk), at, base)
                except BlockingIOError:
                    continue
                except (SubscriberError, OSError, msgspec.DecodeError):
                    sub.dropped = True
                if sub.dropped or len(sub.seqs) >= expect:
                    poller.unregister(fd)
                    del live[fd]
    finally:
        poller.close()


def _count(sub: _Sub, frames: list[_Probe], at: float, base: int) -> None:
    for f in frames:
        if f.t == "event" and f.seq >= base:
            if f.seq != sub.next_seq:
                sub.seq_errors += 1
            sub.next_seq = f.seq + 1
            sub.seqs.append(f.seq)
            sub.times.append(at)
        elif f.t == "error":
            raise SubscriberError(f"{f.code}: {f.message}")


async def _main(spec: dict[str, Any]) -> None:
    count: int = spec["count"]
    subs = [_Sub() for _ in range(count)]
    opening = trio.Semaphore(OPEN_CONCURRENCY)
    ready_send, ready_recv = trio.open_memory_channel[bool](count)
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    async with trio.open_nursery() as nursery:
        for sub in subs:
            nursery.start_soon(_subscriber, spec, sub, opening, ready_send)
        ok = failed = 0
        for _ in range(count):
            if await ready_recv.receive():
                ok += 1
            else:
                failed += 1
    _emit({"ready": ok, "failed": failed})
    go = json.loads(await _read_line(stdin))
    cpu_at_go = _cpu_seconds()
    _receive_all(
        subs, base=spec["from_seq"], expect=spec["expect"], deadline=go["t0"] + go["timeout"]
    )
    cpu_timed = _cpu_seconds() - cpu_at_go
    for sub in subs:
        if sub.sock is not None:
            await sub.sock.aclose()
    t0, rate, base = go["t0"], go["rate"], go["base_seq"]
    times = [t for s in subs for t in s.times]
    if spec.get("samples_path"):
        samples = array.array(
            "d",
            (
                t - (t0 + (seq - base) / rate)
                for s in subs
                for seq, t in zip(s.seqs, s.times, strict=True)
            ),
        )
        with open(spec["samples_path"], "wb") as f:  # noqa: ASYNC230 — the loop is finished
            samples.tofile(f)
    if spec.get("receipts_path"):
        # (port, seq, receipt time) per delivery, matched with the relay's stage times.
        receipts = array.array(
            "d",
            (
                x
                for s in subs
                for seq, t in zip(s.seqs, s.times, strict=True)
                for x in (s.port, seq, t)
            ),
        )
        with open(spec["receipts_path"], "wb") as f:  # noqa: ASYNC230 — the loop is finished
            receipts.tofile(f)
    _emit(
        {
            "deliveries": len(times),
            "complete": sum(len(s.seqs) >= spec["expect"] for s in subs),
            "dropped": sum(s.dropped for s in subs),
            "seq_errors": sum(s.seq_errors for s in subs),
            "cpu_seconds": _cpu_seconds(),
            "cpu_seconds_timed": round(cpu_timed, 3),
            "first": min(times, default=0.0),
            "last": max(times, default=0.0),
        }
    )


async def _read_line(stream: trio.lowlevel.FdStream) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError("the bench closed our stdin before saying go")
        buf += chunk
    return buf.decode()


def _cpu_seconds() -> float:
    """This process's CPU time so far (user + system): what the load generator cost."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise_nofile_limit()
    trio.run(_main, json.loads(sys.argv[1]))
