"""Verified history: `History`, the iterator that checks every event the relay pushes.

Everything the relay sends is untrusted: each event is verified (author signature, canonical
body, collab binding, contiguous seq, recomputed chain) and decrypted by this client's own fold
(model/view.py) before a caller sees it; a gap is asked for again once, then is withholding;
a saved head this device expects and the receipts it holds are checked on the way. Each failure
raises its `IntegrityAlarm` subclass. While following, a relay that sends no signed checkpoint
dated within the client's staleness bound raises `StaleView`, a warning, not an alarm.
"""

from __future__ import annotations

import collections
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Final

import trio

from clientkit import _quorum as quorum
from clientkit._connection import ClientCore
from clientkit._verifiers import BATCH, Batch
from clientkit.errors import (
    AccountTakeoverDetected,
    ConnectionLost,
    EquivocationDetected,
    ForkDetected,
    IntegrityAlarm,
    QuorumNotMet,
    ReorderDetected,
    ReplayDetected,
    StaleView,
    TamperDetected,
    WithholdingDetected,
)
from model import wire
from model.chain import Head
from model.checkpoints import CheckpointInvalid
from model.envelope import DM_VERSION, DmHeader
from model.equivocation import PROOF_KIND, EquivocationProof, Served, contradicted_by
from model.errors import ChainMismatch
from model.merkle import ProofInvalid
from model.view import (
    CollabView,
    Entry,
    ForeignRekeyProven,
    ForkProven,
    ReorderProven,
    ReplayProven,
    ViewRejected,
    WithholdingProven,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection, Sequence

    import nacl.public

    from model.checkpoints import SignedHead
    from model.envelope import Prechecked
    from model.equivocation import SignedReceipt
    from model.membership import Membership, WitnessPolicy

# Signed heads ahead of the fold kept for `_bind` (an honest relay sends one or two at a time).
_UNBOUND_MAX: Final = 64


class HistoryCalls(ClientCore):
    """Reading a collab's verified history."""

    async def read(
        self,
        collab_id: str,
        box_key: nacl.public.PrivateKey,
        *,
        past_box_keys: Sequence[nacl.public.PrivateKey] = (),
        own_sign_pks: Collection[bytes] = (),
    ) -> CollabView:
        """This account's verified view of the collab's whole history up to the relay's head.
        `past_box_keys` and `own_sign_pks` are as for `CollabView` (an account whose keys were
        rotated)."""
        async with self.history(
            collab_id, box_key, past_box_keys=past_box_keys, own_sign_pks=own_sign_pks
        ) as events:
            async for _ in events:
                pass
        return events.view

    @asynccontextmanager
    async def history(
        self,
        collab_id: str,
        box_key: nacl.public.PrivateKey,
        *,
        view: CollabView | None = None,
        keys: dict[int, bytes] | None = None,
        expect: Head | None = None,
        receipts: dict[int, SignedReceipt] | None = None,
        follow: bool = False,
        past_box_keys: Sequence[nacl.public.PrivateKey] = (),
        own_sign_pks: Collection[bytes] = (),
    ) -> AsyncIterator[History]:
        """Verified entries of a collab, folded by this client (model/view.py).

        Use as ``async with client.history(...) as events: async for entry in events: …``.
        Reading starts at the genesis, or where `view` (a previous `History.view`) left off.
        Every event is checked against the chain and the membership this client folded itself;
        iteration raises an `IntegrityAlarm` subclass and stops on the first that does not
        verify, and `ConnectionLost` if the relay goes away. `expect` is a head this device
        verified before: a history that does not pass through it raises `ForkDetected`.
        `keys` primes a fresh view with epoch keys an earlier `read` opened, so a member added
        mid-epoch also reads that epoch's events from before the addition. `receipts` are the
        relay's signed acks for this account's own events: each must come back at its seq
        (`EquivocationDetected` with a transferable proof otherwise). `past_box_keys` and
        `own_sign_pks` are as for `CollabView`: a `rekey` of this account to keys outside them
        raises `AccountTakeoverDetected`.
        Without `follow` it ends once the history up to the relay's current head is in. With
        `follow`, iteration raises `StaleView` (a `ClientError`, not an alarm) when no signed
        checkpoint dated within `stale_after` seconds arrived; the iterator stays usable, and
        reports again only after a fresher checkpoint re-armed it.
        """
        view = view or CollabView(
            collab_id,
            self._me(),
            box_key,
            keys,
            past_box_keys=past_box_keys,
            own_sign_pks=own_sign_pks,
            hold=True,  # one pass: content from before a mid-epoch addition opens all the same
        )
        history = History(self, view, follow=follow, expect=expect, receipts=receipts or {})
        try:
            await history._subscribe()
            yield history
        finally:
            await history._unsubscribe()


class History:
    """An async iterator of verified `Entry`s; `view` is this client's fold so far."""

    def __init__(
        self,
        client: ClientCore,
        view: CollabView,
        *,
        follow: bool,
        expect: Head | None,
        receipts: dict[int, SignedReceipt],
    ) -> None:
        self._client = client
        self.view = view
        self._receipts = receipts
        # The largest position the relay vouched for to this device before this read began (a
        # receipt, or a signed checkpoint held): no honest head sent afterwards is smaller.
        held = (
            client.checkpoints.held(client.relay_pk, view.collab_id),
            client.checkpoints.top(client.relay_pk, view.collab_id),
        )
        self._floor = max(max(receipts, default=0), *(0 if h is None else h.size for h in held))
        self._follow = follow
        self._expect = expect
        self._done = False
        # Whether the fold took in a `caught_up`: it reached the relay's head at least once.
        self.caught_up = False
        # The head before an event that raised an alarm: `head` never names an event that did
        # not pass every check, so a caller saving it cannot save the relay's lie.
        self._alarmed_at: Head | None = None
        self._subscription = AsyncExitStack()
        self._frames: trio.MemoryReceiveChannel[wire.Reply] | None = None
        self._refilled_after: int | None = None  # the head a backfill was last asked from
        self._ahead: collections.deque[Entry] = collections.deque()  # verified, not handed out
        self._ready: collections.deque[Entry] = collections.deque()  # final in the fold, checked
        # The staleness bound (ADR-0020): the newest signed timestamp received on this stream,
        # when following began, and whether the current stale spell was reported already.
        self._fresh = 0
        self._since = time.time()
        self._stale_reported = False
        self._quorum_deadline: float | None = None  # waiting for witnesses to cosign (issue 16)
        # Signed heads larger than the fold when they came (a `caught_up` before its backfill),
        # by size: (root, the date it vouches for, if it may renew freshness). Each is compared
        # with the fold's own tree when the fold reaches its size (`_bind`).
        self._unbound: dict[int, tuple[bytes, int | None]] = {}
        # Frames taken off the subscription in batches, their signatures checked in worker
        # processes (clientkit/_verifiers.py): the one being folded, and the next one.
        self._batch: Batch | None = None
        self._next: Batch | None = None
        self._checked: Prechecked | None = None
        self._keys_of: tuple[Membership | None, dict[str, bytes]] = (None, {})

    async def _subscribe(self) -> None:
        self._batch = self._next = self._checked = None  # another subscription's frames
        self._frames = await self._subscription.enter_async_context(
            self._client.subscribe(self.view.collab_id, self.view.head.seq + 1, follow=self._follow)
        )

    async def _unsubscribe(self) -> None:
        await self._subscription.aclose()
        self._subscription = AsyncExitStack()
        self._frames = None

    async def _backfill(self, missing_from: int, missing_to: int | None) -> None:
        """A gap: ask again from the last verified seq, once. A relay that skips the same seqs
        again is withholding them."""
        head = self.view.head.seq
        if self._refilled_after == head:
            upto = "" if missing_to is None else f"..{missing_to}"
            raise self._alarm(
                WithholdingDetected,
                f"the relay skipped seq {missing_from}{upto} and would not fill it when asked again",
                missing_from,
            )
        self._refilled_after = head
        await self._unsubscribe()
        await self._subscribe()

    async def _await_quorum(self) -> bool:
        """A `caught_up` without the witness quorum: an honest relay's witnesses answer within
        a round, so ask again (from the verified head) until `quorum.QUORUM_GRACE` has passed
        since the first refusal; False once it has (then the refusal stands)."""
        now = trio.current_time()
        if self._quorum_deadline is None:
            self._quorum_deadline = now + quorum.QUORUM_GRACE
        if now >= self._quorum_deadline:
            return False
        await trio.sleep(quorum.QUORUM_RETRY)
        await self._unsubscribe()
        await self._subscribe()
        return True

    @property
    def head(self) -> Head:
        """The last position that passed every check (signature, chain, the saved head this
        device expects, the receipts it holds): after an alarm, the one before the event that
        raised it, although the view may have taken that event in already."""
        return self.view.settled_head if self._alarmed_at is None else self._alarmed_at

    def __aiter__(self) -> History:
        return self

    def _alarm(self, kind: type[IntegrityAlarm], message: str, seq: int | None) -> IntegrityAlarm:
        return kind(message, collab_id=self.view.collab_id, seq=seq)

    async def read_ahead(self, seq: int) -> CollabView:
        """Verify the stream up to `seq` now (or until it ends) and return the view there.

        The entries read are kept and handed out next, in order, so nothing is skipped: this is
        for code that must act on the collab as it is now while it is still handling an earlier
        entry — a post bounced as `stale` because the key rotated after that entry
        (`Client.seal_and_append`). Raises what iterating would raise.
        """
        while self.view.head.seq < seq:
            try:
                self._ahead.append(await self._next_entry())
            except StopAsyncIteration:
                break
        return self.view

    async def __anext__(self) -> Entry:
        if self._ahead:
            return self._ahead.popleft()
        return await self._next_entry()

    def buffered(self) -> bool:
        """Whether more is already here to hand out without waiting for the relay (a reader
        may batch its own bookkeeping while it is)."""
        if self._ahead or self._ready:
            return True
        for batch in (self._batch, self._next):
            if batch is not None and any(
                isinstance(f, wire.Event | wire.Withheld) for f in batch.frames
            ):
                return True
        # Not yet taken into a batch: only when more than a batch's worth came in at once.
        return self._frames is not None and self._frames.statistics().current_buffer_used > 0

    def _take_ready(self) -> None:
        """Move what the fold made final into `_ready`, each checked against the receipts."""
        for entry in self.view.drain():
            try:
                self._check_receipt(entry)
            except IntegrityAlarm:
                self._alarmed_at = Head(entry.seq - 1, self.view.chain_at(entry.seq - 1) or b"")
                raise
            self._ready.append(entry)

    def _settle(self) -> None:
        """Caught up (or the stream ended): what the fold still holds is final, unreadable."""
        self.view.settle()
        self._take_ready()

    async def _next_entry(self) -> Entry:
        while not self._ready and not self._done:
            try:
                frame = await self._receive()
            except trio.EndOfChannel:
                raise self._client._closed or ConnectionLost() from None
            head = self.view.head
            match frame:
                case wire.TreeHead():
                    beat = self._opened(frame.checkpoint)
                    try:
                        self._check_checkpoint(
                            frame.checkpoint, frame.proof_from, frame.consistency, None
                        )
                    except QuorumNotMet:
                        # A heartbeat without the witness quorum is not taken (the relay signed
                        # it before the witnesses answered) and renews nothing; a relay that
                        # never sends one that is meets the staleness bound. Its signature
                        # still binds the relay to the history it names.
                        self._bind(beat.size, beat.root, None)
                    self._check_floor(beat.size)
                    if frame.witnessed:
                        self._renew_from_witnessed(frame, beat)
                case wire.CaughtUp():
                    try:
                        if frame.checkpoint:
                            self._check_checkpoint(
                                frame.checkpoint, frame.proof_from, frame.consistency, frame.seq
                            )
                        elif self._policy() is not None:
                            # With a policy a head must be cosigned: one without a checkpoint
                            # at all (dropped, or not signed yet) is not confirmed either.
                            raise QuorumNotMet(
                                "it carries no signed checkpoint",
                                collab_id=self.view.collab_id,
                                size=frame.seq,
                            )
                    except QuorumNotMet:
                        if not await self._await_quorum():
                            raise
                        continue
                    self._quorum_deadline = None  # the next wait gets its own grace
                    if frame.seq > head.seq:  # claims to have sent more than arrived
                        await self._backfill(head.seq + 1, frame.seq)
                        continue
                    if frame.seq < head.seq:  # resumed from a verified view: it was longer
                        raise self._alarm(
                            ForkDetected,
                            f"this device verified seq {head.seq} before, but the relay's"
                            f" history ends at {frame.seq}: it was rolled back",
                            frame.seq,
                        )
                    if self._expect is not None and self._expect.seq > head.seq:
                        raise self._alarm(
                            ForkDetected,
                            f"this device verified seq {self._expect.seq} before, but the relay's"
                            f" history ends at {head.seq}: it was rolled back",
                            head.seq,
                        )
                    self._check_floor(frame.seq)
                    self._done = not self._follow
                    self._settle()
                    self.caught_up = True
                case wire.SubscriptionEnded():
                    if self.view.membership is not None and not self.view.is_member:
                        self._done = True  # removed: the relay ends the stream, as it should
                        self._settle()
                        continue
                    raise ConnectionLost(None, frame.reason)
                case wire.Event() | wire.Withheld() if frame.seq > head.seq + 1:
                    await self._backfill(head.seq + 1, frame.seq - 1)
                case wire.Event() | wire.Withheld():
                    before = self.view.settled_head
                    try:
                        self._verify(frame)
                        self._check_expected()
                        reached = self._unbound.pop(self.view.head.seq, None)
                        if reached is not None:
                            self._bind(self.view.head.seq, *reached)
                    except IntegrityAlarm:
                        self._alarmed_at = before
                        raise
                    self._take_ready()
        if self._ready:
            return self._ready.popleft()
        raise StopAsyncIteration

    async def _receive(self) -> wire.Reply:
        """The next frame, from the batch being folded; the batch after it is taken off the
        subscription (whatever is there already) and checked by the workers meanwhile."""
        if self._batch is None or not self._batch.frames:
            current = self._next
            if current is None:
                first = await self._receive_one()
                current = Batch([first, *self._take_buffered()])
            more = self._take_buffered()
            self._next = Batch(more) if more else None
            await self._start(current)
        elif not self._batch.started and self._member_keys():
            # The batch came before the fold knew a member's key (the genesis was in it): the
            # rest of it is checked now, rather than one by one by the fold.
            await self._start(self._batch)
        assert self._batch is not None
        return self._batch.frames.popleft()

    async def _start(self, current: Batch) -> None:
        keys = self._member_keys()
        current.start(keys)
        if self._next is not None:
            self._next.start(keys)
        self._checked = await current.checked()
        self._batch = current

    def _take_buffered(self) -> list[wire.Reply]:
        assert self._frames is not None
        out: list[wire.Reply] = []
        while len(out) < BATCH:
            try:
                out.append(self._frames.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return out

    def _member_keys(self) -> dict[str, bytes]:
        """Each member's signing key as the fold has them now: the workers' guess of the key
        each event is signed with (the fold checks again any event they guessed wrong)."""
        membership = self.view.membership
        if self._keys_of[0] is not membership:
            members = {} if membership is None else membership.members
            self._keys_of = (membership, {a: m.sign_pk for a, m in members.items()})
        return self._keys_of[1]

    async def _receive_one(self) -> wire.Reply:
        """The next frame; following, `StaleView` once the newest signed checkpoint is older
        than the bound (once per spell: iterating on waits for frames again)."""
        assert self._frames is not None
        bound = self._client.staleness_bound()
        while self._follow and bound is not None and not self._stale_reported:
            wait = max(self._fresh, self._since) + bound - time.time()
            if wait <= 0:
                self._stale_reported = True
                age = time.time() - (self._fresh or self._since)
                raise StaleView(self.view.collab_id, age=age, bound=bound)
            with trio.move_on_after(wait):
                return await self._frames.receive()
        return await self._frames.receive()

    def _verify(self, frame: wire.Event | wire.Withheld) -> Entry:
        if frame.collab_id != self.view.collab_id:
            raise self._alarm(TamperDetected, "event belongs to another collab", frame.seq)
        try:
            if isinstance(frame, wire.Withheld):
                return self.view.ingest_withheld(
                    frame.seq, frame.event_id, frame.chain, _link(frame), frame.sig
                )
            return self.view.ingest(frame.seq, frame.event, frame.chain, prechecked=self._checked)
        except (ViewRejected, ChainMismatch) as exc:
            raise self._alarm(_ALARMS.get(type(exc), TamperDetected), str(exc), frame.seq) from None

    def _check_checkpoint(
        self, note: bytes, proof_from: int, consistency: Sequence[bytes], seq: int | None
    ) -> None:
        """A signed head of this collab (clientkit/_checkpoints.py); a `caught_up`'s must be of
        exactly the seq it reports. It is tied to the fold (`_bind`) before the book keeps it:
        a head of another history than the one sent is never held."""
        collab_id, relay_pk = self.view.collab_id, self._client.relay_pk
        signed = self._opened(note)
        if seq is not None and signed.size != seq:
            raise self._alarm(
                TamperDetected,
                f"the relay reports caught up at seq {seq} under a checkpoint of {signed.size}",
                seq,
            )
        policy = self._policy()
        witnessed_at: int | None = None
        if policy is not None:  # before the head is kept: without the quorum it is not taken
            try:
                witnessed_at = quorum.require_quorum(relay_pk, collab_id, note, policy)
            except QuorumNotMet:
                # Refused, but what the relay signed still counts: a head behind one of this
                # device's receipts, dated later, is an equivocation whoever cosigned it.
                self._client.checkpoints.compare(relay_pk, collab_id, note)
                raise
        # Freshness (the staleness bound): with a witness policy, from the witnesses' dates,
        # which a relay withholding events behind what they saw cannot renew.
        self._bind(
            signed.size, signed.root, signed.timestamp if witnessed_at is None else witnessed_at
        )
        self._client.checkpoints.check_head(relay_pk, collab_id, note, proof_from, consistency)

    def _renew_from_witnessed(self, frame: wire.TreeHead, head: SignedHead) -> None:
        """Commits outran the witnesses: the heartbeat (whose checkpoint is `head`) also carries
        the newest head they cosigned. It renews freshness only through a head tied to the fold
        (`_bind`) and the proof that this head extends it (clientkit/_quorum.py); a proof that
        fails is a fork."""
        policy = self._policy()
        if policy is None or head.size != self.view.head.seq:
            return  # nothing to renew, or the head is not tied to the fold (yet)
        relay_pk = self._client.relay_pk
        try:
            date = quorum.extended_witnessed(
                relay_pk, head, frame.witnessed, frame.witnessed_proof, policy
            )
        except CheckpointInvalid as exc:
            raise self._alarm(
                TamperDetected, f"a witnessed head does not verify: {exc}", None
            ) from None
        except QuorumNotMet:
            return
        except ProofInvalid:
            why = "does not extend the smaller head its witnesses cosigned: another history"
            raise self._alarm(ForkDetected, f"the relay's head {why}", head.size) from None
        self._client.checkpoints.compare(relay_pk, head.collab_id, frame.witnessed)
        if date > self._fresh:
            self._fresh, self._stale_reported = date, False

    def _opened(self, note: bytes) -> SignedHead:
        """The note opened under the relay key; `TamperDetected` if it does not open."""
        return self._client.checkpoints.open(self._client.relay_pk, self.view.collab_id, note)

    def _bind(self, size: int, root: bytes, fresh: int | None) -> None:
        """Tie a signed head to the history this relay sent this device (ADR-0020's tree is over
        the same event ids the fold took): at the fold's size, the roots must be equal, else
        the relay signed one history and sent another (a split view, cosigned or not). Only a
        head so tied renews freshness (`fresh`, its date): a head of a history the device was
        not shown — larger, or another — says nothing about how fresh this device's view is.

        A head larger than the fold waits until the fold reaches it (its events come later:
        a `caught_up` before its backfill). A smaller one is not compared (the fold keeps no
        older roots) and renews nothing: an honest relay names exactly the head it has sent."""
        seq = self.view.head.seq
        if size > seq:
            if len(self._unbound) < _UNBOUND_MAX:
                self._unbound[size] = (root, fresh)
            return
        if size < seq:
            return
        if root != self.view.tree_root():
            raise self._alarm(
                ForkDetected,
                f"the relay signed a tree of {size} events that is not the history it sent this"
                " device: it shows others another one",
                size,
            )
        if fresh is not None and fresh > self._fresh:
            self._fresh, self._stale_reported = fresh, False

    def _policy(self) -> WitnessPolicy | None:
        membership = self.view.membership
        return None if membership is None else membership.witnesses

    def _check_floor(self, size: int) -> None:
        """A head (a `caught_up`, a heartbeat's tree) smaller than a position the relay vouched
        for to this device before this read began: it hides what it acked or signed, with or
        without a fresh signature (a signed one dated later is also `EquivocationDetected`, by
        the book). An honest relay's head only grows, and its catch-up reads after every
        earlier commit."""
        if size < self._floor:
            raise self._alarm(
                WithholdingDetected,
                f"the relay vouched for seq {self._floor} to this device before (an ack or a"
                f" signed head), but now says the history ends at {size}: it is withholding it",
                size,
            )

    def _check_receipt(self, entry: Entry) -> None:
        promised = self._receipts.get(entry.seq)
        served = Served(entry.seq, entry.event_id, entry.chain)
        if promised is None or not contradicted_by(promised, served):
            return
        raise EquivocationDetected(
            "the relay acked one of this account's events at this seq, and now serves another",
            collab_id=self.view.collab_id,
            seq=entry.seq,
            proof=EquivocationProof(
                PROOF_KIND,
                self._client.relay_pk,
                promised,
                served=served,
            ),
        )

    def _check_expected(self) -> None:
        expect, head = self._expect, self.view.head
        if expect is not None and head.seq == expect.seq and head.chain != expect.chain:
            raise self._alarm(
                ForkDetected,
                f"the history at seq {head.seq} differs from the one this device verified before",
                head.seq,
            )


def _link(frame: wire.Withheld) -> DmHeader:
    """The DM header a `withheld` frame claims, for the fold to check against its author."""
    return DmHeader(
        DM_VERSION, frame.collab_id, frame.author_id, frame.recipient_id, frame.epoch, frame.sealed
    )


# What each proof the fold raises means to a person (the rest is tampering).
_ALARMS: dict[type[Exception], type[IntegrityAlarm]] = {
    ForeignRekeyProven: AccountTakeoverDetected,
    ReplayProven: ReplayDetected,
    ReorderProven: ReorderDetected,
    WithholdingProven: WithholdingDetected,
    ForkProven: ForkDetected,
}
