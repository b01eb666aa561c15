"""Catch-up pages as frames built by Postgres (ledger/_frames.py, issue 17).

A catch-up no longer decodes each stored event and encodes its `event` frame in Python: the
page query builds the frame's bytes. Clients decode those bytes with the wire module's decoder
and verify signatures and the chain over the fields, so the frame must be exactly what
`wire.encode(wire.Event(...))` gives — for every integer width of the seq, every `bin` width
of the body, and collab ids of every `str` width — and a DM must still come back as an event
(fan-out decides per subscriber whether it gets the body or a `withheld` frame).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import nacl.public
import psycopg
import pytest

from fanout import Message, encode_event, framed_batch, ws_binary_frame
from ledger._frames import event_prefix, frame_sql
from model import content as contentmod
from model import wire
from model.dm import seal_dm
from model.envelope import SequencedEvent, SignedEvent, verify_event
from model.ids import new_id
from tests.helpers import make_account, make_collab, make_events

if TYPE_CHECKING:
    from ledger import Ledger
    from tests.helpers import Actor

pytestmark = pytest.mark.usefixtures("database_url")

SEQS = [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**53]
BODY_SIZES = [0, 1, 255, 256, 65_535, 65_536, 70_000]


def test_postgres_builds_each_event_frame_byte_for_byte_as_the_wire_module_encodes_it(
    database_url: str,
) -> None:
    collab_ids = ["c", "c_" + "x" * 29, "c_" + "x" * 30, "c_" + "x" * 300]  # fixstr, str8, str16
    cases = [
        (cid, seq, bytes([seq % 251]) * size, bytes(range(64)), bytes(32))
        for cid in collab_ids
        for seq in SEQS
        for size in BODY_SIZES
    ]
    with psycopg.connect(database_url, autocommit=True) as conn:
        for cid, seq, body, sig, chain in cases:
            row = conn.execute(
                f"SELECT {frame_sql('%(prefix)s')}"
                " FROM (SELECT %(seq)s::bigint AS seq, %(body)s::bytea AS body,"
                " %(sig)s::bytea AS sig, %(chain)s::bytea AS chain) AS events",
                {"prefix": event_prefix(cid), "seq": seq, "body": body, "sig": sig,
                 "chain": chain},
                binary=True,
            ).fetchone()  # fmt: skip
            assert row is not None
            expected = wire.encode(
                wire.Event(collab_id=cid, seq=seq, event=SignedEvent(body, sig), chain=chain)
            )
            assert row[0] == expected, (len(cid), seq, len(body))


def _dm_to_a_stranger(alice: Actor, collab_id: str, ts: int) -> SignedEvent:
    stranger = nacl.public.PrivateKey.generate()
    return seal_dm(
        signing_key=alice.signing_key, sender_box_key=stranger, recipient_box_pk=bytes(
            stranger.public_key), collab_id=collab_id, sender_id=alice.account_id,
        recipient_id=new_id("a"), ts=ts, epoch=0,
        content=contentmod.encode_content(contentmod.Message("psst")),
    )  # fmt: skip


def test_read_frames_pages_like_read_page_with_every_event_framed_and_each_dm_left_whole(
    ledger: Ledger,
) -> None:
    alice = make_account(ledger, "alice")
    collab_id, key = make_collab(ledger, alice)
    events = make_events(alice, collab_id, key, 30)
    dm = verify_event(_dm_to_a_stranger(alice, collab_id, 1_700_000_000_100), alice.sign_pk)
    events.insert(7, dm)
    ledger.append_batch(collab_id, ledger.head(collab_id), events)
    stored = {e.seq: e for e in ledger.read_range(collab_id, 1, 1000)}
    assert len(stored) == 31 + 1  # and the genesis event

    def frame_pages(max_events: int, max_bytes: int) -> list[list[int]]:
        out, from_seq, more = [], 1, True
        while more:
            items, more = ledger.read_frames(collab_id, from_seq, max_events, max_bytes)
            assert items, "a page that says more followed is never empty"
            assert len(items) <= max_events
            sizes = [len(i) if isinstance(i, bytes) else len(encode_event(i)) for _, i in items]
            assert len(items) == 1 or sum(sizes) <= max_bytes
            for seq, item in items:
                if isinstance(item, SequencedEvent):
                    assert item == stored[seq]
                    assert item.audience, "only a DM comes back whole"
                else:
                    assert item == encode_event(stored[seq])
            seqs = [seq for seq, _ in items]
            out.append(seqs)
            from_seq = seqs[-1] + 1
        return out

    everything = list(range(1, 33))
    assert frame_pages(1000, 1 << 30) == [everything]
    assert [len(p) for p in frame_pages(10, 1 << 30)] == [10, 10, 10, 2]
    one = len(encode_event(stored[2]))  # the posts are all about this size
    by_bytes = frame_pages(1000, 3 * one + 40)
    assert [s for p in by_bytes for s in p] == everything
    assert max(len(p) for p in by_bytes) == 3
    assert all(len(p) == 1 for p in frame_pages(1000, 1))  # one event even when too big
    assert ledger.read_frames(collab_id, 33, 10, 1 << 30) == ([], False)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 512, 65_535, 65_536])
def test_a_batch_joined_in_one_copy_is_the_bytes_msgspec_writes(n: int) -> None:
    """`wire.batch` and fan-out's `framed_batch` join frames after a hand-made header; the
    result must be what msgspec encodes for `Batch` (and its WebSocket frame), byte for byte."""
    frames = [wire.encode(wire.Pong(rid=i)) for i in range(n)]
    by_msgspec = (
        frames[0]
        if n == 1
        else msgspec.msgpack.encode(wire.Batch(frames=[msgspec.Raw(f) for f in frames]))
    )
    assert wire.batch(frames) == by_msgspec
    assert framed_batch(frames) == ws_binary_frame(by_msgspec)
    assert Message.of_frames(frames).framed == ws_binary_frame(by_msgspec)
    assert wire.unbatch_replies(wire.batch(frames)) == [wire.Pong(rid=i) for i in range(n)]
