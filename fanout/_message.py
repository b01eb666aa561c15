"""A relay message built once and written, byte for byte, to many connections.

Relay → client WebSocket frames are never masked (RFC 6455 §5.1: only a client masks), so the
complete frame of a message — header and payload — is the same bytes for every subscriber.
Fan-out builds it once per published batch of events and every subscriber's connection writes
those bytes as they are: no per-subscriber encoding, batching or framing (ADR-0005).
"""

from __future__ import annotations

import struct
from typing import Final

from model import wire

_FIN_BINARY: Final = 0x82  # FIN + opcode 2 (binary); RSV bits clear: never compressed
# Coalesced `batch` messages stay well under the WebSocket cap every peer accepts
# (wire.WS_HARD_LIMIT); a lone frame over this goes in a batch of its own.
BATCH_BYTES: Final = 256 * 1024


def starts_new_batch(run_frames: int, run_bytes: int, frame_bytes: int) -> bool:
    """True when a frame of `frame_bytes` must not join a run of `run_frames` frames holding
    `run_bytes`: the one batching rule of fan-out and of a connection's writer."""
    return run_frames > 0 and (
        run_frames >= wire.MAX_BATCH_FRAMES or run_bytes + frame_bytes > BATCH_BYTES
    )


def _ws_head(n: int) -> bytes:
    """The header of an unmasked, unfragmented binary WebSocket frame of `n` payload bytes."""
    if n < 126:
        return struct.pack("!BB", _FIN_BINARY, n)
    if n < 1 << 16:
        return struct.pack("!BBH", _FIN_BINARY, 126, n)
    return struct.pack("!BBQ", _FIN_BINARY, 127, n)


def ws_binary_frame(payload: bytes) -> bytes:
    """The unmasked, unfragmented WebSocket frame carrying `payload` as one binary message."""
    return _ws_head(len(payload)) + payload


def framed_batch(frames: list[bytes]) -> bytes:
    """`ws_binary_frame(wire.batch(frames))` in one copy of the frames, not two."""
    if len(frames) == 1:
        return ws_binary_frame(frames[0])
    head = wire.batch_head(len(frames))
    return b"".join([_ws_head(len(head) + sum(map(len, frames))), head, *frames])


class Message:
    """One complete relay message (a frame, or a `batch` of frames): sent as is, never wrapped
    in another batch. `framed` is its WebSocket frame, built once for every connection."""

    __slots__ = ("events", "framed", "last_seq")

    def __init__(self, payload: bytes, events: int) -> None:
        self.framed = ws_binary_frame(payload)
        self.events = events  # how many event frames it carries (for the delivery count)
        # The seq of its last event, for a live message (the relay's stage times); else 0.
        self.last_seq = 0

    @classmethod
    def of_frames(cls, frames: list[bytes]) -> Message:
        """The `batch` of `frames` (the frame itself when alone), framed in one copy."""
        message = cls.__new__(cls)
        message.framed = framed_batch(frames)
        message.events = len(frames)
        message.last_seq = 0
        return message

    def __len__(self) -> int:
        return len(self.framed)

    def __repr__(self) -> str:
        return f"Message({len(self.framed)} bytes, {self.events} events)"
