"""Catch-up pages as ready-made `event` frames, built by Postgres from the stored columns.

A catch-up sends every stored event of a collab to a subscriber as the relay's `event` frame
(`wire.Event`, msgpack). Decoding each row into Python objects and encoding it again with
msgspec cost the relay more CPU per event than the rest of the replay (issue 17): here the
query itself concatenates the frame's bytes — a per-collab prefix, the seq, the body, the
signature and the chain, each with its msgpack header — so the relay receives one `bytea` per
event in binary form and only splices frames into `batch` messages. The bytes are exactly
what `wire.encode(wire.Event(...))` gives (tests/test_ledger.py checks every integer and
`bin` width), so clients decode them as before.

A DM is not built here: who may see its body is decided per subscriber (fan-out gives the
others a `withheld` frame), so its row comes back as columns, like `Ledger.read_page`'s.
"""

from __future__ import annotations

from typing import Final

from model import wire
from model.envelope import SignedEvent

# msgpack of `Event(collab_id=…, seq=0, event=SignedEvent(b"", b""), chain=b"")` after the
# collab id: seq 0, the `event` key with its 2-element array and two empty `bin`s, the `chain`
# key and an empty `bin`. Everything before it is the per-collab prefix (`event_prefix`).
_EMPTY_TAIL: Final = b"\x00\xa5event\x92\xc4\x00\xc4\x00\xa5chain\xc4\x00"
_EVENT_KEY: Final = b"\xa5event\x92"  # after the seq: "event" and its [body, sig] array
_CHAIN_KEY: Final = b"\xa5chain"


def event_prefix(collab_id: str) -> bytes:
    """The bytes every `event` frame of `collab_id` starts with, up to its seq's encoding;
    taken from msgspec's own encoding, so it follows the wire module."""
    empty = wire.encode(
        wire.Event(collab_id=collab_id, seq=0, event=SignedEvent(b"", b""), chain=b"")
    )
    if not empty.endswith(_EMPTY_TAIL):  # the field order of `wire.Event` changed
        raise AssertionError("wire.Event is no longer encoded as ledger/_frames.py builds it")
    return empty[: -len(_EMPTY_TAIL)]


def _hex(data: bytes) -> str:
    return "'\\x" + data.hex() + "'::bytea"


def _uint(expr: str) -> str:
    """SQL for the msgpack encoding of non-negative bigint `expr` (msgspec's smallest form)."""
    return (
        f"(CASE WHEN {expr} < 128 THEN set_byte('\\x00'::bytea, 0, ({expr})::int)"
        f" WHEN {expr} < 256 THEN '\\xcc'::bytea || set_byte('\\x00'::bytea, 0, ({expr})::int)"
        f" WHEN {expr} < 65536 THEN '\\xcd'::bytea || substring(int8send({expr}) from 7)"
        f" WHEN {expr} < 4294967296 THEN '\\xce'::bytea || substring(int8send({expr}) from 5)"
        f" ELSE '\\xcf'::bytea || int8send({expr}) END)"
    )


def _bin(column: str) -> str:
    """SQL for `column` as a msgpack `bin` (its header, then its bytes)."""
    n = f"octet_length({column})"
    return (
        f"(CASE WHEN {n} < 256 THEN '\\xc4'::bytea || set_byte('\\x00'::bytea, 0, {n})"
        f" WHEN {n} < 65536 THEN '\\xc5'::bytea || substring(int4send({n}) from 3)"
        f" ELSE '\\xc6'::bytea || int4send({n}) END) || {column}"
    )


def frame_sql(prefix_param: str) -> str:
    """SQL for an events row's `event` frame, given the named parameter holding
    `event_prefix(collab_id)` (e.g. ``"%(prefix)s"``)."""
    return (
        f"({prefix_param}::bytea || {_uint('seq')} || {_hex(_EVENT_KEY)}"
        f" || {_bin('body')} || {_bin('sig')} || {_hex(_CHAIN_KEY)} || {_bin('chain')})"
    )
