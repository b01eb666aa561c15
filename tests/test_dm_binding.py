"""ADR-0023: a direct message is bound to its collab, epoch and time, and has one member as its
recipient.

- A relay that moves Alice's signed DM to Bob — into another collab they share, to a later
  position, or past a key rotation — is caught by Bob's real client kit over a real WebSocket.
- Even an outer event re-signed with Alice's own key around the same sealed box (the strongest
  mover: one who can sign as the sender) does not open for Bob once the collab, epoch or time
  differs from what the box was sealed for: the routing fields are sealed inside it.
- The relay's sequencer refuses a DM with no recipient, several, or one who is not a member
  (never one, removed, or an unknown id), and stores nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import pytest
import trio

from clientkit import IntegrityAlarm, RelayRefused, ReplayDetected, TamperDetected, _collab, connect
from model import content as contentmod
from model import wire
from model.dm import seal_dm
from model.envelope import (
    DM_VERSION,
    EVENT_VERSION,
    SignedEvent,
    audience_of,
    decode_body,
    event_id,
    sign_body,
    verify_event,
)
from model.errors import ModelError
from model.ids import new_id
from tests.collab_sim import Sim
from tests.evil_relay import EvilRelay
from tests.helpers import TS0, Person
from tests.relay_harness import session, sign_up
from tests.test_membership_relay import add

if TYPE_CHECKING:
    from ledger import Ledger
    from model.view import Entry
    from relay._server import Relay

SECRET = "the code is 4711"


def _dm(sim: Sim, sender: Person, recipient: Person, text: str, *, ts: int) -> SignedEvent:
    assert sim.state is not None
    return seal_dm(
        signing_key=sender.key,
        sender_box_key=sender.box,
        recipient_box_pk=bytes(recipient.box.public_key),
        collab_id=sim.collab_id,
        sender_id=sender.id,
        recipient_id=recipient.id,
        ts=ts,
        epoch=sim.state.epoch,
        content=contentmod.encode_content(contentmod.Message(text)),
    )


def _resigned(signer: Person, dm: SignedEvent, **routing: object) -> SignedEvent:
    """The same sealed box under an outer body with other routing fields, validly signed."""
    return sign_body(signer.key, msgspec.structs.replace(decode_body(dm.body), **routing))


async def _bob_reads(sim: Sim, bob: Person) -> tuple[list[Entry], IntegrityAlarm | None]:
    """What Bob's real client kit makes of the history the (lying) relay serves."""
    entries: list[Entry] = []
    alarm: IntegrityAlarm | None = None
    evil = EvilRelay(sim.collab_id, sim.events)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(evil.serve)
        async with connect(url) as client:
            await client.authenticate(bob.id)
            with trio.fail_after(10):
                try:
                    async with client.history(sim.collab_id, bob.box) as events:
                        entries.extend([e async for e in events])
                except IntegrityAlarm as exc:
                    alarm = exc
        nursery.cancel_scope.cancel()
    return entries, alarm


MOVES = ["another-collab", "later", "past-a-rotation"]
RESIGNED = ["collab", "epoch", "ts"]


def _pair() -> tuple[Person, Person, Sim, Sim]:
    """Alice and Bob, members of two collabs: A (with Carol too) and B."""
    alice, bob, carol = Person(), Person(), Person()
    a, b = Sim(alice), Sim(alice)
    for sim in (a, b):
        sim.add(alice, bob)
    a.add(alice, carol)
    return alice, bob, a, b


@pytest.mark.objective("ADR-0023")
@pytest.mark.parametrize("move", MOVES)
async def test_a_dm_the_relay_moves_is_refused_by_the_recipients_client(move: str) -> None:
    alice, bob, a, b = _pair()
    dm = _dm(a, alice, bob, SECRET, ts=TS0 + 1)
    if move == "another-collab":  # Alice's genuine DM of collab A, served in collab B
        target = b
    elif move == "later":  # delivered in A, then again later, as if sent again
        a.submit(dm)
        a.post(alice, "in between")
        target = a
    else:  # held back by the relay and sequenced after a rotation, in epoch 1
        a.change(alice, _collab.rotate)
        target = a
    at = target.force(dm)
    entries, alarm = await _bob_reads(target, bob)
    assert alarm is not None, f"{move}: Bob's client took the moved DM"
    expected = ReplayDetected if move == "later" else TamperDetected
    assert isinstance(alarm, expected), repr(alarm)
    assert alarm.seq == at
    assert all(e.seq < at for e in entries)


@pytest.mark.objective("ADR-0023")
@pytest.mark.parametrize("field", RESIGNED)
async def test_a_dm_re_signed_into_another_collab_epoch_or_time_does_not_open(field: str) -> None:
    alice, bob, a, b = _pair()
    dm = _dm(a, alice, bob, SECRET, ts=TS0 + 1)
    honest = a.submit(dm)  # the original opens (the control)
    target = a
    if field == "collab":
        target = b
        moved = _resigned(alice, dm, collab_id=b.collab_id)
    elif field == "epoch":
        a.change(alice, _collab.rotate)
        moved = _resigned(alice, dm, epoch=1)
    else:
        moved = _resigned(alice, dm, ts=TS0 + 3_600_000)
    at = target.submit(moved)  # an honest relay takes it: only the participants can tell
    entries, alarm = await _bob_reads(target, bob)
    assert alarm is None
    read = {e.seq: e for e in entries}
    if target is a:
        original = read[honest].content
        assert isinstance(original, contentmod.Message)
        assert original.text == SECRET
    assert read[at].content is None, f"the DM opened with its {field} changed"
    assert "does not open" in read[at].unreadable


@pytest.mark.objective("ADR-0023")
async def test_the_sequencer_refuses_a_dm_without_exactly_one_member_recipient(
    relay: Relay, ledger: Ledger
) -> None:
    alice, bob, carol, dave, stranger = [
        await sign_up(relay.url, h) for h in ("alice", "bob", "carol", "dave", "stranger")
    ]
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        for user in (bob, carol, dave):
            await add(a, alice, user)
        await a.manage(
            alice.signing_key, alice.box_key, cid, lambda v: _collab.remove(v, dave.account_id)
        )
        view = await a.read(cid, alice.box_key)
        assert view.membership is not None
        to_bob = seal_dm(signing_key=alice.signing_key, sender_box_key=alice.box_key,
                         recipient_box_pk=view.membership.members[bob.account_id].box_pk,
                         collab_id=cid, sender_id=alice.account_id, recipient_id=bob.account_id,
                         ts=TS0, epoch=view.membership.epoch,
                         content=contentmod.encode_content(contentmod.Message("psst")))  # fmt: skip
        body = decode_body(to_bob.body)
        recipients = {
            "nobody": (),
            "two members": (bob.account_id, carol.account_id),
            "the same member twice": (bob.account_id, bob.account_id),
            "a stranger": (stranger.account_id,),
            "a removed member": (dave.account_id,),
            "an unknown id": (new_id("a"),),
        }
        head = view.head.seq
        for what, refs in recipients.items():
            forged = sign_body(alice.signing_key, msgspec.structs.replace(body, refs=refs))
            with pytest.raises(RelayRefused) as refused:
                await a.append(forged)
            assert refused.value.code is wire.ErrorCode.INVALID_EVENT, what
            assert "exactly one recipient" in refused.value.message, what
        stored = await trio.to_thread.run_sync(ledger.read_range, cid, head + 1, 100)
        assert stored == [], "a refused DM was stored"
        ack = await a.append(to_bob)  # the control: to one member, accepted
        assert ack.seq == head + 1


@pytest.mark.objective("ADR-0023")
def test_a_dm_signed_over_its_header_still_covers_every_byte_of_its_body() -> None:
    """A version-2 DM's author signs its header, not its bytes: the header's commitment must
    bind time, nonce and sealed box, and the header the rest, so no byte can change."""
    alice, bob = Person(), Person()
    sim = Sim(alice)
    sim.add(alice, bob)
    dm = _dm(sim, alice, bob, SECRET, ts=TS0)
    pk = bytes(alice.key.verify_key)
    assert verify_event(dm, pk).event_id == event_id(dm)  # the header rule, both ways
    for i in range(len(dm.body)):
        body = bytearray(dm.body)
        body[i] ^= 0x01
        with pytest.raises(ModelError):
            verify_event(SignedEvent(bytes(body), dm.sig), pk)


@pytest.mark.objective("ADR-0023")
def test_a_version_1_dm_goes_whole_to_everyone_and_only_a_version_2_dm_is_withheld() -> None:
    """A DM stored before signed links has no header signature: withholding it from the
    others would leave them a link they cannot check, so the relay sends it whole."""
    alice, bob = Person(), Person()
    sim = Sim(alice)
    sim.add(alice, bob)
    new = decode_body(_dm(sim, alice, bob, SECRET, ts=TS0).body)
    assert new.v == DM_VERSION
    assert audience_of(new) == (alice.id, bob.id)
    old = msgspec.structs.replace(new, v=EVENT_VERSION)
    assert audience_of(old) == ()
    legacy = sign_body(alice.key, old)  # the version-1 rule: signed over the body bytes
    assert verify_event(legacy, bytes(alice.key.verify_key)).body.v == EVENT_VERSION
