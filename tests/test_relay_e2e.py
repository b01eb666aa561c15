"""End-to-end over real WebSockets, a real relay and a real Postgres."""

from __future__ import annotations

import dataclasses
import secrets
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import nacl.signing
import pytest
import trio
import trio_websocket

import relay._connection as connection_module
import relay._sequencer as sequencer_module
from clientkit import Client, RelayRefused, connect
from clientkit._transport import FrameReader, open_websocket
from ledger import Ledger
from model import wire
from model.chain import Head, advance
from model.envelope import event_id
from model.equivocation import SignedReceipt, open_receipt
from model.ids import new_id
from relay._run import run_relay
from tests.collab_sim import text_of
from tests.relay_harness import (
    PASSWORD,
    User,
    relay_config,
    running_relay,
    session,
    sign_up,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from relay._server import Relay

pytestmark = pytest.mark.usefixtures("database_url")

# Every collab starts with its genesis event at seq 1 (ADR-0010); posts follow it.
G = 1


async def genesis_head(client: Client, user: User) -> Head:
    """The head after the collab's genesis, as this client verified it."""
    async with client.history(user.collab_id, user.box_key) as events:
        async for d in events:
            assert d.seq == G
            break
    return events.head


@pytest.fixture
async def alice(relay: Relay) -> User:
    return await sign_up(relay.url, "alice")


def ledger_rows(database_url: str, collab_id: str) -> list[tuple[int, bytes]]:
    store = Ledger(database_url)
    store.open()
    try:
        rows = store.read_range(collab_id, 1, 1_000_000)
    finally:
        store.close()
    return [(r.seq, event_id(r.event)) for r in rows]


class Raw:
    """Bare WebSockets (no client kit), for sending frames a real client never would."""

    def __init__(self, nursery: trio.Nursery, stack: AsyncExitStack) -> None:
        self._nursery = nursery
        self._stack = stack

    async def open(self, url: str) -> trio_websocket.WebSocketConnection:
        return await self._stack.enter_async_context(open_websocket(url, self._nursery))

    async def authed(self, url: str, user: User) -> trio_websocket.WebSocketConnection:
        ws = await self.open(url)
        assert isinstance(await next_reply(ws), wire.Welcome)
        await ws.send_message(wire.encode(wire.Authenticate(rid=1, token=user.token)))
        assert isinstance(await next_reply(ws), wire.Authenticated)
        return ws


@pytest.fixture
async def raw(nursery: trio.Nursery) -> AsyncIterator[Raw]:
    async with AsyncExitStack() as stack:
        yield Raw(nursery, stack)


_READERS: dict[int, FrameReader] = {}


async def next_reply(ws: trio_websocket.WebSocketConnection) -> wire.Reply:
    reader = _READERS.get(id(ws))
    if reader is None or reader.ws is not ws:
        reader = _READERS[id(ws)] = FrameReader(ws)
    with trio.fail_after(10):
        return await reader.next()


# --- the happy path -----------------------------------------------------------------------------


@pytest.mark.objective("SO-3")
async def test_posts_are_sequenced_acked_with_receipts_and_delivered_verified(
    relay: Relay, alice: User, database_url: str
) -> None:
    with trio.fail_after(30):
        async with session(relay.url, alice) as client:
            acks = [
                await client.append(alice.event(f"m{i}", ts=1_700_000_000_000 + i))
                for i in range(5)
            ]
            assert [a.seq for a in acks] == [G + 1, G + 2, G + 3, G + 4, G + 5]
            head = await genesis_head(client, alice)
            for a in acks:
                head = advance(head, a.seq, a.event_id, a.chain)
                proven = open_receipt(relay.relay_pk, SignedReceipt.of_ack(a))
                assert proven is not None
                assert proven.size >= a.seq
            async with client.history(alice.collab_id, alice.box_key) as events:
                texts = [text_of(d) async for d in events]
    assert texts == [None] + [f"m{i}" for i in range(5)]  # the genesis, then the posts
    assert [s for s, _ in ledger_rows(database_url, alice.collab_id)] == [1, 2, 3, 4, 5, 6]


async def test_two_devices_post_concurrently_and_late_subscribers_see_each_event_once(
    relay: Relay, alice: User
) -> None:
    per_device = 150
    seen: dict[str, list[int]] = {}

    async def device(name: str) -> None:
        async with session(relay.url, alice) as client:
            for i in range(per_device):
                await client.append(alice.event(f"{name}-{i}", ts=1_700_000_000_000 + i))
                if i in (10, 75):
                    nursery.start_soon(subscriber, f"{name}-sub-{i}")

    async def subscriber(name: str) -> None:
        async with session(relay.url, alice) as client:
            got = seen.setdefault(name, [])
            async with client.history(alice.collab_id, alice.box_key, follow=True) as events:
                async for d in events:
                    got.append(d.seq)
                    if d.seq == G + 2 * per_device:
                        return

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(subscriber, "early")
            nursery.start_soon(device, "phone")
            nursery.start_soon(device, "laptop")
    assert len(seen) == 5
    for name, seqs in seen.items():
        assert seqs == list(range(1, G + 2 * per_device + 1)), name


async def test_subscribe_from_the_middle_then_live_has_no_gap_and_no_duplicate(
    relay: Relay, alice: User
) -> None:
    with trio.fail_after(30):
        async with session(relay.url, alice) as poster, session(relay.url, alice) as reader:
            for i in range(20):
                await poster.append(alice.event(f"before-{i}", ts=1_700_000_000_000 + i))
            got: list[int] = []
            async with reader.subscribe(alice.collab_id, from_seq=G + 11) as frames:
                async with trio.open_nursery() as nursery:

                    async def more() -> None:
                        for i in range(20):
                            await poster.append(alice.event(f"after-{i}", ts=1_700_000_100_000 + i))

                    nursery.start_soon(more)
                    async for frame in frames:
                        if isinstance(frame, wire.Event):
                            got.append(frame.seq)
                            if frame.seq == G + 40:
                                break
    assert got == list(range(G + 11, G + 41))


# --- idempotency --------------------------------------------------------------------------------


async def test_a_retried_event_gets_its_original_seq_even_after_reconnecting(
    relay: Relay, alice: User, database_url: str
) -> None:
    ev = alice.event("only once")
    with trio.fail_after(30):
        async with session(relay.url, alice) as client:
            first = await client.append(ev)
            again = await client.append(ev)
            await client.append(alice.event("later"))
        async with session(relay.url, alice) as client:
            after_reconnect = await client.append(ev)
    assert (first.seq, first.duplicate) == (G + 1, False)
    assert (again.seq, again.duplicate) == (G + 1, True)
    assert (after_reconnect.seq, after_reconnect.duplicate, after_reconnect.chain) == (
        G + 1,
        True,
        first.chain,
    )
    assert [s for s, _ in ledger_rows(database_url, alice.collab_id)] == [1, G + 1, G + 2]


async def test_the_same_event_twice_in_one_pipelined_burst_is_stored_once(
    raw: Raw, relay: Relay, alice: User, database_url: str
) -> None:
    ws = await raw.authed(relay.url, alice)
    ev = alice.event("dup")
    for rid in range(10, 20):
        await ws.send_message(wire.encode(wire.Append(rid=rid, event=ev)))
    acks = [await next_reply(ws) for _ in range(10)]
    assert all(isinstance(a, wire.Appended) and a.seq == G + 1 for a in acks)
    assert sum(not a.duplicate for a in acks if isinstance(a, wire.Appended)) == 1
    assert len(ledger_rows(database_url, alice.collab_id)) == G + 1


# --- authorship and authorization ---------------------------------------------------------------


@pytest.mark.objective("SO-3")
async def test_relay_only_appends_events_signed_by_the_sessions_own_key(
    relay: Relay, alice: User, database_url: str
) -> None:
    mallory = await sign_up(relay.url, "mallory")
    # An event claiming to be alice's but signed with mallory's key.
    forged = msgspec.structs.replace(alice.event("forged"), sig=mallory.event("x").sig)
    impostor = dataclasses.replace(alice, signing_key=mallory.signing_key)
    wrong_key = impostor.event("signed with the wrong key")
    async with session(relay.url, alice) as as_alice, session(relay.url, mallory) as as_mallory:
        with pytest.raises(RelayRefused) as bad_sig:
            await as_alice.append(forged)
        assert bad_sig.value.code is wire.ErrorCode.BAD_SIGNATURE
        with pytest.raises(RelayRefused) as wrong:
            await as_alice.append(wrong_key)
        assert wrong.value.code is wire.ErrorCode.BAD_SIGNATURE
        with pytest.raises(RelayRefused) as not_author:
            await as_mallory.append(alice.event("mallory submits alice's event"))
        assert not_author.value.code is wire.ErrorCode.UNAUTHORIZED
        with pytest.raises(RelayRefused) as not_member:
            await as_mallory.append(mallory.event("into alice's collab", collab_id=alice.collab_id))
        assert not_member.value.code is wire.ErrorCode.UNAUTHORIZED
        with pytest.raises(RelayRefused) as no_read:
            async with as_mallory.subscribe(alice.collab_id):
                pass
        assert no_read.value.code is wire.ErrorCode.UNAUTHORIZED
        # Mallory's own collab still works: refusals did not break her connection.
        assert (await as_mallory.append(mallory.event("mine"))).seq == G + 1
    assert [seq for seq, _ in ledger_rows(database_url, alice.collab_id)] == [G]  # the genesis


async def test_wrong_password_and_unknown_handle_get_the_same_answer(
    relay: Relay, alice: User
) -> None:
    async with session(relay.url, alice) as client:
        with pytest.raises(RelayRefused) as wrong:
            await client.login("alice", "not the password at all")
        with pytest.raises(RelayRefused) as unknown:
            await client.login("nobody-here", "not the password at all")
    assert (wrong.value.code, wrong.value.message) == (unknown.value.code, unknown.value.message)
    assert wrong.value.code is wire.ErrorCode.INVALID_CREDENTIALS


async def test_signup_refuses_taken_handles_and_bad_input(
    raw: Raw, relay: Relay, alice: User
) -> None:
    key = nacl.signing.SigningKey.generate()
    async with session(relay.url, alice) as client:
        with pytest.raises(RelayRefused) as taken:
            await client.signup("alice", "another long password", key, b"\x02" * 32)
        assert taken.value.code is wire.ErrorCode.HANDLE_TAKEN
        with pytest.raises(RelayRefused) as short:
            await client.signup("bob", "short", key, b"\x02" * 32)
        assert short.value.code is wire.ErrorCode.INVALID_REQUEST
        with pytest.raises(RelayRefused) as same_id:
            await client.signup(
                "bob", "a long enough password", key, b"\x02" * 32, account_id=alice.account_id
            )
        assert same_id.value.code is wire.ErrorCode.INVALID_REQUEST
    ws = await raw.open(relay.url)
    await next_reply(ws)
    for rid, bad in enumerate(
        [
            {"sign_pk": b"\x01" * 31},
            {"account_id": "not-an-id"},
            {"keystore": b"sealed", "keystore_sig": b"\x00" * 64},
        ],
        start=1,
    ):
        fields = {
            "rid": rid,
            "account_id": new_id("a"),
            "handle": f"bob-{rid}",
            "password": "a long enough password",
            "sign_pk": bytes(key.verify_key),
            "box_pk": b"\x02" * 32,
        } | bad
        await ws.send_message(wire.encode(wire.Signup(**fields)))  # type: ignore[arg-type]
        reply = await next_reply(ws)
        assert isinstance(reply, wire.Error)
        assert reply.code in (wire.ErrorCode.INVALID_REQUEST, wire.ErrorCode.BAD_SIGNATURE)


# --- bad input ----------------------------------------------------------------------------------


async def test_every_bad_frame_gets_a_typed_error_and_nothing_else_changes(
    raw: Raw, relay: Relay, alice: User, database_url: str
) -> None:
    ws = await raw.open(relay.url)
    bystander = await raw.authed(relay.url, alice)
    assert isinstance(await next_reply(ws), wire.Welcome)

    async def expect(code: wire.ErrorCode, rid: int | None = None) -> None:
        reply = await next_reply(ws)
        assert isinstance(reply, wire.Error), reply
        assert (reply.code, reply.rid) == (code, rid)

    await ws.send_message(b"\xc1 not msgpack")
    await expect(wire.ErrorCode.MALFORMED_FRAME)
    await ws.send_message("text frames are refused")
    await expect(wire.ErrorCode.MALFORMED_FRAME)
    await ws.send_message(msgspec.msgpack.encode({"t": "no_such_request", "rid": 7}))
    await expect(wire.ErrorCode.MALFORMED_FRAME, 7)
    await ws.send_message(msgspec.msgpack.encode({"t": "append", "rid": 8, "event": "nope"}))
    await expect(wire.ErrorCode.MALFORMED_FRAME, 8)
    await ws.send_message(b"\x00" * (wire.MAX_FRAME_BYTES + 1))
    await expect(wire.ErrorCode.FRAME_TOO_LARGE)
    await ws.send_message(wire.encode(wire.Append(rid=9, event=alice.event("no session"))))
    await expect(wire.ErrorCode.UNAUTHENTICATED, 9)
    await ws.send_message(wire.encode(wire.Authenticate(rid=10, token="not.a.jwt")))
    await expect(wire.ErrorCode.UNAUTHENTICATED, 10)
    await ws.send_message(wire.encode(wire.Authenticate(rid=11, token=alice.token)))
    assert isinstance(await next_reply(ws), wire.Authenticated)
    garbage_body = wire.Append(
        rid=12, event=msgspec.structs.replace(alice.event("x"), body=b"\x93\x01")
    )
    await ws.send_message(wire.encode(garbage_body))
    await expect(wire.ErrorCode.INVALID_EVENT, 12)
    await ws.send_message(
        wire.encode(wire.Subscribe(rid=13, collab_id=alice.collab_id, from_seq=0))
    )
    await expect(wire.ErrorCode.INVALID_REQUEST, 13)
    # The same connection still works, and so does everyone else's.
    await ws.send_message(wire.encode(wire.Ping(rid=14)))
    assert await next_reply(ws) == wire.Pong(rid=14)
    await bystander.send_message(wire.encode(wire.Append(rid=2, event=alice.event("fine"))))
    ack = await next_reply(bystander)
    assert isinstance(ack, wire.Appended)
    assert ack.seq == G + 1
    assert len(ledger_rows(database_url, alice.collab_id)) == G + 1


async def test_a_frame_beyond_the_websocket_cap_closes_only_that_connection(
    raw: Raw, relay: Relay, alice: User
) -> None:
    ws = await raw.open(relay.url)
    other = await raw.authed(relay.url, alice)
    await next_reply(ws)
    await ws.send_message(b"\x00" * (wire.WS_HARD_LIMIT + 10))
    with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as closed:
        await ws.get_message()
    assert closed.value.reason.code == 1009
    await other.send_message(wire.encode(wire.Ping(rid=3)))
    assert await next_reply(other) == wire.Pong(rid=3)


# --- backpressure -------------------------------------------------------------------------------


def _kernel_buffer(name: str, field: int) -> int:
    """One of Linux's TCP buffer sizes (`min default max`), or 4 MiB where it cannot be read."""
    try:
        return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[field])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


async def test_a_lagging_subscriber_is_dropped_with_a_reason_and_resumes_without_loss(
    raw: Raw, relay: Relay, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the slow subscriber's connection gets a tiny outbox.
    monkeypatch.setattr(connection_module, "OUTBOX_FRAMES", 4)
    slow = await raw.authed(relay.url, alice)
    monkeypatch.undo()
    await slow.send_message(wire.encode(wire.Subscribe(rid=5, collab_id=alice.collab_id)))
    assert isinstance(await next_reply(slow), wire.Subscribed)
    assert isinstance(await next_reply(slow), wire.Event)  # the genesis
    assert isinstance(await next_reply(slow), wire.CaughtUp)
    # A burst larger than the kernel can buffer for a reader that reads nothing (the relay's
    # send buffer grows up to tcp_wmem's maximum, the reader's stays at tcp_rmem's default),
    # so the relay must find the subscriber lagging: ~8 KB per event.
    text = "x" * 8000
    total = max(300, 2 * (_kernel_buffer("tcp_wmem", 2) + _kernel_buffer("tcp_rmem", 1)) // 8000)
    fast_seen: list[int] = []
    with trio.fail_after(60):
        async with session(relay.url, alice) as fast, session(relay.url, alice) as poster:
            async with fast.subscribe(alice.collab_id) as frames:
                # The slow subscriber reads nothing while a burst of events goes out.
                async with trio.open_nursery() as nursery:

                    async def burst() -> None:
                        events = [alice.event(text, ts=1_700_000_000_000 + i) for i in range(total)]
                        ws = await raw.authed(relay.url, alice)
                        for i, ev in enumerate(events):
                            await ws.send_message(wire.encode(wire.Append(rid=100 + i, event=ev)))
                        for _ in events:
                            await next_reply(ws)

                    nursery.start_soon(burst)
                    async for frame in frames:
                        if isinstance(frame, wire.Event):
                            fast_seen.append(frame.seq)
                            if frame.seq == G + total:
                                break
            del poster
        slow_seen: list[int] = []
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                frame = await next_reply(slow)
                if isinstance(frame, wire.Event):
                    slow_seen.append(frame.seq)
    assert fast_seen == list(range(1, G + total + 1))
    assert closed.value.reason.code == 4008
    reason = closed.value.reason.reason or ""
    assert "resume after the last seq you received" in reason
    assert int(reason.rsplit("at most ", 1)[1].split()[0]) >= len(slow_seen)
    assert slow_seen == list(range(G + 1, G + len(slow_seen) + 1))
    assert len(slow_seen) < total
    # Resuming after the last seq it saw gives the rest, exactly once: a client reads up to
    # there (verifying), then resumes with that view.
    async with session(relay.url, alice) as again:
        async with again.history(alice.collab_id, alice.box_key) as upto:
            async for d in upto:
                if d.seq == G + len(slow_seen):
                    break
        async with again.history(alice.collab_id, alice.box_key, view=upto.view) as events:
            resumed = [d.seq async for d in events]
    assert resumed == list(range(G + len(slow_seen) + 1, G + total + 1))


# --- shutdown -----------------------------------------------------------------------------------


async def test_shutdown_drains_inflight_appends_and_closes_subscribers_with_a_reason(
    raw: Raw, database_url: str, tmp_path: Path
) -> None:
    config = relay_config(database_url, tmp_path)
    acked: list[int] = []
    refused = 0
    async with running_relay(config) as r:
        user = await sign_up(r.url)
        sub = await raw.authed(r.url, user)
        await sub.send_message(wire.encode(wire.Subscribe(rid=2, collab_id=user.collab_id)))
        pub = await raw.authed(r.url, user)
        events = [user.event(secrets.token_hex(8), ts=1_700_000_000_000 + i) for i in range(300)]
        for i, ev in enumerate(events):
            await pub.send_message(wire.encode(wire.Append(rid=10 + i, event=ev)))
        r.request_shutdown()
        with trio.fail_after(20):
            try:
                while True:
                    reply = await next_reply(pub)
                    if isinstance(reply, wire.Appended):
                        acked.append(reply.seq)
                    else:
                        assert isinstance(reply, wire.Error)
                        assert reply.code is wire.ErrorCode.SHUTTING_DOWN
                        refused += 1
            except trio_websocket.ConnectionClosed as exc:
                assert exc.reason.code == 1001
        with trio.fail_after(20), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await sub.get_message()
        assert closed.value.reason.code == 1001
        assert "shutting down" in (closed.value.reason.reason or "")
    stored = [s for s, _ in ledger_rows(database_url, user.collab_id)]
    # Every acked event is stored, seqs are contiguous, and nothing unacked slipped in after.
    assert sorted(acked) == acked
    assert set(acked) <= set(stored)
    assert stored == list(range(1, len(stored) + 1))


async def test_a_batch_of_requests_is_handled_in_order_with_a_reply_for_each(
    raw: Raw, relay: Relay, alice: User, database_url: str
) -> None:
    ws = await raw.authed(relay.url, alice)
    inner = [
        wire.encode(wire.Append(rid=20, event=alice.event("one"))),
        msgspec.msgpack.encode({"t": "no_such_request", "rid": 25}),
        wire.encode(wire.Append(rid=21, event=alice.event("two"))),
        wire.batch([wire.encode(wire.Ping(rid=22)), wire.encode(wire.Ping(rid=23))]),
        wire.encode(wire.Ping(rid=24)),
    ]
    await ws.send_message(wire.batch(inner))
    replies = [await next_reply(ws) for _ in range(5)]
    acks = [r for r in replies if isinstance(r, wire.Appended)]
    errors = [r for r in replies if isinstance(r, wire.Error)]
    assert [(a.rid, a.seq) for a in acks] == [(20, G + 1), (21, G + 2)]
    assert [e.code for e in errors] == [wire.ErrorCode.MALFORMED_FRAME] * 2
    assert wire.Pong(rid=24) in replies
    assert [s for s, _ in ledger_rows(database_url, alice.collab_id)] == [1, G + 1, G + 2]


# --- robustness -------------------------------------------------------------------------------


async def test_hostile_strings_get_typed_errors_and_the_relay_stays_up(
    raw: Raw, relay: Relay, alice: User
) -> None:
    ws = await raw.open(relay.url)
    await next_reply(ws)
    await ws.send_message(wire.encode(wire.Login(rid=1, handle="ali\x00ce", password="x" * 20)))
    assert (await next_reply(ws)) == wire.Error(
        rid=1, code=wire.ErrorCode.INVALID_CREDENTIALS, message="handle or password is wrong"
    )
    authed = await raw.authed(relay.url, alice)
    for rid, probe in enumerate(
        [wire.GetAccount(rid=0, handle="\x00"), wire.GetAccount(rid=0, account_id="a_\x00")],
        start=2,
    ):
        await authed.send_message(wire.encode(msgspec.structs.replace(probe, rid=rid)))
        reply = await next_reply(authed)
        assert isinstance(reply, wire.Error)
        assert reply.code is wire.ErrorCode.NOT_FOUND
    await authed.send_message(wire.encode(wire.Ping(rid=9)))
    assert await next_reply(authed) == wire.Pong(rid=9)


async def test_an_unexpected_failure_is_an_internal_error_for_that_request_only(
    raw: Raw, relay: Relay, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_account_id: str) -> None:
        raise RuntimeError("a bug")

    ws = await raw.authed(relay.url, alice)
    monkeypatch.setattr(relay.ledger, "keystore", broken)
    await ws.send_message(wire.encode(wire.GetKeystore(rid=5)))
    reply = await next_reply(ws)
    assert isinstance(reply, wire.Error)
    assert reply.code is wire.ErrorCode.INTERNAL
    assert "incident e_" in reply.message
    assert "a bug" not in reply.message
    await ws.send_message(wire.encode(wire.Ping(rid=6)))
    assert await next_reply(ws) == wire.Pong(rid=6)


async def test_coalesced_messages_stay_under_the_clients_size_cap(
    relay: Relay, alice: User
) -> None:
    big = "x" * 15_000
    count = 150  # ~2.3 MB in all: one uncapped batch would exceed the 1 MiB WebSocket cap
    with trio.fail_after(60):
        async with session(relay.url, alice) as reader, session(relay.url, alice) as poster:
            async with reader.history(alice.collab_id, alice.box_key, follow=True) as events:
                await poster.append_many(
                    [alice.event(big, ts=1_700_000_000_000 + i) for i in range(count)]
                )
                seen = 0
                async for d in events:
                    seen += 1
                    if d.seq == G + count:
                        break
    assert seen == G + count


async def fresh_token(url: str, user: User) -> str:
    async with connect(url) as client:
        return (await client.login(user.handle, PASSWORD)).token


async def test_a_session_that_expires_on_an_open_connection_stops_working(
    database_url: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(relay_config(database_url, tmp_path), session_ttl_seconds=2)
    async with running_relay(config) as r:
        user = await sign_up(r.url)
        # A token from a login right here: on a loaded machine (the suite on two xdist workers)
        # the one sign_up got could expire before the fresh append, which then failed.
        user.token = await fresh_token(r.url, user)
        async with session(r.url, user) as client:
            await client.append(user.event("while fresh"))
            await trio.sleep(2.2)
            with pytest.raises(RelayRefused) as expired:
                await client.append(user.event("too late"))
    assert expired.value.code is wire.ErrorCode.UNAUTHENTICATED
    assert "expired" in expired.value.message


async def test_run_relay_returns_after_a_programmatic_shutdown_even_with_signal_handling(
    database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            r = await nursery.start(
                partial(run_relay, relay_config(database_url, tmp_path), auto_migrate=False)
            )
            r.request_shutdown()


async def test_idle_sequencers_retire_and_the_next_append_continues_the_chain(
    relay: Relay, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sequencer_module, "IDLE_SECONDS", 0.3)
    registry = relay._sequencers
    assert registry is not None
    before = alice.event("before the nap")
    async with session(relay.url, alice) as client:
        first = await client.append(before)
        assert [s.collab_id for s in registry.statistics()] == [alice.collab_id]
        await trio.sleep(1.0)  # > IDLE_SECONDS: the actor retires
        assert registry.statistics() == []
        second = await client.append(alice.event("after the nap"))
        again = await client.append(before)  # a retry after the restart still dedups
        async with client.history(alice.collab_id, alice.box_key) as events:
            seqs = [d.seq async for d in events]
    assert (first.seq, second.seq) == (G + 1, G + 2)
    assert (again.seq, again.duplicate) == (G + 1, True)
    assert seqs == [1, G + 1, G + 2]
