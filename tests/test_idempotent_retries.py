"""Identity before admission: a retry of an event the ledger holds is answered, never refused.

An author who lost an ack resends the same signed bytes. Whatever changed since — a rotation
moved the epoch, the change itself moved the head, the author was removed — the relay answers
with the stored seq, chain and receipt (`duplicate`), so the author learns its event's fate and
nothing is stored twice (SO-4: no duplicate history). A refusal means "not stored", so the
client kit makes a change again or seals again only after one.

Real relay, real Postgres, real client kit over loopback WebSockets; the ledger is the judge of
"stored once". The lost ack is a real one: the client's connection goes through a loopback
proxy that cuts it when the ack is on its way back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from clientkit import ConnectionLost, RelayRefused, _collab
from model import content as contentmod
from model import wire
from model.chain import next_head
from model.envelope import KIND_MANAGEMENT, decode_body, event_id
from model.membership import PROOF_VERSION, MemberKind, Proof, Role, management_event
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import seal_in_view, session, sign_up
from tests.test_membership_relay import add
from tests.test_rotate_keys import NewKeys, rotate_directory

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ledger import Ledger
    from model.envelope import SignedEvent
    from model.membership import Operation
    from model.view import CollabView
    from relay._server import Relay
    from tests.relay_harness import User

TS = 1_700_000_000_000

pytestmark = pytest.mark.objective("SO-4")


def _sealer(author: User, text: str) -> Callable[[CollabView], SignedEvent]:
    return lambda view: seal_in_view(author, view, text, ts=TS)


async def _stored_ids(ledger: Ledger, collab_id: str) -> list[bytes]:
    events = await trio.to_thread.run_sync(ledger.read_range, collab_id, 1, 10_000)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    return [event_id(e.event) for e in events]


async def test_a_stored_rotation_resent_gets_duplicate_with_its_seq(
    relay: Relay, ledger: Ledger
) -> None:
    alice = await sign_up(relay.url, "alice")
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        view = await a.read(cid, alice.box_key)
        rotation = _collab.proposal(view, alice.signing_key, _collab.rotate(view), TS)
        first = await a.append(rotation)
        again = await a.append(rotation)  # the ack was lost: the same signed proof again
    assert (again.seq, again.chain, again.duplicate) == (first.seq, first.chain, True)
    assert (await _stored_ids(ledger, cid)).count(event_id(rotation)) == 1


async def test_stored_content_resent_after_a_rotation_is_a_duplicate_and_stored_once(
    relay: Relay, ledger: Ledger
) -> None:
    """The kit's posting path (`seal_and_append`, which `cozy post` and the bot kit use): the
    event whose ack was lost is resent after a rotation; it must come back as a duplicate, not
    bounce as `stale` and be sealed and stored a second time."""
    alice = await sign_up(relay.url, "alice")
    cid = alice.collab_id
    seal = _sealer(alice, "posted once")
    async with session(relay.url, alice) as a:
        view = await a.read(cid, alice.box_key)
        posted = seal(view)
        first = await a.append(posted)  # stored; say its ack was lost
        await a.manage(alice.signing_key, alice.box_key, cid, _collab.rotate)
        ack, _ = await a.seal_and_append(cid, alice.box_key, seal, view=view, resend=posted)
        plain = await a.append(posted)  # and the bare append, after the rotation, too
    assert (ack.seq, ack.chain, ack.duplicate) == (first.seq, first.chain, True)
    assert (plain.seq, plain.duplicate) == (first.seq, True)
    stored = await trio.to_thread.run_sync(ledger.read_range, cid, 1, 100)
    content = [e for e in stored if decode_body(e.event.body).kind == contentmod.KIND_MESSAGE]
    assert [event_id(e.event) for e in content] == [event_id(posted)], "stored twice"


@pytest.mark.objective("SO-5")
async def test_a_removed_members_retry_of_its_stored_event_gets_duplicate(
    relay: Relay, ledger: Ledger
) -> None:
    """Bob's post is stored, then Bob is removed before he sees its ack: his retry learns the
    stored seq. Nothing else opens up: a post of his that is not stored is still refused, and
    a non-member resending Bob's stored event (which it cannot author) learns nothing."""
    alice, bob, mallory = [await sign_up(relay.url, h) for h in ("alice", "bob", "mallory")]
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        await add(a, alice, bob)
    async with session(relay.url, bob) as b:
        view = await b.read(cid, bob.box_key)
        posted = _sealer(bob, "bob's last word")(view)
        unsent = _sealer(bob, "never stored")(view)
        first = await b.append(posted)
    async with session(relay.url, alice) as a:
        await a.manage(
            alice.signing_key, alice.box_key, cid, lambda v: _collab.remove(v, bob.account_id)
        )
    async with session(relay.url, bob) as b:
        again = await b.append(posted)
        assert (again.seq, again.chain, again.duplicate) == (first.seq, first.chain, True)
        with pytest.raises(RelayRefused) as refused:
            await b.append(unsent)
        assert refused.value.code is wire.ErrorCode.UNAUTHORIZED
    async with session(relay.url, mallory) as m:
        with pytest.raises(RelayRefused) as refused:
            await m.append(posted)  # authored by Bob, not by the sender
        assert refused.value.code is wire.ErrorCode.UNAUTHORIZED
    ids = await _stored_ids(ledger, cid)
    assert ids.count(event_id(posted)) == 1
    assert event_id(unsent) not in ids


async def test_a_batch_holding_the_same_events_twice_stores_each_once(
    relay: Relay, ledger: Ledger
) -> None:
    """[post, rotation, post, rotation] pipelined in one batch frame: the second copies come
    after the rotation moved the epoch and the head, and are answered as duplicates."""
    alice = await sign_up(relay.url, "alice")
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        view = await a.read(cid, alice.box_key)
        posted = _sealer(alice, "in the batch")(view)
        # The rotation follows the post, in the same batch: made against the head after it.
        after = next_head(view.head.chain, event_id(posted))
        op: Operation = _collab.rotate(view)
        proof = Proof(PROOF_VERSION, cid, alice.account_id, view.head.seq + 1, after, op)
        rotation = management_event(alice.signing_key, proof, ts=TS)
        acks = await a.append_many([posted, rotation, posted, rotation])
    assert [a.duplicate for a in acks] == [False, False, True, True]
    assert [a.seq for a in acks] == [view.head.seq + 1, view.head.seq + 2] * 2
    ids = await _stored_ids(ledger, cid)
    assert ids[view.head.seq :] == [event_id(posted), event_id(rotation)]


class _AckCutter:
    """A loopback TCP proxy in front of the relay that, once armed, cuts the connection when the
    relay's next ack (an `appended` frame) is on its way back: the relay stored the event, the
    client never hears so."""

    def __init__(self, relay_port: int) -> None:
        self._relay_port = relay_port
        self.port = 0
        self._armed = False
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def arm(self) -> None:
        self._armed = True

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self._relay_port)
        async with client, server, trio.open_nursery() as nursery:

            async def upstream() -> None:
                async for data in client:
                    await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                async for data in server:
                    # Server frames are not masked: the ack's msgpack tag shows in the bytes.
                    if self._armed and b"appended" in data:
                        self._armed = False
                        self.cuts += 1
                        break  # the ack never reaches the client
                    await client.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)


async def test_manage_after_a_lost_ack_applies_the_rotation_once(
    relay: Relay, ledger: Ledger
) -> None:
    """The rotation is stored but its ack is cut on the way back. The caller hands the lost
    proof back to `manage` on a new connection: it is answered as a duplicate and the change is
    not made a second time (one rotation, epoch 1)."""
    alice = await sign_up(relay.url, "alice")
    cid = alice.collab_id
    port = int(relay.url.rsplit(":", 1)[1])
    cutter = _AckCutter(port)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cutter.serve)
            with pytest.raises(ConnectionLost) as lost:
                async with session(cutter.url, alice) as a:
                    cutter.arm()  # the first ack from here on is this change's
                    await a.manage(alice.signing_key, alice.box_key, cid, _collab.rotate)
            assert cutter.cuts == 1
            unacked = lost.value.unacked
            assert unacked is not None
            async with session(relay.url, alice) as a:
                ack, _ = await a.manage(
                    alice.signing_key, alice.box_key, cid, _collab.rotate, resend=unacked
                )
                view = await a.read(cid, alice.box_key)
            nursery.cancel_scope.cancel()
    assert ack.duplicate
    assert ack.event_id == event_id(unacked)
    assert view.membership is not None
    assert view.membership.epoch == 1, "the rotation was applied twice"
    ids = await _stored_ids(ledger, cid)
    assert ids == [ids[0], event_id(unacked)]


async def test_a_stored_addition_resent_after_the_member_rotated_keys_gets_duplicate(
    relay: Relay, ledger: Ledger
) -> None:
    """The relay checks an added member's keys against the directory as it is now; Carol
    rotated hers since the addition was stored, and the retry still learns its seq."""
    alice, carol = [await sign_up(relay.url, h) for h in ("alice", "carol")]
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        view = await a.read(cid, alice.box_key)
        info = await a.lookup(carol.handle)
        new = _collab.member_for(info, Role.MEMBER, MemberKind.HUMAN)
        addition = _collab.proposal(view, alice.signing_key, _collab.add(view, new), TS)
        first = await a.append(addition)
    async with session(relay.url, carol) as c:
        await rotate_directory(c, carol, NewKeys())
    async with session(relay.url, alice) as a:
        again = await a.append(addition)
    assert (again.seq, again.chain, again.duplicate) == (first.seq, first.chain, True)
    assert (await _stored_ids(ledger, cid)).count(event_id(addition)) == 1


async def test_cozy_rotate_and_post_resend_the_same_event_after_a_lost_ack(
    relay: Relay, ledger: Ledger, tmp_path: Path
) -> None:
    """Through the `cozy` command: the ack of `cozy collab rotate`, then of `cozy post`, is cut
    on the way back. Each command resends the same signed event on a new connection, reports
    success, and the collab holds one rotation and one post."""
    cutter = _AckCutter(int(relay.url.rsplit(":", 1)[1]))
    home = tmp_path / "alice"
    env = client_env(home)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(cutter.serve)
            await cli_signup(cutter.url, home, "alice")
            created = await cozy("collab", "create", "plans", env=env)
            cid = created.stdout.decode().strip()
            cutter.arm()
            rotated = await cozy("collab", "rotate", cid, env=env)
            assert cutter.cuts == 1
            assert b"sending the same event again" in rotated.stderr
            assert b"rotated the collab key to epoch 1" in rotated.stdout
            cutter.arm()
            posted = await cozy("post", cid, "said once", env=env)
            assert cutter.cuts == 2
            assert b"(already posted)" in posted.stdout
            nursery.cancel_scope.cancel()
    stored = await trio.to_thread.run_sync(ledger.read_range, cid, 1, 100)
    kinds = [decode_body(e.event.body).kind for e in stored]
    assert kinds.count(contentmod.KIND_MESSAGE) == 1, "the post was stored twice"
    assert kinds.count(KIND_MANAGEMENT) == 2, "the rotation was applied twice"  # genesis + rotation
