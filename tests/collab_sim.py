"""A collab's ledger simulated in memory with real keys, real proofs and a real chain.

`Sim` plays an *honest* relay: it appends an event only when the shared fold accepts it at the
head (as the sequencer does), assigns seqs and chain hashes, and keeps every event so any
number of `CollabView`s can read it. Tests that need a lying relay take these events and
tamper with them, or call `force` to append what an honest relay would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import nacl.signing

from clientkit import _collab
from model import content as contentmod
from model.admission import Refused, admit
from model.chain import Head, next_head, start_of
from model.dm import seal_dm
from model.envelope import (
    KIND_MANAGEMENT,
    SignedEvent,
    decode_body,
    event_id,
    seal_event,
    verify_event,
)
from model.epochs import new_epoch_key, wrap_for
from model.ids import new_id
from model.membership import (
    AddMember,
    Member,
    MemberKind,
    Membership,
    Proof,
    ProofRejected,
    RemoveMember,
    Role,
    apply,
    management_event,
    proof_of,
    signer_key,
)
from model.view import CollabView, Entry
from tests.helpers import TS0, Person


@dataclass
class Sim:
    owner: Person
    collab_id: str = field(default_factory=lambda: new_id("c"))
    events: list[tuple[int, SignedEvent, bytes]] = field(default_factory=list)
    head: Head = field(init=False)
    state: Membership | None = None
    keys: dict[int, bytes] = field(default_factory=dict)  # what members hold, for sealing

    def __post_init__(self) -> None:
        self.head = start_of(self.collab_id)
        genesis, key = _collab.genesis(
            self.owner.key, self.owner.id, bytes(self.owner.box.public_key), self.collab_id, TS0
        )
        self.keys[0] = key
        self.submit(genesis)

    # --- the honest relay ------------------------------------------------------------------

    def submit(self, signed: SignedEvent) -> int:
        """Append if an honest relay would; raise `ProofRejected`/`ValueError`/`BadSignature`
        otherwise (signatures are checked against the keys the fold pins)."""
        body = decode_body(signed.body)
        if self.state is None:
            proof = proof_of(body)
            verify_event(signed, signer_key(None, proof), decoded=body)
            self.state = apply(None, proof, self.head, actor_id=body.actor_id)
            return self.force(signed)
        author = self.state.members.get(body.actor_id)
        pinned = b"" if author is None else author.sign_pk
        if body.kind == KIND_MANAGEMENT and author is not None:
            verify_event(signed, pinned, decoded=body)
        # The sequencer's own rules (model/admission.py), with the session's key being the one
        # the fold pins, as it is for an honest author.
        decision = admit(self.state, self.head, body, pinned)
        if isinstance(decision, Refused):
            if body.kind == KIND_MANAGEMENT:
                raise ProofRejected(decision.rule, decision.message)
            raise ValueError(f"an honest relay refuses this event: {decision.message}")
        if body.kind != KIND_MANAGEMENT:
            verify_event(signed, pinned, decoded=body)
        self.state = decision.membership
        return self.force(signed)

    def force(self, signed: SignedEvent) -> int:
        """Append without any check — what a lying relay can do."""
        seq = self.head.seq + 1
        chain = next_head(self.head.chain, event_id(signed))
        self.events.append((seq, signed, chain))
        self.head = Head(seq, chain)
        return seq

    # --- members' actions --------------------------------------------------------------------

    def view(self, person: Person) -> CollabView:
        return CollabView(self.collab_id, person.id, person.box)

    def change(self, signer: Person, build: object) -> int:
        """`build(view) -> Operation`, made by `signer` against their own verified view."""
        view = self.read(self.view(signer))[0]
        op = build(view)  # type: ignore[operator]
        signed = _collab.proposal(view, signer.key, op, TS0 + len(self.events))
        return self.submit(signed)

    def add(self, signer: Person, person: Person, role: Role = Role.MEMBER) -> int:
        member = person.as_member(role)
        return self.change(signer, lambda v: _collab.add(v, member))

    def remove(self, signer: Person, person: Person) -> int:
        return self.change(signer, lambda v: _collab.remove(v, person.id))

    def post(self, author: Person, text: str, *, lag: int = 0) -> int:
        """`author` posts having seen the history only up to `lag` events ago (it wrote
        concurrently with them); it always knows its own stream."""
        view = self.read(self.view(author))[0]
        epoch, key = view.current_key()
        evidence = view.evidence("sim", TS0 + len(self.events))
        seen = max(self.head.seq - lag, 0)
        chain = view.chain_at(seen)
        assert chain is not None
        evidence = msgspec.structs.replace(evidence, seen_seq=seen, seen_chain=chain)
        return self.submit(
            seal_event(
                signing_key=author.key,
                collab_key=key,
                collab_id=self.collab_id,
                actor_id=author.id,
                kind="msg",
                ts=TS0 + len(self.events),
                content=contentmod.encode_content(contentmod.Message(text=text), evidence),
                epoch=epoch,
            )
        )

    def dm(self, sender: Person, recipient: Member, text: str) -> int:
        assert self.state is not None
        return self.submit(
            seal_dm(
                signing_key=sender.key,
                sender_box_key=sender.box,
                recipient_box_pk=recipient.box_pk,
                collab_id=self.collab_id,
                sender_id=sender.id,
                recipient_id=recipient.account_id,
                ts=TS0 + len(self.events),
                epoch=self.state.epoch,
                content=contentmod.encode_content(contentmod.Message(text=text)),
            )
        )

    # --- reading -----------------------------------------------------------------------------

    def read(self, view: CollabView) -> tuple[CollabView, list[Entry]]:
        """Feed `view` every event it has not seen yet (everything, as a leaky relay would)."""
        entries = [
            view.ingest(seq, signed, chain) for seq, signed, chain in self.events[view.head.seq :]
        ]
        return view, entries


def text_of(entry: Entry) -> str | None:
    return entry.content.text if isinstance(entry.content, contentmod.Message) else None


# --- what a lying relay can append ----------------------------------------------------------------


def _forge(sim: Sim, alice: Person, bob: Person, bot: Person, mallory: Person, how: str) -> None:
    """Append one event an honest relay would refuse."""
    assert sim.state is not None
    head = sim.head
    key = sim.keys[0]
    newcomer = mallory.as_member(Role.OWNER)
    add_mallory = AddMember(newcomer, wrap_for([newcomer], new_epoch_key()))

    def proof(signer: Person, op: object, at: Head = head, collab: str = sim.collab_id) -> Proof:
        return Proof(1, collab, signer.id, at.seq, at.chain, op)  # type: ignore[arg-type]

    relay_key = nacl.signing.SigningKey.generate()
    match how:
        case "relay-minted":  # the relay signs a proof in Alice's name with its own key
            sim.force(management_event(relay_key, proof(alice, add_mallory), ts=TS0))
        case "agent-signed":
            sim.force(management_event(bot.key, proof(bot, add_mallory), ts=TS0))
        case "non-member":
            sim.force(management_event(mallory.key, proof(mallory, add_mallory), ts=TS0))
        case "member-without-role":
            sim.force(management_event(bob.key, proof(bob, add_mallory), ts=TS0))
        case "stale":  # a real proof of Alice's, made against an earlier head, replayed now
            earlier = Head(head.seq - 1, sim.events[head.seq - 2][2])
            sim.force(management_event(alice.key, proof(alice, add_mallory, earlier), ts=TS0))
        case "other-collab":  # Alice's real proof from another collab of hers
            other = Sim(alice)
            sim.force(
                management_event(
                    alice.key, proof(alice, add_mallory, collab=other.collab_id), ts=TS0
                )
            )
        case "leaky-removal":  # removes bob but still wraps the next key for him
            readers = sim.state.readers()
            op = RemoveMember(bob.id, sim.state.epoch + 1, wrap_for(readers, new_epoch_key()))
            sim.force(management_event(alice.key, proof(alice, op), ts=TS0))
        case "content-from-stranger":
            sim.force(_msg(mallory, sim, key, 0))
        case "content-old-epoch":  # bob posts under epoch 0 after a rotation to epoch 1
            sim.change(alice, _collab.rotate)
            sim.force(_msg(bob, sim, key, 0))
        case _:
            raise AssertionError(how)


def _msg(author: Person, sim: Sim, key: bytes, epoch: int) -> SignedEvent:
    return seal_event(
        signing_key=author.key,
        collab_key=key,
        collab_id=sim.collab_id,
        actor_id=author.id,
        kind="msg",
        ts=TS0,
        content=b"\x81\xa1t\xa3msg",
        epoch=epoch,
    )


FORGERIES = [
    "relay-minted",
    "agent-signed",
    "non-member",
    "member-without-role",
    "stale",
    "other-collab",
    "leaky-removal",
    "content-from-stranger",
    "content-old-epoch",
]


def forged_collab(how: str) -> tuple[Sim, tuple[Person, Person, Person, Person]]:
    """Alice (owner), Bob (member), a bot (agent member) and Mallory (stranger) in a collab
    whose last event is the forgery `how`."""
    alice, bob, bot, mallory = Person(), Person(), Person(MemberKind.AGENT), Person()
    sim = Sim(alice)
    sim.add(alice, bob)
    sim.add(alice, bot)
    sim.post(alice, "before")
    _forge(sim, alice, bob, bot, mallory, how)
    return sim, (alice, bob, bot, mallory)
