"""Re-pinning a member's own keys (`rekey`, ADR-0017) in the pure fold and the reader's view.

A suspected compromise of an account's keys ends with `cozy account rotate-keys`: each collab
gets a `rekey` proof signed by the old pinned key, carrying the new signing key's proof of
possession and rotating the epoch. These tests play the attacker who kept the old keys (or
wants to re-pin someone else) against the fold every relay and client runs.
"""

from __future__ import annotations

import msgspec
import nacl.public
import nacl.signing
import pytest

from clientkit import _collab
from model import content as contentmod
from model._crypto import CryptoError
from model.dm import open_dm
from model.envelope import (
    KIND_DM,
    KIND_MANAGEMENT,
    SignedEvent,
    decode_body,
    open_content,
    seal_event,
    verify_event,
)
from model.epochs import new_epoch_key, open_wrap, wrap_for
from model.errors import BadSignature
from model.membership import (
    MemberKind,
    Proof,
    ProofRejected,
    RekeyMember,
    Role,
    management_event,
    proof_of,
)
from model.proofs import KeyPair, sign_collab_rekey
from model.view import CollabView, ForeignRekeyProven, ViewRejected
from tests.collab_sim import Sim, text_of
from tests.helpers import TS0, Person


class Rotating:
    """A person's rotation: `old_*` are the keys they had, `new_*` the ones they rotate to."""

    def __init__(self, person: Person) -> None:
        self.person = person
        self.old_key, self.old_box = person.key, person.box
        self.new_key = nacl.signing.SigningKey.generate()
        self.new_box = nacl.public.PrivateKey.generate()

    def device_view(self, sim: Sim) -> CollabView:
        """The view of the device that rotated: the new keys, the old box key kept."""
        return CollabView(
            sim.collab_id,
            self.person.id,
            self.new_box,
            past_box_keys=[self.old_box],
            own_sign_pks=[bytes(self.old_key.verify_key), bytes(self.new_key.verify_key)],
        )

    def op(self, sim: Sim) -> RekeyMember:
        view = sim.read(CollabView(sim.collab_id, self.person.id, self.old_box))[0]
        op = _collab.rekey(view, self.new_key, bytes(self.new_box.public_key))
        assert isinstance(op, RekeyMember)
        return op

    def event(
        self, sim: Sim, op: RekeyMember | None = None, *, key: nacl.signing.SigningKey | None = None
    ) -> SignedEvent:
        """The rekey, signed with the old (pinned) key unless `key` says otherwise."""
        op = op or self.op(sim)
        proof = Proof(1, sim.collab_id, self.person.id, sim.head.seq, sim.head.chain, op)
        return management_event(key or self.old_key, proof, ts=TS0)

    def rotate(self, sim: Sim) -> int:
        seq = sim.submit(self.event(sim))
        self.person.key, self.person.box = self.new_key, self.new_box
        return seq


def _team() -> tuple[Sim, Person, Person]:
    alice, bob = Person(), Person()
    sim = Sim(alice)
    sim.add(alice, bob)
    sim.post(alice, "before the rotation")
    return sim, alice, bob


def _signed_with(
    key: nacl.signing.SigningKey, author: Person, sim: Sim, epoch_key: bytes
) -> SignedEvent:
    assert sim.state is not None
    return seal_event(
        signing_key=key,
        collab_key=epoch_key,
        collab_id=sim.collab_id,
        actor_id=author.id,
        kind=contentmod.KIND_MESSAGE,
        ts=TS0,
        content=contentmod.encode_content(contentmod.Message(text="signed with the old key")),
        epoch=sim.state.epoch,
    )


@pytest.mark.objective("SO-3")
@pytest.mark.parametrize("forgery", ["content", "management"])
def test_after_a_rekey_every_reader_refuses_what_the_old_key_signs(forgery: str) -> None:
    sim, alice, bob = _team()
    rot = Rotating(bob)
    at = rot.rotate(sim)
    assert sim.state is not None
    assert sim.state.members[bob.id].sign_pk == bytes(rot.new_key.verify_key)
    assert sim.state.epoch == 1
    sim.post(bob, "with the new key")  # the honest path goes on with the new key
    alice_view, entries = sim.read(sim.view(alice))
    # History before the rekey still verifies, under the key pinned at its position.
    assert [text_of(e) for e in entries if text_of(e)] == [
        "before the rotation",
        "with the new key",
    ]
    assert isinstance(entries[at - 1].proof and entries[at - 1].proof.op, RekeyMember)

    # Whoever kept Bob's old key signs content, or a change (re-pinning Bob to keys of their
    # own), and a lying relay places it after the rekey: every reader's fold refuses it.
    if forgery == "content":
        forged = _signed_with(rot.old_key, bob, sim, alice_view.current_key()[1])
    else:
        thief_key = nacl.signing.SigningKey.generate()
        thief_box = nacl.public.PrivateKey.generate()
        assert sim.state is not None
        old = KeyPair(bytes(rot.new_key.verify_key), bytes(rot.new_box.public_key))
        new = KeyPair(bytes(thief_key.verify_key), bytes(thief_box.public_key))
        readers = [
            msgspec.structs.replace(m, sign_pk=new.sign_pk, box_pk=new.box_pk)
            if m.account_id == bob.id
            else m
            for m in sim.state.readers()
        ]
        op = RekeyMember(
            old_sign_pk=old.sign_pk,  # what the fold pins now: the thief cannot sign for it
            sign_pk=new.sign_pk,
            box_pk=new.box_pk,
            possession=sign_collab_rekey(thief_key, sim.collab_id, bob.id, old, new),
            new_epoch=sim.state.epoch + 1,
            wraps=wrap_for(readers, new_epoch_key()),
        )
        forged = management_event(
            rot.old_key, Proof(1, sim.collab_id, bob.id, sim.head.seq, sim.head.chain, op), ts=TS0
        )
    with pytest.raises(BadSignature):
        sim.submit(forged)  # an honest relay (the same checks) stores neither
    sim.force(forged)
    with pytest.raises(ViewRejected, match="signature"):
        sim.read(sim.view(alice))
    with pytest.raises(ViewRejected, match="signature"):
        sim.read(rot.device_view(sim))


@pytest.mark.objective("SO-2")
def test_after_a_rekey_the_old_box_key_opens_nothing_new() -> None:
    sim, alice, bob = _team()
    sim.dm(alice, bob.as_member(Role.MEMBER), "a DM before the rotation")
    rot = Rotating(bob)
    rot.rotate(sim)
    sim.post(alice, "after the rotation")
    assert sim.state is not None
    sim.dm(alice, sim.state.members[bob.id], "a DM after the rotation")

    # The thief's copy of Bob's old keys reads what was sealed before the rekey; its own fold
    # stops at the rekey (keys it does not hold), so it tries every later event by hand.
    stolen = CollabView(sim.collab_id, bob.id, rot.old_box)
    before: list[str | None] = []
    with pytest.raises(ForeignRekeyProven):
        for seq, signed, chain in sim.events:
            before.append(text_of(stolen.ingest(seq, signed, chain)))
    assert [t for t in before if t] == ["before the rotation", "a DM before the rotation"]
    epoch_keys = stolen.known_keys()
    rekey_at = stolen.head.seq + 1
    opened = 0
    for _seq, signed, _chain in sim.events[rekey_at - 1 :]:
        body = decode_body(signed.body)
        if body.kind == KIND_MANAGEMENT:
            wraps = proof_of(body).op.wraps  # type: ignore[union-attr]
            with pytest.raises(CryptoError):
                open_wrap(wraps, bob.id, rot.old_box)
            continue
        verified = verify_event(signed, sim.state.members[body.actor_id].sign_pk, decoded=body)
        for key in epoch_keys.values():
            with pytest.raises(CryptoError):
                open_content(verified, key)
        if body.kind == KIND_DM:
            with pytest.raises(CryptoError):
                open_dm(verified, rot.old_box, bytes(alice.box.public_key))
        opened += 1
    assert opened == 2  # the post and the DM after the rotation were both tried

    # Bob's device, holding the old box key among its past keys, reads the whole history.
    mine = [text_of(e) for e in sim.read(rot.device_view(sim))[1] if text_of(e)]
    assert mine == [
        "before the rotation",
        "a DM before the rotation",
        "after the rotation",
        "a DM after the rotation",
    ]


@pytest.mark.objective("SO-5")
@pytest.mark.parametrize(
    "how", ["possession-by-old-key", "possession-by-stranger", "possession-for-other-collab",
            "possession-for-other-keys", "no-rotation", "same-keys", "wrong-old-key"]
)  # fmt: skip
def test_a_rekey_without_possession_of_the_new_key_or_with_bad_parts_is_refused(how: str) -> None:
    sim, _alice, bob = _team()
    rot = Rotating(bob)
    good = rot.op(sim)
    old = KeyPair(bytes(rot.old_key.verify_key), bytes(rot.old_box.public_key))
    new = KeyPair(good.sign_pk, good.box_pk)
    stranger = nacl.signing.SigningKey.generate()
    match how:
        case "possession-by-old-key":
            op = msgspec.structs.replace(
                good, possession=sign_collab_rekey(rot.old_key, sim.collab_id, bob.id, old, new)
            )
        case "possession-by-stranger":  # someone else's key pinned as Bob's, signed by them
            op = msgspec.structs.replace(
                good,
                sign_pk=bytes(stranger.verify_key),
                possession=sign_collab_rekey(rot.new_key, sim.collab_id, bob.id, old, new),
            )
        case "possession-for-other-collab":
            op = msgspec.structs.replace(
                good,
                possession=sign_collab_rekey(rot.new_key, Sim(bob).collab_id, bob.id, old, new),
            )
        case "possession-for-other-keys":  # a possession proof for another box key
            other = KeyPair(new.sign_pk, bytes(nacl.public.PrivateKey.generate().public_key))
            op = msgspec.structs.replace(
                good, possession=sign_collab_rekey(rot.new_key, sim.collab_id, bob.id, old, other)
            )
        case "no-rotation":
            assert sim.state is not None
            op = msgspec.structs.replace(good, new_epoch=sim.state.epoch)
        case "same-keys":
            op = msgspec.structs.replace(
                good,
                sign_pk=old.sign_pk,
                box_pk=old.box_pk,
                possession=sign_collab_rekey(rot.old_key, sim.collab_id, bob.id, old, old),
            )
        case "wrong-old-key":
            op = msgspec.structs.replace(good, old_sign_pk=new.sign_pk)
        case _:
            raise AssertionError(how)
    with pytest.raises(ProofRejected):
        sim.submit(rot.event(sim, op))
    sim.submit(rot.event(sim, good))  # the well-made rekey goes through


@pytest.mark.objective("SO-5")
@pytest.mark.parametrize("who", ["owner-signs-as-bob", "owner-repins-bob", "agent", "stranger"])
def test_nobody_rekeys_someone_else_and_agents_cannot_rekey(who: str) -> None:
    sim, alice, bob = _team()
    bot = Person(MemberKind.AGENT)
    sim.add(alice, bot)
    rot = Rotating(bob)
    match who:
        case "owner-signs-as-bob":  # Bob's rekey, signed by the owner's key: not Bob's key
            forged = rot.event(sim, key=alice.key)
        case "owner-repins-bob":  # the owner's own rekey naming Bob's key as the old one
            mine = Rotating(alice)
            op = msgspec.structs.replace(mine.op(sim), old_sign_pk=bytes(rot.old_key.verify_key))
            forged = mine.event(sim, op)
        case "agent":  # an agent rotating its own keys has no management surface
            forged = Rotating(bot).event(sim)
        case "stranger":
            outsider = Rotating(Person())
            forged = outsider.event(sim, msgspec.structs.replace(rot.op(sim)), key=outsider.old_key)
        case _:
            raise AssertionError(who)
    # Each forgery is refused for its own reason (a union of refusals would also pass a
    # forgery that broke for an unrelated one, say a malformed change).
    refused, reason = {
        "owner-signs-as-bob": (BadSignature, "does not verify for the claimed author"),
        "owner-repins-bob": (ProofRejected, "rekey_old_key"),
        "agent": (ProofRejected, "agent_signer"),
        "stranger": (ProofRejected, "not_a_member"),
    }[who]
    with pytest.raises((ProofRejected, BadSignature)) as at_the_relay:
        sim.submit(forged)
    assert isinstance(at_the_relay.value, refused), repr(at_the_relay.value)
    assert reason in str(at_the_relay.value)
    sim.force(forged)
    with pytest.raises(ViewRejected, match=reason):
        sim.read(sim.view(alice))


@pytest.mark.objective("SO-5")
def test_a_rekey_of_ones_own_account_made_by_someone_else_raises_the_alarm() -> None:
    """The residual race: a thief with Bob's old key re-pins Bob to the thief's keys first.
    The fold accepts it (the old key is the authority), other members cannot tell — and Bob's
    own client, which never made those keys, raises `ForeignRekeyProven`."""
    sim, alice, bob = _team()
    thief = Rotating(bob)
    thief.old_key, thief.old_box = bob.key, bob.box
    sim.submit(thief.event(sim))
    sim.read(sim.view(alice))  # Alice's fold takes it: it is signed by Bob's pinned key
    with pytest.raises(ForeignRekeyProven, match="took the account over"):
        sim.read(
            CollabView(sim.collab_id, bob.id, bob.box, own_sign_pks=[bytes(bob.key.verify_key)])
        )
    # Bob's own rotation raises nothing on his device.
    sim2, _alice2, bob2 = _team()
    rot = Rotating(bob2)
    rot.rotate(sim2)
    sim2.read(rot.device_view(sim2))
