"""Batched Ed25519 checks, and the worker process that runs them off the caller's interpreter.

A thread that checks signatures shares its process's GIL: PyNaCl releases it for each
signature, but the thread must take it back for each one while the main thread runs Python,
and on this kind of VM each hand-over is a futex wake (docs/performance.md, "Fourth pass").
A worker process has an interpreter of its own, so its checks contend with nothing but the
other processes for the cores. It is `python -m sigworker`: it imports this package, `model`'s
crypto and PyNaCl only (~50 ms, ~16 MB), reads requests on stdin and answers on stdout.

Shared by the relay (appends, ADR-0022; kept running by relay/_sigprocs.py) and the client kit
(a catch-up's signatures, ADR-0023; clientkit/_sigprocs.py), so it imports nothing of ours
but `model`. What crosses the pipe is public: account public keys, the signed bytes and the
signatures. The verdict is the worker's, so the worker is as trusted as its parent's own
threads; it runs the same `check_signatures` they would.

Framing (little-endian): a request is `u32 length` then `u32 request id, u32 count` and
`count` checks, each `u16 key length, u16 signature length, u32 message length` and the three
byte strings; the reply is the request id then `count` bytes, 1 where the signature holds and
0 where it does not. The id makes a worker that got out of step (a reply too long, a reply
for another request) fail loudly instead of lending one batch's verdicts to the next.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, BinaryIO, Final

from model._crypto import verify

if TYPE_CHECKING:
    from collections.abc import Sequence

# (public key, signed message, signature)
Check = tuple[bytes, bytes, bytes]

# The worker's first reply, before any request: its imports are done.
READY: Final = b"R"
# A request larger than this is refused by the worker (it exits), so the relay never sends one:
# such a round (thousands of events near the body limit) is checked in threads instead.
MAX_REQUEST: Final = 64 * 1024 * 1024

# What a parent (relay/_sigprocs.py, clientkit/_sigprocs.py) allows a worker: this long to say
# READY after it starts, this long to exit once its input is closed before it is killed, and
# for a reply a base plus a margin per check (~25 times what a check costs; `reply_timeout`),
# past which it is taken for hung (stopped, starved, wedged) and its checks run elsewhere.
START_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 2.0
REPLY_TIMEOUT: Final = (1.0, 0.002)

_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<II")
_ITEM = struct.Struct("<HHI")


class WorkerLost(Exception):
    """A worker cannot answer this batch: not started or ready, dead, hung, out of step, or
    the batch is too large for one request. Its parent checks the batch elsewhere."""


def reply_timeout(checks: int) -> float:
    """Seconds a worker may take to answer a request of `checks` checks."""
    return REPLY_TIMEOUT[0] + REPLY_TIMEOUT[1] * checks


def check_signatures(checks: Sequence[Check]) -> list[bool]:
    """Element-wise (`f(a + b) == f(a) + f(b)`), so a pool may split it anywhere."""
    return [verify(pk, message, sig) for pk, message, sig in checks]


def request_size(checks: Sequence[Check]) -> int:
    """The bytes of `encode_request(_, checks)` after its length."""
    return _HEAD.size + sum(_ITEM.size + len(pk) + len(m) + len(sig) for pk, m, sig in checks)


def encode_request(request_id: int, checks: Sequence[Check]) -> bytes:
    parts = [b"", _HEAD.pack(request_id, len(checks))]
    for pk, message, sig in checks:
        parts += (_ITEM.pack(len(pk), len(sig), len(message)), pk, sig, message)
    size = sum(map(len, parts))
    parts[0] = _U32.pack(size)
    return b"".join(parts)


def decode_request(payload: bytes) -> tuple[int, list[Check]]:
    """The request id and checks of one request's payload (after its length). Raises
    `ValueError` when the payload is not exactly a request."""
    try:
        request_id, count = _HEAD.unpack_from(payload, 0)
        at = _HEAD.size
        out: list[Check] = []
        for _ in range(count):
            pk_len, sig_len, msg_len = _ITEM.unpack_from(payload, at)
            at += _ITEM.size
            pk = payload[at : at + pk_len]
            sig = payload[at + pk_len : at + pk_len + sig_len]
            at += pk_len + sig_len
            message = payload[at : at + msg_len]
            at += msg_len
            out.append((pk, message, sig))
    except struct.error as exc:
        raise ValueError(f"truncated signature-check request: {exc}") from None
    if at > len(payload):
        raise ValueError("truncated signature-check request")
    if at < len(payload):
        raise ValueError("signature-check request longer than its checks")
    return request_id, out


def encode_reply(request_id: int, verdicts: Sequence[bool]) -> bytes:
    return _U32.pack(request_id) + bytes(verdicts)


def reply_size(checks: int) -> int:
    return _U32.size + checks


def decode_reply(request_id: int, reply: bytes) -> list[bool]:
    """The verdicts of a reply of `reply_size` bytes. Raises `ValueError` unless it answers
    `request_id` with one 0 or 1 per check."""
    (answered,) = _U32.unpack_from(reply, 0)
    verdicts = reply[_U32.size :]
    if answered != request_id or verdicts.strip(b"\x00\x01"):
        raise ValueError("the reply does not answer this request")
    return [b == 1 for b in verdicts]


def serve(requests: BinaryIO, replies: BinaryIO) -> int:
    """The worker's loop: answer each request until end of input. Returns the exit code: 0 at
    end of input, 2 on a malformed request (the relay then runs its checks in threads)."""
    replies.write(READY)
    replies.flush()
    while True:
        head = requests.read(_U32.size)
        if not head:
            return 0
        if len(head) != _U32.size:
            return 2
        (size,) = _U32.unpack(head)
        if size > MAX_REQUEST:
            return 2
        payload = requests.read(size)
        if len(payload) != size:
            return 2
        try:
            request_id, checks = decode_request(payload)
        except ValueError:
            return 2
        replies.write(encode_reply(request_id, check_signatures(checks)))
        replies.flush()
