"""One sequencer actor per active collab: the single writer of that collab's ledger.

Each actor owns a bounded inbox (its fixed buffer is the backpressure on submitters) and runs
four stages joined by small channels, so batch n+1 is verified while batch n is written:

    inbox ──► verify stage (crypto pool, whole batch; a small one on the loop if it is idle)
          ──► write stage (the group-commit writer: dedup lookup + assign + COPY + commit)
          ──► publish stage (the collab's tree, fan-out, membership callbacks)
          ──► ack stage (crypto pool, a small group on the loop: checkpoint, proofs) ──► acks

The write stage is also where membership is enforced (ADR-0010): the actor holds the collab's
`Membership`, folded from its `mgmt` events when the actor starts, and asks the pure admission
rules (model/admission.py) about each event at its exact position — content only from a current
member with `post`, under the current key epoch, a DM only to one member; a `mgmt` event only
if the shared fold accepts it against the exact head it would follow. A change is written as a
batch of its own, with the membership projection in the same transaction. Of two changes made
against one head the first wins; the other is refused as `stale`, naming the new head. The
actor itself only moves data: it writes what is admitted and replies with each refusal.
Identity comes before admission (model/admission.py `identify`): the refusals of a batch are
held until its writes are done, then the ledger is asked about their ids, and one it holds —
stored before, or earlier in this batch — is acked as a duplicate with its stored position
instead. So a refusal always means "not stored", and a retry after a lost ack resolves
whatever changed since (a rotation, a removal).

A fault stays in its collab. A write the ledger did not confirm fails the rest of its batch, in
order, with `overloaded` (retryable: appends are idempotent) and the head is re-read before the
next write. Any other exception in one actor, at any stage, ends that actor alone: its
registry answers every submission it held with `overloaded`, forgets it, and the next append
for that collab starts a fresh actor that re-reads head and membership from the ledger. The
exception never reaches the sequencers nursery, so the relay and every other collab go on.

Persist first, then notify: acks and fan-out only ever see committed events (the publish
stage only receives a batch once `LedgerWriter.write` has returned it committed), and an
author's ack follows its event's publication. Worker-thread calls are not abandoned on
cancellation, so a write that started is finished (committed or rolled back) before the actor
exits. Shutdown closes the inboxes; each actor drains what it holds, then exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import msgspec
import structlog
import trio

from ledger import AppendRequest, LedgerError
from model import wire
from model.admission import Refused, admit_change, admit_content, identify
from model.envelope import (
    KIND_MANAGEMENT,
    EventBody,
    SequencedEvent,
    SignedEvent,
    VerifiedEvent,
    audience_of,
)
from model.errors import ModelError
from model.sequencer import Assignment
from relay import _stages
from relay._checkpoints import ReceiptsNotReady
from relay._verifying import verify_appends

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from fanout import Fanout
    from ledger import Ledger
    from model.chain import Head
    from model.membership import Membership, Operation
    from relay._checkpoints import CollabTrees, GroupHead
    from relay._cryptopool import CryptoPool
    from relay._writer import LedgerWriter

    # Called after a committed management change: (collab_id, the change, the membership after
    # it). The relay drops what it cached or served under the old membership.
    OnChanged = Callable[[str, Operation, Membership], None]

log = structlog.get_logger("cozy.sequencer")

INBOX_SIZE: Final = 4096
# Committed runs waiting for their receipts; a full channel holds the write stage back.
ACK_QUEUE: Final = 4
# An actor with nothing to do for this long retires; the next append for its collab starts a
# fresh one (which re-reads the head), so idle collabs cost nothing.
IDLE_SECONDS: Final = 300.0
MAX_BATCH: Final = 256
# While the crypto pool is idle, a commit group this small gets its receipts on the Trio loop
# (one signature, a proof per event): the pool's round trip (a task wakeup, a thread hop each
# way) costs more loop time than the work, and as much latency again (docs/performance.md,
# "Where the latency goes"). A busy pool gets them, so that its round runs them on every core
# (`small`; relay/_verifying.py does the same for signature checks).
INLINE_RECEIPTS: Final = 16


class Replier(Protocol):
    def reply(self, frame: wire.Reply) -> None:
        """Queue a reply without waiting: the sequencer never waits on a connection; a client
        that cannot take its own acks is disconnected as lagging."""


@dataclass(slots=True)
class Submission:
    """One append request waiting for its seq. `author_pk` is the key it verifies under: the
    session account's registered key, or for a `rekey` the old key it names (relay/_rekey.py)."""

    reply_to: Replier
    rid: int
    event: SignedEvent
    body: EventBody  # decode_body(event.body), done once when the relay routed the append
    author_pk: bytes
    # Its stage times so far, only while the relay records them (relay/_stages.py).
    stamps: list[float] | None = None


# A committed run, its assignments and the tree after it (None: no checkpoint for its acks),
# waiting in the ack stage for receipts.
_Committed = tuple[list[tuple[Submission, VerifiedEvent]], list["Assignment"], "GroupHead | None"]


@dataclass(slots=True)
class _Written:
    """A run the write stage is done with, for the publish stage: its committed fresh events
    (none for a run of duplicates), and for a management change what to tell the relay once
    its event is published."""

    run: list[tuple[Submission, VerifiedEvent]]
    assignments: list[Assignment]
    fresh: list[SequencedEvent]
    changed: tuple[Operation, Membership] | None = None
    timing: list[float] | None = None  # stage times (relay/_stages.py), when recorded


class SequencerStats(msgspec.Struct):
    collab_id: str
    head_seq: int
    inbox: int
    batches: int
    events: int
    duplicates: int
    rejected: int


class ShuttingDown(Exception):
    """The relay is draining; no new appends are accepted."""


class InboxFull(Exception):
    """The collab's inbox holds INBOX_SIZE appends already: refuse this one (`overloaded`)
    rather than stall the submitting connection's reader behind a flood."""


class Sequencer:
    def __init__(
        self,
        collab_id: str,
        ledger: Ledger,
        writer: LedgerWriter,
        fanout: Fanout,
        db_limiter: trio.CapacityLimiter,
        crypto: CryptoPool,
        retire: Callable[[Sequencer], None],
        on_changed: OnChanged,
        trees: CollabTrees,
    ) -> None:
        self.collab_id = collab_id
        self._trees = trees
        self._retire = retire
        self._on_changed = on_changed
        self._ledger = ledger
        self._writer = writer
        self._fanout = fanout
        self._db_limiter = db_limiter
        self._crypto = crypto
        self.inbox, self._inbox_recv = trio.open_memory_channel[Submission](INBOX_SIZE)
        self._head: Head | None = None
        self._membership: Membership | None = None
        self._in_flight = 0  # verified batches handed to the write stage, not yet written
        self._acks: trio.MemorySendChannel[_Committed] | None = None  # set while running
        self._written: trio.MemorySendChannel[_Written] | None = None  # set while running
        # This batch's refusals, answered once its writes are done (`_answer_refused`).
        self._refused: list[tuple[Submission, VerifiedEvent, Refused]] = []
        # Submissions taken from the inbox and not answered yet, by identity: if the actor
        # fails, its registry answers exactly these (and what is left in the inbox).
        self._pending: dict[int, Submission] = {}
        self._batches = self._events = self._duplicates = self._rejected = 0

    def statistics(self) -> SequencerStats:
        return SequencerStats(
            collab_id=self.collab_id,
            head_seq=-1 if self._head is None else self._head.seq,
            inbox=self._inbox_recv.statistics().current_buffer_used,
            batches=self._batches,
            events=self._events,
            duplicates=self._duplicates,
            rejected=self._rejected,
        )

    async def run(self) -> None:
        verified_send, verified_recv = trio.open_memory_channel[
            list[tuple[Submission, VerifiedEvent]]
        ](1)
        self._acks, acks_recv = trio.open_memory_channel[_Committed](ACK_QUEUE)
        self._written, written_recv = trio.open_memory_channel[_Written](ACK_QUEUE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._verify_stage, verified_send)
            nursery.start_soon(self._write_stage, verified_recv)
            nursery.start_soon(self._publish_stage, written_recv)
            nursery.start_soon(self._ack_stage, acks_recv)

    async def _verify_stage(
        self, out: trio.MemorySendChannel[list[tuple[Submission, VerifiedEvent]]]
    ) -> None:
        # The inbox's receiving end stays open here: if the actor fails, its registry still
        # drains what was queued and answers it (`fail_all`), then closes it.
        async with out:
            while True:
                with trio.move_on_after(IDLE_SECONDS) as idle:
                    try:
                        first = await self._inbox_recv.receive()
                    except trio.EndOfChannel:
                        return
                if idle.cancelled_caught:
                    if self._in_flight == 0:
                        # Retire: the registry forgets this actor and closes its inbox at once
                        # (no await in between, so nothing can be queued meanwhile); the loop
                        # drains anything still buffered and ends. A batch still being written
                        # keeps the actor alive, so a successor never reads a stale head.
                        self._retire(self)
                    continue
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._inbox_recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                for sub in batch:
                    self._pending[id(sub)] = sub
                if _stages.RECORDER is not None:
                    _stages.stamp(sub.stamps for sub in batch)
                checked = await verify_appends(self._crypto, batch)
                if _stages.RECORDER is not None:
                    _stages.stamp(sub.stamps for sub in batch)
                good: list[tuple[Submission, VerifiedEvent]] = []
                for sub, result in zip(batch, checked, strict=True):
                    if isinstance(result, VerifiedEvent):
                        good.append((sub, result))
                    else:
                        self._rejected += 1
                        self._reply(sub, wire.Error(rid=sub.rid, code=result[0], message=result[1]))
                if good:
                    self._in_flight += 1
                    await out.send(good)

    async def _write_stage(
        self, batches: trio.MemoryReceiveChannel[list[tuple[Submission, VerifiedEvent]]]
    ) -> None:
        """Write verified batches in order, all those verified while the previous write
        committed in one: an event then waits for at most one commit of its collab, not one
        per batch ahead of it (docs/performance.md, "Where the latency goes")."""
        assert self._written is not None
        async with batches, self._written:
            async for batch in batches:
                taken = 1
                while len(batch) < MAX_BATCH:
                    try:
                        batch.extend(batches.receive_nowait())  # the verify stage's own list
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    taken += 1
                try:
                    await self._write_batch(batch)
                    await self._answer_refused()
                finally:
                    self._in_flight -= taken

    async def _publish_stage(self, written: trio.MemoryReceiveChannel[_Written]) -> None:
        """Extend the collab's tree with each committed run, publish it, then queue it for its
        acks; in commit order.

        Its own task, so the write stage hands the next batch to the ledger writer as soon as
        a commit returns: fan-out to many subscribers (a socket write each) then runs while
        the next transaction commits in its thread, instead of before it is even started
        (docs/performance.md, "Where the latency goes"). The tree grows and the run is
        published with no await between (relay/_checkpoints.py), and a membership change is
        reported only once its event is published (the removed member gets it first).
        """
        assert self._acks is not None
        async with written, self._acks:
            async for item in written:
                group = None
                fresh = item.fresh
                if fresh:
                    if self._trees is not None:
                        group = self._trees.add_group(
                            self.collab_id,
                            fresh[0].seq,
                            [
                                a.event_id
                                for a in sorted(
                                    (a for a in item.assignments if not a.duplicate),
                                    key=lambda a: a.seq,
                                )
                            ],
                        )
                    if item.timing is not None:
                        _stages.record(
                            self.collab_id,
                            [
                                (sub.stamps, a)
                                for (sub, _), a in zip(item.run, item.assignments, strict=True)
                            ],
                            item.timing,
                        )
                    self._fanout.publish(fresh)
                if item.changed is not None:
                    self._on_changed(self.collab_id, *item.changed)
                await self._acks.send((item.run, item.assignments, group))

    async def _ack_stage(self, committed: trio.MemoryReceiveChannel[_Committed]) -> None:
        """Make the receipts of committed runs, then ack their authors (ADR-0020).

        A run from a commit group gets the group's checkpoint, signed once for the whole group,
        and each event's inclusion proof under it: one crypto-pool job, sharing a round with
        other sequencers' jobs (or on the loop, if small and the pool idle). Off the write
        stage, so the next commit does not wait for it. Duplicates (and a group whose tree was
        dropped) get proofs under the collab's current checkpoint. Acks keep commit order.
        """
        async with committed:
            async for run, assignments, group in committed:
                seqs = [a.seq for a in assignments]
                note: bytes = b""
                proofs: list[tuple[bytes, ...]] = []
                if group is not None:
                    ((note, proofs),) = await self._crypto.map(
                        self._trees.group_receipts,
                        [(group, seqs)],
                        small=len(seqs) <= INLINE_RECEIPTS,
                    )
                if not note:
                    try:
                        note, proofs = await self._trees.latest_receipts(self.collab_id, seqs)
                    except (ReceiptsNotReady, LedgerError):
                        # Stored, but not provable now: the retry gets its seq and a receipt.
                        for sub, _ in run:
                            self._reply(sub, _unproven(sub.rid))
                        continue
                for (sub, _), a, proof in zip(run, assignments, proofs, strict=True):
                    self._reply(sub, appended(sub.rid, self.collab_id, a, note, proof))

    async def _write_batch(self, batch: list[tuple[Submission, VerifiedEvent]]) -> None:
        """Check each event against the membership at its position; persist content in runs
        and each management change on its own; ack authors; hand the events to fan-out."""
        if self._head is None or self._membership is None:
            try:
                self._head, self._membership = await trio.to_thread.run_sync(
                    self._load, limiter=self._db_limiter
                )
            except (LedgerError, ModelError) as exc:
                self._head = None
                self._fail(batch, exc)
                return
        if self._trees.loaded(self.collab_id) is None:
            # Held before the write, so the group is added without an await after it.
            try:
                await self._trees.load(self.collab_id)
            except LedgerError as exc:
                self._fail(batch, exc)
                return
        run: list[tuple[Submission, VerifiedEvent]] = []
        for i, (sub, verified) in enumerate(batch):
            if self._head is None:
                # A change's write failed and the head is forgotten until it is re-read: the
                # rest of the batch cannot be placed, so its authors retry.
                self._fail(batch[i:], None)
                return
            if verified.body.kind == KIND_MANAGEMENT:
                if run and not await self._write_run(run):
                    self._fail(batch[i:], None)  # its order would be lost: all retry
                    return
                run = []
                await self._write_change(sub, verified)
            else:
                assert self._membership is not None
                refusal = admit_content(self._membership, self._head, verified.body, sub.author_pk)
                if refusal is None:
                    run.append((sub, verified))
                else:
                    self._refuse(sub, verified, refusal)
        if run:
            await self._write_run(run)

    def _load(self) -> tuple[Head, Membership]:
        """Worker thread: the collab's head and its membership folded from the ledger, read
        from one snapshot (no change can land between the two reads)."""
        head, membership = self._ledger.head_and_membership(self.collab_id)
        if membership is None:
            raise LedgerError(f"collab {self.collab_id} has no genesis event")
        return head, membership

    async def _write_change(self, sub: Submission, verified: VerifiedEvent) -> None:
        """Write one management change at exactly the current head, if it is admitted there."""
        assert self._membership is not None
        assert self._head is not None
        decision = admit_change(self._membership, self._head, verified.body, sub.author_pk)
        if isinstance(decision, Refused):
            self._refuse(sub, verified, decision)
            return
        assert decision.proof is not None
        changed = (decision.proof.op, decision.membership)
        if await self._write_run([(sub, verified)], decision.membership, changed):
            self._membership = decision.membership

    def _refuse(self, sub: Submission, verified: VerifiedEvent, refusal: Refused) -> None:
        """Hold a refusal until the batch is written: it is final only once the event's id is
        known not to be stored (`_answer_refused`)."""
        self._refused.append((sub, verified, refusal))

    async def _answer_refused(self) -> None:
        """Identity before admission (model/admission.py `identify`): an event the rules
        refused whose id the ledger holds — stored before, or earlier in this very batch — is
        answered with its stored seq, chain and receipt as a duplicate; the others get their
        refusal. When the ledger cannot be asked, they are told to retry (`overloaded`): a
        refusal is only ever sent for an event known not to be stored."""
        refused, self._refused = self._refused, []
        if not refused:
            return
        try:
            stored = await trio.to_thread.run_sync(
                self._ledger.stored_at,
                [v.event_id for _, v, _ in refused],
                limiter=self._db_limiter,
            )
        except LedgerError as exc:
            self._fail([(sub, verified) for sub, verified, _ in refused], exc)
            return
        run: list[tuple[Submission, VerifiedEvent]] = []
        assignments: list[Assignment] = []
        for sub, verified, refusal in refused:
            at = stored.get(verified.event_id)
            position = None if at is None or at.collab_id != self.collab_id else (at.seq, at.chain)
            answer = identify(refusal, position)
            if isinstance(answer, Refused):
                self._rejected += 1
                self._reply(
                    sub,
                    wire.Error(
                        rid=sub.rid,
                        code=answer.code,
                        message=answer.message,
                        head_seq=answer.head_seq,
                    ),
                )
            else:
                self._duplicates += 1
                run.append((sub, verified))
                assignments.append(Assignment(answer.seq, verified.event_id, answer.chain, True))
        if run:
            assert self._written is not None
            await self._written.send(_Written(run, assignments, []))

    def _fail(self, batch: list[tuple[Submission, VerifiedEvent]], exc: Exception | None) -> None:
        if exc is not None:
            log.warning("append_failed", collab_id=self.collab_id, error=type(exc).__name__)
        for sub, _ in batch:
            self._reply(
                sub,
                wire.Error(
                    rid=sub.rid,
                    code=wire.ErrorCode.OVERLOADED,
                    message="the ledger did not confirm this event; retry it (appends are"
                    " idempotent: one that was stored gets its seq back)",
                ),
            )

    def _reply(self, sub: Submission, frame: wire.Reply) -> None:
        self._pending.pop(id(sub), None)
        sub.reply_to.reply(frame)

    def fail_all(self) -> int:
        """After the actor failed: answer every submission it held or that is still in its
        (closed) inbox with a retryable `overloaded`, in the order they came. Returns how many."""
        held = list(self._pending.values())
        self._pending.clear()
        while True:
            try:
                held.append(self._inbox_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._inbox_recv.close()
        for sub in held:
            sub.reply_to.reply(
                wire.Error(
                    rid=sub.rid,
                    code=wire.ErrorCode.OVERLOADED,
                    message="the relay could not place this event (its collab's sequencer"
                    " failed and was restarted); retry it: appends are idempotent, one that was"
                    " stored gets its seq back",
                )
            )
        return len(held)

    async def _write_run(
        self,
        run: list[tuple[Submission, VerifiedEvent]],
        membership: Membership | None = None,
        changed: tuple[Operation, Membership] | None = None,
    ) -> bool:
        """Persist one run of events (with the new `membership`, for a change, and `changed`
        to report once it is published); hand it to the publish stage.

        Returns False when nothing was written (the authors were told to retry).
        """
        assert self._head is not None
        timing: list[float] | None = None
        if _stages.RECORDER is not None:
            timing = []
            _stages.stamp(sub.stamps for sub, _ in run)
        try:
            head, assignments = await self._writer.write(
                AppendRequest(self.collab_id, self._head, [v for _, v in run], membership),
                timing,
            )
        except LedgerError as exc:
            # Not acked: the ledger returns only once the rows are known to be stored (a commit
            # whose reply was lost is settled by asking Postgres; see Ledger.append_batches).
            # If even that failed, the batch may or may not be stored, so the head is not
            # guessed: it is forgotten and re-read from the ledger before the next write, and
            # the authors retry (a stored event gets its seq back as a duplicate).
            self._head = None
            self._fail(run, exc)
            return False
        self._head = head
        self._batches += 1
        fresh: list[SequencedEvent] = []
        for (_, verified), a in zip(run, assignments, strict=True):
            if a.duplicate:
                self._duplicates += 1
            else:
                self._events += 1
                fresh.append(
                    SequencedEvent(
                        self.collab_id, a.seq, verified.signed, a.chain, audience_of(verified.body)
                    )
                )
        fresh.sort(key=lambda e: e.seq)
        assert self._written is not None
        await self._written.send(_Written(run, assignments, fresh, changed, timing))
        return True


def appended(
    rid: int, collab_id: str, a: Assignment, checkpoint: bytes, inclusion: Sequence[bytes]
) -> wire.Appended:
    """The ack of an append stored at `a` (a fresh position, or a duplicate's stored one), with
    its receipt: the checkpoint and the event's inclusion proof under it."""
    return wire.Appended(
        rid=rid,
        collab_id=collab_id,
        seq=a.seq,
        event_id=a.event_id,
        chain=a.chain,
        duplicate=a.duplicate,
        checkpoint=checkpoint,
        inclusion=list(inclusion),
    )


def _unproven(rid: int) -> wire.Error:
    return wire.Error(
        rid=rid,
        code=wire.ErrorCode.OVERLOADED,
        message="the relay stored this event but cannot prove it yet; retry it (appends are"
        " idempotent: it gets its seq back, with its receipt)",
    )
