"""Key epochs (SO-7) and direct messages (SO-1): who can open what, at the crypto layer."""

from __future__ import annotations

import msgspec
import nacl.signing
import pytest

from model._crypto import CryptoError
from model.chain import Head, next_head, start_of
from model.dm import open_dm, seal_dm
from model.epochs import (
    NotARecipient,
    WrapsRejected,
    new_epoch_key,
    open_epoch_key,
    wrap_epoch_key,
)
from model.ids import new_id
from model.membership import AddMember, Membership, Operation, RemoveMember, Role, apply, genesis
from tests.helpers import Person

COLLAB = new_id("c")


class Team:
    """Alice (owner), Bob (manager), Carol (member) in one collab, folded from real proofs."""

    def __init__(self) -> None:
        self.alice, self.bob, self.carol = Person(), Person(), Person()
        self.state: Membership = genesis(COLLAB, self.alice.as_member(Role.OWNER))
        self.head = start_of(COLLAB)
        self.change(self.alice, AddMember(self.bob.as_member(Role.MANAGER)))
        self.change(self.alice, AddMember(self.carol.as_member(Role.MEMBER)))

    def change(self, signer: Person, op: Operation) -> None:
        self.state = apply(self.state, signer.propose(op, self.head, COLLAB), self.head)
        self.head = Head(self.head.seq + 1, next_head(self.head.chain, bytes([self.head.seq]) * 32))


@pytest.mark.objective("SO-7")
def test_every_member_opens_the_epoch_key_and_a_removed_member_cannot() -> None:
    team = Team()
    key0 = new_epoch_key()
    wraps0 = wrap_epoch_key(team.alice.key, team.alice.id, team.state, key0)
    for p in (team.alice, team.bob, team.carol):
        assert open_epoch_key(wraps0, team.state, p.id, p.box) == key0
    team.change(team.bob, RemoveMember(team.carol.id, team.state.epoch + 1))
    key1 = new_epoch_key()
    wraps1 = wrap_epoch_key(team.bob.key, team.bob.id, team.state, key1)
    assert set(wraps1.wraps) == {team.alice.id, team.bob.id}
    assert open_epoch_key(wraps1, team.state, team.alice.id, team.alice.box) == key1
    with pytest.raises(NotARecipient):
        open_epoch_key(wraps1, team.state, team.carol.id, team.carol.box)
    # Even holding someone else's wrap, Carol's key cannot open it.
    with pytest.raises(CryptoError):
        open_epoch_key(wraps1, team.state, team.alice.id, team.carol.box)


@pytest.mark.objective("SO-7")
def test_the_relay_cannot_readdress_replay_or_forge_wraps() -> None:
    team = Team()
    wraps = wrap_epoch_key(team.alice.key, team.alice.id, team.state, new_epoch_key())
    # An extra recipient (say, a relay-controlled key) breaks the signature and the exact set.
    eve = Person()
    sneaky = msgspec.structs.replace(wraps, wraps={**wraps.wraps, eve.id: b"x" * 80})
    with pytest.raises(WrapsRejected):
        open_epoch_key(sneaky, team.state, team.alice.id, team.alice.box)
    # Moved to another collab or a later epoch.
    for moved in (
        msgspec.structs.replace(wraps, collab_id=new_id("c")),
        msgspec.structs.replace(wraps, epoch=wraps.epoch + 1),
    ):
        with pytest.raises(WrapsRejected):
            open_epoch_key(moved, team.state, team.alice.id, team.alice.box)
    # Signed by a plain member, or by a key the relay made up.
    by_member = wrap_epoch_key(team.carol.key, team.carol.id, team.state, new_epoch_key())
    with pytest.raises(WrapsRejected, match="owner or manager"):
        open_epoch_key(by_member, team.state, team.bob.id, team.bob.box)
    forged = wrap_epoch_key(
        nacl.signing.SigningKey.generate(), team.alice.id, team.state, new_epoch_key()
    )
    with pytest.raises(WrapsRejected, match="signature"):
        open_epoch_key(forged, team.state, team.bob.id, team.bob.box)


@pytest.mark.objective("SO-1")
def test_a_dm_opens_for_its_two_participants_only() -> None:
    team = Team()
    context = {
        "collab_id": COLLAB,
        "sender_id": team.alice.id,
        "recipient_id": team.bob.id,
        "ts": 1,
    }
    sealed = seal_dm(
        team.alice.box, bytes(team.bob.box.public_key), content=b"just us two", **context
    )
    assert b"just us two" not in sealed
    assert (
        open_dm(team.bob.box, bytes(team.alice.box.public_key), sealed, **context) == b"just us two"
    )
    assert (
        open_dm(team.alice.box, bytes(team.bob.box.public_key), sealed, **context) == b"just us two"
    )
    # Carol, a member of the same collab, fails at the crypto layer with either partner's key.
    for partner in (team.alice, team.bob):
        with pytest.raises(CryptoError):
            open_dm(team.carol.box, bytes(partner.box.public_key), sealed, **context)
    # Re-addressed by the relay to another pair, collab or time: refused.
    for field, value in (("recipient_id", team.carol.id), ("collab_id", new_id("c")), ("ts", 2)):
        with pytest.raises(CryptoError):
            open_dm(
                team.bob.box, bytes(team.alice.box.public_key), sealed, **(context | {field: value})
            )
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(CryptoError):
        open_dm(team.bob.box, bytes(team.alice.box.public_key), tampered, **context)
