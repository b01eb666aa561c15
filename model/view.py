"""A client's own verified view of one collab: the fold every reader runs (SO-1, SO-5, SO-7).

Pure and I/O-free, so the client kit, tests and an evil-relay harness drive the same code. The
view starts at the collab's genesis and takes events in seq order. For each it checks, before
anything else reads it:

- the chain: seq is the next one and the chain hash extends the head verified so far;
- the author's signature, with the key *pinned by the membership fold* (the genesis proof for
  the owner, the `add` proof for everyone else) — never a key the relay's directory serves;
- for `mgmt` events, that the proof is acceptable at exactly this position (model/membership.py);
- for content, that the author is a member at this position and sealed it under the epoch the
  membership is in at this position.

An account whose keys were rotated (`rekey`, ADR-0017) reads each position with the box key the
fold pinned for it there, so a view is given the account's past box keys too. A `rekey` of this
account to keys this device does not hold is `ForeignRekeyProven`: someone with the old key
re-pinned the account, and the owner must hear of it.

It then decrypts what this account may read: content with the key of its epoch (opened from the
wraps addressed to this account), a DM only as one of its two participants. Anything that does
not verify raises `ViewRejected` (or `ChainMismatch`) and the view stops: that is the relay
lying. Content this account is not meant to read (an epoch before it joined, after it was
removed, a DM between others) — or that its signing author garbled — comes back as an `Entry`
with `unreadable` saying why, and the fold goes on.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import msgspec

from model import content as contentmod
from model._crypto import CryptoError
from model.chain import Head, advance, start_of
from model.dm import open_dm
from model.envelope import (
    KIND_DM,
    KIND_MANAGEMENT,
    DmHeader,
    Prechecked,
    SignedEvent,
    VerifiedEvent,
    decode_body,
    event_id,
    open_content,
    verify_dm_link,
    verify_event,
)
from model.epochs import NotARecipient, open_wrap
from model.errors import ModelError
from model.membership import (
    CAP_POST,
    AddMember,
    CreateCollab,
    Membership,
    Proof,
    RekeyMember,
    RemoveMember,
    RotateKey,
    apply,
    proof_of,
    signer_key,
)
from model.merkle import CompactRange, leaf_hash
from model.viewsnap import Snapshot, open_snapshot, seal_snapshot

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import nacl.public


# A member signed content that does not open with the key it names. The signature rules out the
# relay (it cannot sign for a member), so this is the author's doing: shown, not alarmed on, so
# one member cannot halt everyone's history.
_GARBLED = "its author sealed content that does not open (blame the author, not the relay)"


class ViewRejected(ModelError):
    """The relay delivered something that does not verify against this client's own fold."""


class ReplayProven(ViewRejected):
    """An event this history already holds was delivered again at a new position."""


class ReorderProven(ViewRejected):
    """An event arrived before something its author had already seen, or an author's events
    arrived out of the order the author wrote them in."""


class WithholdingProven(ViewRejected):
    """An author's event chain skips events this history never delivered."""


class ForkProven(ViewRejected):
    """An author saw a different history than this one: the relay showed members different
    histories (or rewrote this one)."""


class ForeignRekeyProven(ViewRejected):
    """A `rekey` signed with this account's own pinned key re-pinned it to keys this device
    does not hold: whoever holds the account's old key took the account over in this collab."""


class Entry(msgspec.Struct, frozen=True):
    """One verified position of the collab, as this account sees it."""

    seq: int
    event_id: bytes
    chain: bytes
    author_id: str = ""
    kind: str = ""
    ts: int = 0
    epoch: int = 0
    content: contentmod.Content | None = None
    proof: Proof | None = None
    dm_to: str = ""  # a DM's recipient
    unreadable: str = ""  # why this account cannot read it, when it cannot

    def __repr__(self) -> str:
        return f"Entry(seq={self.seq}, kind={self.kind!r}, author={self.author_id!r})"


class CollabView:
    """Feed it every event of one collab from seq 1; it keeps membership, keys and the head."""

    def __init__(
        self,
        collab_id: str,
        account_id: str,
        box_key: nacl.public.PrivateKey,
        keys: Mapping[int, bytes] | None = None,
        *,
        past_box_keys: Iterable[nacl.public.PrivateKey] = (),
        own_sign_pks: Iterable[bytes] = (),
        hold: bool = False,
    ) -> None:
        """`keys` are epoch keys an earlier fold of this collab by this account opened: a
        member added mid-epoch receives that epoch's key with the addition, so a second pass
        primed with it reads the epoch's earlier events too.

        `hold` reads them in one pass instead: content of the current epoch that this account
        holds no key for yet is held back (with everything after it) until the epoch's key
        arrives (then it opens, as a primed pass would have opened it), the epoch changes, or
        the reader calls `settle` (then it is unreadable, as in a primed pass that ended
        there). Take the entries that are final with `drain`; `settled_head` is the last
        position before anything held.

        `past_box_keys` are this account's box keys from before its key rotations (each
        position is read with the box key pinned there). `own_sign_pks` are every signing
        public key this account has had on this device; when given, a `rekey` of this account
        to a signing key outside it is `ForeignRekeyProven` (the box key is always checked).
        """
        self.collab_id = collab_id
        self.account_id = account_id
        self._box_key = box_key
        self._box_keys = {bytes(k.public_key): k for k in (*past_box_keys, box_key)}
        self._own_sign_pks = frozenset(own_sign_pks)
        self.head: Head = start_of(collab_id)
        self.membership: Membership | None = None
        self._keys: dict[int, bytes] = dict(keys or {})
        self._bad_wraps: set[int] = set()
        self._joined = False  # this account has been a member at some position
        self._chains: list[bytes] = [self.head.chain]  # chain hash after each seq, from 0
        self._ids: set[bytes] = set()
        # ADR-0020's tree over the event ids taken: a signed head of this size must have its root.
        self._tree = CompactRange()
        # (author, device) -> (counter, event id) of the last readable event of that stream
        self._streams: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._whole = True  # every content event so far was readable to this account
        self._hold = hold
        self._queue: collections.deque[Entry] = collections.deque()  # for `drain`, in order
        # seq -> (the event, why it is unreadable if its key never comes), for `hold`; all of
        # one epoch, `_held_epoch`.
        self._held: dict[int, tuple[VerifiedEvent, str]] = {}
        self._held_epoch = -1

    @property
    def is_member(self) -> bool:
        return self.membership is not None and self.account_id in self.membership.members

    def current_key(self) -> tuple[int, bytes]:
        """(epoch, key) to seal new content under. Raises `NotARecipient` if this account
        holds no key for the current epoch (it is not a member)."""
        if self.membership is None or not self.is_member:
            raise NotARecipient("this account is not a member of the collab")
        key = self._keys.get(self.membership.epoch)
        if key is None:
            raise NotARecipient("this account holds no key for the collab's current epoch")
        return self.membership.epoch, key

    def key_for(self, epoch: int) -> bytes | None:
        return self._keys.get(epoch)

    def evidence(self, device: str, clock: int) -> contentmod.Evidence:
        """The evidence for this account's next event from `device`, made at this view's head.

        Seal and send one event at a time per device (or re-read after each ack): the next
        counter follows the last event of the stream *this view has seen*."""
        counter, last = self._streams.get((self.account_id, device), (0, b""))
        return contentmod.Evidence(device, counter + 1, last, self.head.seq, self.head.chain, clock)

    def chain_at(self, seq: int) -> bytes | None:
        """The chain hash this view verified at `seq` (None beyond the head)."""
        return self._chains[seq] if 0 <= seq < len(self._chains) else None

    def tree_root(self) -> bytes:
        """The root over the ids of seqs 1…head: a relay's checkpoint of that size must say it."""
        return self._tree.root()

    def known_keys(self) -> dict[int, bytes]:
        """The epoch keys this fold opened (to prime a later pass; never log them)."""
        return dict(self._keys)

    # --- snapshots: this device's own verified fold, kept so a later read resumes at its head

    def seal(self) -> bytes | None:
        """This fold at its head, sealed (XChaCha20-Poly1305) under a key derived from this
        account's box key, bound to the collab, the account and the head; None while content
        is held (only a settled fold is kept). Keep it beside the verified head it was made at:
        `resume` opens it only for that head (or one before it on the saved head's path)."""
        if self._held:
            return None
        snap = Snapshot(
            self.collab_id,
            self.account_id,
            self.head.seq,
            self.head.chain,
            self.membership,
            self._keys,
            sorted(self._bad_wraps),
            self._joined,
            self._chains,
            list(self._ids),
            [(a, d, n, e) for (a, d), (n, e) in self._streams.items()],
            self._whole,
            list(self._tree.nodes),
        )
        return seal_snapshot(snap, self._box_key)

    @classmethod
    def resume(
        cls,
        sealed: bytes,
        head: Head,
        collab_id: str,
        account_id: str,
        box_key: nacl.public.PrivateKey,
        *,
        past_box_keys: Iterable[nacl.public.PrivateKey] = (),
        own_sign_pks: Iterable[bytes] = (),
        hold: bool = False,
    ) -> CollabView:
        """The fold `seal` kept at `head`, ready to take seq ``head.seq + 1``. Raises
        `SnapshotRejected` (model/viewsnap.py) for anything but this account's own sealed fold of this collab at
        exactly `head` (damaged, tampered with, another head, another key): the caller then
        reads from the genesis, it never trusts what it cannot open."""
        snap, tree = open_snapshot(sealed, head, collab_id, account_id, box_key)
        view = cls(
            collab_id,
            account_id,
            box_key,
            snap.keys,
            past_box_keys=past_box_keys,
            own_sign_pks=own_sign_pks,
            hold=hold,
        )
        view.head = head
        view.membership = snap.membership
        view._bad_wraps = set(snap.bad_wraps)
        view._joined = snap.joined
        view._chains = snap.chains
        view._ids = set(snap.ids)
        view._tree = tree
        view._streams = {(a, d): (n, e) for a, d, n, e in snap.streams}
        view._whole = snap.whole
        return view

    @property
    def settled_head(self) -> Head:
        """The head before the first held position (the head when nothing is held): only up
        to there has every check run."""
        if not self._held:
            return self.head
        first = min(self._held) - 1
        return Head(first, self._chains[first])

    def drain(self) -> list[Entry]:
        """The entries taken in since the last call that are final, in seq order (with
        `hold`, everything before the first held one)."""
        out: list[Entry] = []
        while self._queue and self._queue[0].seq not in self._held:
            out.append(self._queue.popleft())
        return out

    def settle(self) -> None:
        """End holding for now (the reader is caught up, or the stream ended): what is held
        is unreadable to this account, as a pass primed with every key it has would show it."""
        if not self._held:
            return
        held, self._held = self._held, {}
        self._queue = collections.deque(
            msgspec.structs.replace(e, unreadable=held[e.seq][1]) if e.seq in held else e
            for e in self._queue
        )
        self._streams.clear()  # as `ingest` does for an unreadable content event
        self._whole = False

    def _release(self) -> None:
        """The held epoch's key arrived: open what was held, in order, as if it had come in
        with the key already known (the author streams it extends come after it anyway)."""
        held, self._held = self._held, {}
        queue = collections.deque[Entry]()
        for entry in self._queue:
            if entry.seq in held:
                entry, stream = self._open(
                    msgspec.structs.replace(entry, unreadable=""), held[entry.seq][0]
                )
                self._follow(entry, stream)
            queue.append(entry)
        self._queue = queue

    def _follow(
        self, entry: Entry, stream: tuple[tuple[str, str], tuple[int, bytes]] | None
    ) -> None:
        if stream is not None:
            self._streams[stream[0]] = stream[1]
        elif entry.unreadable and entry.kind != KIND_DM:
            # This account cannot follow the authors' streams across what it cannot read.
            self._streams.clear()
            self._whole = False

    def _check_position(self, seq: int) -> None:
        if seq <= self.head.seq:
            raise ReorderProven(
                f"seq {seq} arrived after seq {self.head.seq} (again, or out of order)"
            )
        if seq > self.head.seq + 1:
            raise WithholdingProven(f"seqs {self.head.seq + 1}..{seq - 1} are missing")

    def ingest_withheld(
        self, seq: int, event_id: bytes, chain: bytes, header: DmHeader, sig: bytes
    ) -> Entry:
        """A position whose body the relay kept from this account: a DM between two others.

        The relay can hide a body, not rewrite history or invent a DM: the header must carry
        its author's signature under the key the fold pins here, name two members of whom this
        account is neither, be sealed under the epoch of this position, and hash (with the
        signature) to the event id the chain extends by. Anything else is a position the relay
        hides or made up, and raises `ViewRejected`.
        """
        self._check_position(seq)
        if event_id in self._ids:
            raise ReplayProven(f"seq {seq}: this event was already delivered earlier")
        where = f"seq {seq}: a withheld position"
        state = self.membership
        author = None if state is None else state.members.get(header.actor_id)
        if state is None or author is None:
            raise ViewRejected(f"{where} names an author who is not a member here")
        if header.collab_id != self.collab_id:
            raise ViewRejected(f"{where} names another collab")
        try:
            proven = verify_dm_link(header, sig, author.sign_pk)
        except ModelError as exc:
            raise ViewRejected(
                f"{where} is not a direct message its author signed: {exc}"
            ) from None
        if proven != event_id:
            raise ViewRejected(f"{where}: its signed header is not the event the chain links")
        if not author.may(CAP_POST):
            raise ViewRejected(f"{where} is by an agent without the post capability")
        if header.recipient_id not in state.members:
            raise ViewRejected(f"{where} is addressed to a non-member")
        if self.account_id in (header.actor_id, header.recipient_id):
            raise ViewRejected(f"{where} is a direct message of this account: it was hidden")
        if header.epoch != state.epoch:
            raise ViewRejected(
                f"{where} is sealed under key epoch {header.epoch}, but the collab is at"
                f" {state.epoch}"
            )
        try:
            self.head = advance(self.head, seq, event_id, chain)
        except ModelError as exc:
            raise ViewRejected(f"seq {seq}: {exc}") from None
        self._ids.add(event_id)
        self._tree.append(leaf_hash(event_id))
        self._chains.append(chain)
        entry = Entry(
            seq,
            event_id,
            chain,
            header.actor_id,
            KIND_DM,
            epoch=header.epoch,
            dm_to=header.recipient_id,
            unreadable="a direct message between other members (withheld)",
        )
        if self._hold:
            self._queue.append(entry)
        return entry

    def ingest(
        self,
        seq: int,
        signed: SignedEvent,
        chain: bytes,
        *,
        prechecked: Prechecked | None = None,
    ) -> Entry:
        """Verify and fold one event. Raises `ViewRejected` / `ChainMismatch`; then the view
        is unchanged and must not be fed further. `prechecked` holds signatures checked ahead
        (model/envelope.py `PrecheckPlan`): one that held for the key this fold pins is not
        checked again."""
        self._check_position(seq)
        try:
            body = decode_body(signed.body)
        except ModelError as exc:
            raise ViewRejected(f"seq {seq}: {exc}") from None
        if body.collab_id != self.collab_id:
            raise ViewRejected(f"seq {seq}: the event belongs to another collab")
        if event_id(signed) in self._ids:
            raise ReplayProven(f"seq {seq}: this event was already delivered at an earlier seq")
        state = self.membership
        try:
            if body.kind == KIND_MANAGEMENT:
                proof = proof_of(body)
                verified = verify_event(
                    signed, signer_key(state, proof), decoded=body, prechecked=prechecked
                )
                after = apply(state, proof, self.head, actor_id=body.actor_id)
            else:
                author = None if state is None else state.members.get(body.actor_id)
                if state is None or author is None:
                    raise ViewRejected("the author is not a member of the collab at this position")
                verified = verify_event(signed, author.sign_pk, decoded=body, prechecked=prechecked)
                if not author.may(CAP_POST):
                    raise ViewRejected("an agent without the post capability wrote this")
                if body.epoch != state.epoch:
                    raise ViewRejected(
                        f"sealed under key epoch {body.epoch}, but the collab is at {state.epoch}"
                    )
                after = state
            new_head = advance(self.head, seq, verified.event_id, chain)
        except ViewRejected as exc:
            raise ViewRejected(f"seq {seq}: {exc}") from None
        except ModelError as exc:
            raise ViewRejected(f"seq {seq}: {exc}") from None
        if body.kind == KIND_MANAGEMENT and proof.signer_id == self.account_id:
            self._check_own_rekey(seq, proof)
        entry = Entry(seq, verified.event_id, chain, body.actor_id, body.kind, body.ts, body.epoch)
        stream: tuple[tuple[str, str], tuple[int, bytes]] | None = None
        if body.kind == KIND_MANAGEMENT:
            entry = msgspec.structs.replace(entry, proof=proof)
            self._take_wraps(proof, after)
            if self._held and after.epoch != self._held_epoch:
                self.settle()  # the held epoch ended without its key reaching this account
        elif body.kind == KIND_DM:
            entry = self._open_dm(entry, verified, after)
        else:
            entry, stream = self._open(entry, verified)
            if self._hold and entry.unreadable and self._holdable(entry.epoch):
                self._held[seq] = (verified, entry.unreadable)
                self._held_epoch = entry.epoch
        if seq not in self._held:
            self._follow(entry, stream)
        if self._hold:
            self._queue.append(entry)
        self._ids.add(verified.event_id)
        self._tree.append(leaf_hash(verified.event_id))
        self._chains.append(chain)
        self.membership, self.head = after, new_head
        self._joined = self._joined or self.is_member
        return entry

    def _check_own_rekey(self, seq: int, proof: Proof) -> None:
        op = proof.op
        if not isinstance(op, RekeyMember):
            return
        if op.box_pk not in self._box_keys or (
            self._own_sign_pks and op.sign_pk not in self._own_sign_pks
        ):
            raise ForeignRekeyProven(
                f"seq {seq}: this account's keys were replaced, with a proof signed by its own"
                " previous key, by keys this device does not hold: someone who has that old key"
                " took the account over in this collab"
            )

    def _my_box_key(self, state: Membership) -> nacl.public.PrivateKey | None:
        """This account's box key as the fold pins it in `state` (None: not held here)."""
        me = state.members.get(self.account_id)
        return self._box_key if me is None else self._box_keys.get(me.box_pk)

    def _holdable(self, epoch: int) -> bool:
        """Whether content of `epoch` this account cannot open yet may still open in this pass:
        no key for it was opened (a bad wrap stays bad)."""
        return epoch not in self._keys and epoch not in self._bad_wraps

    def _take_wraps(self, proof: Proof, after: Membership) -> None:
        op = proof.op
        if not isinstance(op, (CreateCollab, AddMember, RemoveMember, RotateKey, RekeyMember)):
            return
        if self.account_id not in op.wraps:
            return
        box_key = self._my_box_key(after)
        try:
            if box_key is None:
                raise CryptoError("this device does not hold the box key pinned here")
            self._keys[after.epoch] = open_wrap(op.wraps, self.account_id, box_key)
            if self._held and after.epoch == self._held_epoch:
                self._release()
        except CryptoError:
            # Signed by a member, so not the relay's doing: this account simply has no key for
            # the epoch, and its content shows as unreadable (`_open`) rather than halting.
            self._bad_wraps.add(after.epoch)

    def _open(
        self, entry: Entry, verified: VerifiedEvent
    ) -> tuple[Entry, tuple[tuple[str, str], tuple[int, bytes]] | None]:
        key = self._keys.get(entry.epoch)
        if key is None:
            if entry.epoch in self._bad_wraps:
                why = f"the key of epoch {entry.epoch} was wrapped for this account unreadably"
            elif self._joined and not self.is_member:
                why = "sealed after this account was removed"
            else:
                why = f"sealed under key epoch {entry.epoch}, before this account joined"
            return msgspec.structs.replace(entry, unreadable=why), None
        try:
            plain = open_content(verified, key)
            content, evidence = contentmod.decode_content(plain)
        except (CryptoError, ModelError):
            return msgspec.structs.replace(entry, unreadable=_GARBLED), None
        stream = None if evidence is None else self._check_evidence(entry, evidence)
        return msgspec.structs.replace(entry, content=content), stream

    def _check_evidence(
        self, entry: Entry, ev: contentmod.Evidence
    ) -> tuple[tuple[str, str], tuple[int, bytes]]:
        """Hold the author's attestation against this history; return the stream's new state.

        The author signed it inside the ciphertext, so the relay cannot alter it: a mismatch
        is the relay presenting a history the author did not write into.
        """
        where = f"seq {entry.seq} by {entry.author_id}"
        if ev.seen_seq >= entry.seq:
            raise ForkProven(
                f"{where}: its author had already seen seq {ev.seen_seq} when writing it, so this"
                " history moved it earlier or removed events before it"
            )
        if self.chain_at(ev.seen_seq) != ev.seen_chain:
            raise ForkProven(
                f"{where}: its author saw another history at seq {ev.seen_seq} than this one"
            )
        key = (entry.author_id, ev.device)
        # A reader that read every event so far knows each stream from its start; one that
        # could not (content before it joined) takes a stream's first readable event as is.
        last = self._streams.get(key) or ((0, b"") if self._whole else None)
        if last is None:
            if ev.counter == 1 and ev.prev:
                raise ForkProven(f"{where}: a first event that names a previous one")
        else:
            counter, last_id = last
            if ev.counter <= counter:
                raise ReorderProven(
                    f"{where}: author event #{ev.counter} arrived after #{counter} (repeated or reordered)"
                )
            if ev.counter > counter + 1:
                raise WithholdingProven(
                    f"{where}: author events #{counter + 1}..#{ev.counter - 1} were never delivered"
                )
            if ev.prev != last_id:
                raise ForkProven(f"{where}: its author's previous event is not the one delivered")
        return key, (ev.counter, entry.event_id)

    def _open_dm(self, entry: Entry, verified: VerifiedEvent, state: Membership) -> Entry:
        refs = verified.body.refs
        recipient = state.members.get(refs[0]) if len(refs) == 1 else None
        if recipient is None:
            return msgspec.structs.replace(entry, unreadable="a direct message to a non-member")
        entry = msgspec.structs.replace(entry, dm_to=recipient.account_id)
        if self.account_id == entry.author_id:
            other = recipient
        elif self.account_id == recipient.account_id:
            other = state.members[entry.author_id]
        else:
            return msgspec.structs.replace(entry, unreadable="a direct message between others")
        box_key = self._my_box_key(state)
        if box_key is None:
            return msgspec.structs.replace(
                entry, unreadable="sealed to a box key of this account this device does not hold"
            )
        try:
            content, _ = contentmod.decode_content(open_dm(verified, box_key, other.box_pk))
        except (CryptoError, ModelError):
            return msgspec.structs.replace(entry, unreadable=_GARBLED)
        return msgspec.structs.replace(entry, content=content)
