"""Live fan-out over a real relay: one committed batch is one message per view (SO-1, ADR-0023).

Fan-out builds each published batch once (`fanout.Message`, a `batch` of the events' frames,
already a WebSocket frame) and writes the same bytes to every subscriber — except that a batch
holding a DM is built once per view of it: the two participants get the DM's body, everyone
else a `withheld` frame at its seq. These tests follow three members live while one author
sends posts and a DM in one WebSocket message (so they are sequenced, committed and published
together), and check what each member's socket carried.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import trio

from model import content as contentmod
from model import wire
from model.dm import seal_dm
from model.envelope import seal_event
from tests.relay_harness import session
from tests.test_membership_relay import team
from tests.test_relay_e2e import Raw, next_reply
from tests.test_relay_e2e import raw as raw  # the `raw` fixture

if TYPE_CHECKING:
    import trio_websocket

    from model.envelope import SignedEvent
    from model.view import CollabView
    from relay._server import Relay
    from tests.relay_harness import User

TS = 1_700_000_000_000


async def _follow(
    raw: Raw, relay: Relay, user: User, collab_id: str
) -> trio_websocket.WebSocketConnection:
    ws = await raw.authed(relay.url, user)
    await ws.send_message(wire.encode(wire.Subscribe(rid=2, collab_id=collab_id)))
    while not isinstance(await next_reply(ws), wire.CaughtUp):
        pass
    return ws


async def _read_until(ws: trio_websocket.WebSocketConnection, seq: int) -> dict[int, wire.Reply]:
    got: dict[int, wire.Reply] = {}
    while seq not in got:
        frame = await next_reply(ws)
        if isinstance(frame, wire.Event | wire.Withheld):
            assert frame.seq not in got  # each seq once
            got[frame.seq] = frame
    return got


async def _post_notes_around_a_dm(
    raw: Raw, relay: Relay, alice: User, bob: User, view: CollabView
) -> tuple[SignedEvent, list[int], int]:
    """Alice posts a note, a DM to Bob and a note in one WebSocket message (so they are
    sequenced, committed and published together); the DM, the three seqs and the DM's seq."""
    assert view.membership is not None
    cid = alice.collab_id
    epoch, key = view.current_key()

    def note(text: str, i: int) -> bytes:
        ev = seal_event(
            signing_key=alice.signing_key, collab_key=key, collab_id=cid,
            actor_id=alice.account_id, kind="msg", ts=TS + i, epoch=epoch,
            content=contentmod.encode_content(contentmod.Message(text)),
        )  # fmt: skip
        return wire.encode(wire.Append(rid=10 + i, event=ev))

    dm = seal_dm(
        signing_key=alice.signing_key, sender_box_key=alice.box_key,
        recipient_box_pk=view.membership.members[bob.account_id].box_pk, collab_id=cid,
        sender_id=alice.account_id, recipient_id=bob.account_id, ts=TS + 1, epoch=epoch,
        content=contentmod.encode_content(contentmod.Message("psst")),
    )  # fmt: skip
    frames = [note("one", 0), wire.encode(wire.Append(rid=11, event=dm)), note("two", 2)]
    poster = await raw.authed(relay.url, alice)
    await poster.send_message(wire.batch(frames))
    acks = [await next_reply(poster) for _ in frames]
    assert all(isinstance(ack, wire.Appended) for ack in acks), acks
    seqs = sorted(ack.seq for ack in acks if isinstance(ack, wire.Appended))
    dm_seq = next(ack.seq for ack in acks if isinstance(ack, wire.Appended) and ack.rid == 11)
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    return dm, seqs, dm_seq


@pytest.mark.objective("SO-1")
@pytest.mark.objective("ADR-0023")
async def test_a_dm_published_with_posts_reaches_live_participants_only(
    relay: Relay, raw: Raw
) -> None:
    with trio.fail_after(60):
        alice, bob, carol = await team(relay)
        cid = alice.collab_id
        async with session(relay.url, alice) as a:
            view = await a.read(cid, alice.box_key)
        followers = {u.handle: await _follow(raw, relay, u, cid) for u in (alice, bob, carol)}
        dm, seqs, dm_seq = await _post_notes_around_a_dm(raw, relay, alice, bob, view)
        seen = {h: await _read_until(ws, seqs[-1]) for h, ws in followers.items()}
    for handle, got in seen.items():
        assert sorted(s for s in got if s >= seqs[0]) == seqs, handle
        at_dm = got[dm_seq]
        if handle == "carol":
            # No body and no ciphertext: just what keeps the chain verifiable.
            assert isinstance(at_dm, wire.Withheld), handle
        else:
            assert isinstance(at_dm, wire.Event), handle
            assert at_dm.event == dm
        for s in seqs:
            if s != dm_seq:
                assert isinstance(got[s], wire.Event), (handle, s)


@pytest.mark.objective("SO-1")
async def test_a_dm_replayed_in_a_catch_up_reaches_participants_only_as_stored(
    relay: Relay, raw: Raw
) -> None:
    """Catch-up pages come framed by Postgres, except DMs, which fan-out frames per reader:
    replayed from seq 1, the participants get the DM's body, a third member only `withheld`,
    and every other position is the stored event, byte for byte in its fields."""
    with trio.fail_after(60):
        alice, bob, carol = await team(relay)
        cid = alice.collab_id
        async with session(relay.url, alice) as a:
            view = await a.read(cid, alice.box_key)
        dm, seqs, dm_seq = await _post_notes_around_a_dm(raw, relay, alice, bob, view)
        stored = {
            e.seq: e for e in await trio.to_thread.run_sync(relay.ledger.read_range, cid, 1, 100)
        }
        replayed: dict[str, dict[int, wire.Reply]] = {}
        for user in (alice, bob, carol):
            ws = await raw.authed(relay.url, user)
            request = wire.Subscribe(rid=2, collab_id=cid, from_seq=1, follow=False)
            await ws.send_message(wire.encode(request))
            got = replayed[user.handle] = {}
            while not isinstance(frame := await next_reply(ws), wire.CaughtUp):
                if isinstance(frame, wire.Event | wire.Withheld):
                    assert frame.seq == len(got) + 1, "in order, each seq once"
                    got[frame.seq] = frame
            assert frame.seq == seqs[-1] == len(got)
    for handle, got in replayed.items():
        for seq, frame in got.items():
            if seq == dm_seq and handle == "carol":
                assert isinstance(frame, wire.Withheld), handle
                continue
            assert isinstance(frame, wire.Event), (handle, seq)
            assert (frame.event, frame.chain) == (stored[seq].event, stored[seq].chain)
        assert isinstance(got[dm_seq], wire.Withheld if handle == "carol" else wire.Event)
        assert handle == "carol" or got[dm_seq].event == dm  # type: ignore[union-attr]


async def test_a_live_message_the_kernel_took_in_part_arrives_whole_without_another_event(
    relay: Relay, raw: Raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fan-out writes a live message straight into a subscriber's socket; should the kernel
    take only part of it, the connection's writer must finish it at once (not when the next
    event comes, which may be never), before anything else."""
    with trio.fail_after(60):
        alice, bob, _ = await team(relay)
        cid = alice.collab_id
        async with session(relay.url, alice) as a:
            view = await a.read(cid, alice.box_key)
        follower = await _follow(raw, relay, alice, cid)
        real_write = os.write
        halved: list[int] = []

        def half_once(fd: int, data: bytes | memoryview) -> int:
            if halved:
                return real_write(fd, data)
            halved.append(len(data))
            return real_write(fd, data[: len(data) // 2])

        monkeypatch.setattr(os, "write", half_once)
        _, seqs, _ = await _post_notes_around_a_dm(raw, relay, alice, bob, view)
        got = await _read_until(follower, seqs[-1])
    assert halved, "the live message was not written directly"
    assert sorted(s for s in got if s >= seqs[0]) == seqs
