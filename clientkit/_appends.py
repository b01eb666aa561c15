"""Collab management and the append pipeline of `Client`.

Creating a collab, management changes against a freshly verified head (`manage`), sealing
against a verified view with a re-seal after a `stale` bounce (`seal_and_append`), and the
pipelined appends themselves: a per-connection window, backoff on `overloaded`, and a check of
every ack's receipt, an inclusion proof under the relay's signed checkpoint (kept through
`on_receipt` to catch equivocation).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Final

import trio

from clientkit import _collab
from clientkit._connection import RETRY_CAP, RETRY_START
from clientkit._history import HistoryCalls
from clientkit._retry import backoff_delay
from clientkit.errors import (
    ConnectionLost,
    EquivocationDetected,
    IntegrityAlarm,
    ReceiptInvalid,
    RelayOverloaded,
    RelayRefused,
)
from model import content as contentmod
from model import wire
from model.envelope import event_id, seal_event
from model.equivocation import PROOF_KIND, EquivocationProof, SignedReceipt
from model.excgroups import first_error
from model.ids import new_id

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Sequence

    import nacl.public
    import nacl.signing
    import trio_websocket

    from clientkit._history import History
    from model.envelope import SignedEvent
    from model.membership import Operation
    from model.view import CollabView

# The relay refuses appends past 2 048 in flight or 16 MiB of bodies per connection (protocol.md
# "Limits"). One Client keeps at most half of that in flight across all its callers, so its own
# pipelining is never what gets shed.
APPEND_WINDOW: Final = 1024
APPEND_WINDOW_BYTES: Final = 8 * 1024 * 1024
# `overloaded` refusals of appends are retried for this long (seconds), with jittered
# exponential backoff from RETRY_START doubling up to RETRY_CAP.
APPEND_RETRY_FOR: Final = 30.0


class _AppendWindow:
    """Appends this connection has sent and holds no reply for: a count and body bytes.

    Admits one more while both stay within their bounds, and always admits one when none is in
    flight (an event's body is far below the byte bound anyway)."""

    def __init__(self, count: int, size: int) -> None:
        self._max_count, self._max_bytes = count, size
        self.count = self.bytes = 0
        self._released = trio.Event()

    def try_acquire(self, size: int) -> bool:
        if self.count and (self.count >= self._max_count or self.bytes + size > self._max_bytes):
            return False
        self.count += 1
        self.bytes += size
        return True

    async def wait_released(self) -> None:
        await self._released.wait()

    def release(self, size: int, count: int = 1) -> None:
        self.count -= count
        self.bytes -= size
        self._released.set()
        self._released = trio.Event()


class AppendCalls(HistoryCalls):
    """Creating collabs, management changes, sealing and appending events."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        super().__init__(ws)
        self._append_window = _AppendWindow(APPEND_WINDOW, APPEND_WINDOW_BYTES)
        # Set by a caller with durable state (the CLI): keeps each receipt, returns an earlier
        # one for the same position that disagrees with it.
        self.on_receipt: Callable[[SignedReceipt], SignedReceipt | None] | None = None

    async def create_collab(
        self, signing_key: nacl.signing.SigningKey, box_pk: bytes
    ) -> tuple[str, bytes]:
        """Create a collab owned by this account: its genesis proof, signed by the account key,
        wraps epoch 0's fresh key for this account. Returns the collab id and that key."""
        account_id = self._me()
        collab_id = new_id("c")
        genesis, key = _collab.genesis(signing_key, account_id, box_pk, collab_id, _now_ms())
        reply = await self.request(
            lambda rid: wire.CreateCollab(rid=rid, event=genesis), wire.CollabCreated
        )
        return reply.collab_id, key

    async def manage(
        self,
        signing_key: nacl.signing.SigningKey,
        box_key: nacl.public.PrivateKey,
        collab_id: str,
        change: Callable[[CollabView], Operation],
        *,
        attempts: int = 3,
        past_box_keys: Sequence[nacl.public.PrivateKey] = (),
        own_sign_pks: Collection[bytes] = (),
        resend: SignedEvent | None = None,
        read: Callable[[], Awaitable[CollabView]] | None = None,
    ) -> tuple[wire.Appended, CollabView]:
        """Make a management change against a freshly verified head.

        `change` builds the operation from the view (e.g. ``lambda v: _collab.remove(v, id)``);
        it runs again, drawing any new key afresh, only when the relay refused the change as
        `stale` — another change landed first and this one is known not to be stored. A
        change the relay holds already is answered as a duplicate with its stored seq, which
        is success. Returns the ack and the view the change was made against (for a duplicate
        answered to `resend`, the view read before resending, which holds the change already).

        If the connection is lost before the ack, the raised `ConnectionLost` carries the sent
        proof as `unacked`; pass it as `resend` on the next connection: that same signed proof
        is sent first (a rotation is never made twice), and `change` runs only if it is
        refused as `stale`. `read` is as for `seal_and_append`.
        """

        def propose(view: CollabView) -> SignedEvent:
            return _collab.proposal(view, signing_key, change(view), _now_ms())

        async def read_fresh() -> CollabView:
            return await self.read(
                collab_id, box_key, past_box_keys=past_box_keys, own_sign_pks=own_sign_pks
            )

        return await self.seal_and_append(
            collab_id, box_key, propose, attempts=attempts, resend=resend, read=read or read_fresh
        )

    async def seal_and_append(
        self,
        collab_id: str,
        box_key: nacl.public.PrivateKey,
        seal: Callable[[CollabView], SignedEvent],
        *,
        view: CollabView | None = None,
        history: History | None = None,
        attempts: int = 3,
        resend: SignedEvent | None = None,
        read: Callable[[], Awaitable[CollabView]] | None = None,
    ) -> tuple[wire.Appended, CollabView]:
        """Seal content against a verified view of the collab and append it.

        `seal(view)` seals under ``view.current_key()``. When the relay bounces the event as
        `stale` — the key rotated since that view, because a member was removed or the key was
        rotated — the view is brought up to the relay's head and `seal` runs again, under the
        new key: the bounced ciphertext is never sent again, so nothing sealed under a key a
        removed member still holds is stored after their removal (SO-7).

        `view`, a verified view the caller holds already, saves the first read; the collab is
        read afresh after a bounce. With `history` — a history of this collab open on this
        connection, which allows one subscription per collab (a bot's followed stream) — its
        view is used and advanced from its own stream instead (`History.read_ahead`), the
        entries read kept for the iteration. Returns the ack and the view the stored event was
        sealed against; the last refusal is raised after `attempts`.

        Content is never sealed again while it may be stored: a `stale` refusal means the relay
        does not hold the event (one it holds is answered as a duplicate, whatever changed
        since). If the connection is lost before the ack, the raised `ConnectionLost` carries
        the sent event as `unacked`; pass it as `resend` on the next connection and that same
        signed event is sent first, sealed again only if it is refused as `stale`.

        `read` reads the collab afresh (default: `read` with `box_key`): a `Session` passes its
        checked read, which also holds the relay to this device's saved head and receipts.
        This is the one retry-on-stale loop of the client kit: `manage`, `Session.post` and
        `Session.dm` all go through it.
        """
        if history is not None:
            view = history.view
        for attempt in range(attempts):
            if view is None:
                view = await (read() if read is not None else self.read(collab_id, box_key))
            if resend is not None:
                signed, resend = resend, None
            else:
                signed = seal(view)
            try:
                return await self.append(signed), view
            except ConnectionLost as exc:
                exc.unacked = signed
                raise
            except RelayRefused as exc:
                if exc.code is not wire.ErrorCode.STALE or attempt == attempts - 1:
                    raise
                if history is not None:
                    view = await history.read_ahead(exc.head_seq or view.head.seq + 1)
                else:
                    view = None
        raise AssertionError("unreachable")  # pragma: no cover

    async def append(
        self, signed: SignedEvent, *, retry_for: float = APPEND_RETRY_FOR
    ) -> wire.Appended:
        """Submit a signed event; return the ack once its receipt checks out.

        Safe to retry with the same `signed` after a lost connection: the relay answers with
        the original seq (``duplicate=True``). `overloaded` refusals are retried as in
        `append_many`.
        """
        return (await self.append_many([signed], retry_for=retry_for))[0]

    async def append_many(
        self, events: Sequence[SignedEvent], *, retry_for: float = APPEND_RETRY_FOR
    ) -> list[wire.Appended]:
        """Submit many events pipelined (in `Batch` frames) and return their acks, in order.

        At most APPEND_WINDOW appends (APPEND_WINDOW_BYTES of bodies) of this connection are in
        flight at once, whoever sends them, so the relay's per-connection limit is never hit.
        Each ack's receipt is checked.

        The relay sheds load with `overloaded` (a full collab inbox): those events are sent
        again, the same signed bytes, after a jittered exponential backoff, and nothing more is
        sent until then; this goes on for at most `retry_for` seconds, after which
        `RelayOverloaded` is raised. Events are submitted in order, but one refused and sent
        again lands after the ones stored meanwhile: events whose order readers check (one
        device stream's evidence, docs/ordering.md) go one at a time with `append`.

        If the relay refuses one for another reason, `RelayRefused` is raised after every reply
        arrived; the others may be stored — retrying them all is safe (idempotent).
        """
        acks: list[wire.Appended | None] = [None] * len(events)
        pending = list(range(len(events)))
        refused: RelayRefused | None = None
        deadline = trio.current_time() + retry_for
        stalled = 0  # rounds in a row in which nothing got through
        while True:
            shed, other = await self._append_round(events, pending, acks)
            refused = refused or other
            if not shed:
                break
            now = trio.current_time()
            if now >= deadline:
                raise RelayOverloaded(
                    f"the relay refused {len(shed)} of {len(events)} appends with `overloaded`"
                    f" for {retry_for:g} s; those were not stored",
                    stored=len(events) - len(shed),
                    pending=len(shed),
                )
            stalled = stalled + 1 if len(shed) == len(pending) else 0  # no progress: back off
            delay = backoff_delay(stalled, start=RETRY_START, cap=RETRY_CAP)
            await trio.sleep(min(delay, deadline - now))
            pending = shed
        if refused is not None:
            raise refused
        done = [ack for ack in acks if ack is not None]
        assert len(done) == len(events)
        return done

    async def _append_round(
        self,
        events: Sequence[SignedEvent],
        indexes: list[int],
        acks: list[wire.Appended | None],
    ) -> tuple[list[int], RelayRefused | None]:
        """Send `events[i]` for each i in `indexes` through the window, and collect the replies
        into `acks`. Returns the indexes to send again (refused with `overloaded`, or not sent
        because of one), in order, and the first other refusal."""
        window = self._append_window
        again: list[int] = []
        unsent: list[int] = []
        refused: RelayRefused | None = None
        shedding = False  # the relay said `overloaded`: send nothing more this round
        held = [0, 0]  # this round's share of the window: count, bytes
        sent, to_collect = trio.open_memory_channel[
            tuple[int, trio.MemoryReceiveChannel[wire.Reply], int]
        ](math.inf)

        def release(size: int) -> None:
            window.release(size)
            held[0] -= 1
            held[1] -= size

        async def submit() -> None:
            chunk: list[bytes] = []
            size = 0
            async with sent:
                for pos, i in enumerate(indexes):
                    body = len(events[i].body)
                    if not window.try_acquire(body):
                        if chunk:  # what waits for the window must be on the wire first
                            await self._send(wire.batch(chunk))
                            chunk, size = [], 0
                        while not window.try_acquire(body):
                            await window.wait_released()
                    held[0] += 1
                    held[1] += body
                    if shedding:
                        release(body)
                        unsent.extend(indexes[pos:])
                        break
                    rid, reply = self._expect_reply()
                    frame = wire.encode(wire.Append(rid=rid, event=events[i]))
                    if chunk and (
                        len(chunk) >= wire.MAX_BATCH_FRAMES
                        or size + len(frame) > wire.MAX_FRAME_BYTES // 2
                    ):
                        await self._send(wire.batch(chunk))
                        chunk, size = [], 0
                    chunk.append(frame)
                    size += len(frame)
                    sent.send_nowait((i, reply, body))
                if chunk:
                    await self._send(wire.batch(chunk))

        async def collect() -> None:
            nonlocal refused, shedding
            async for i, reply, body in to_collect:
                try:
                    ack = await self._reply(reply, wire.Appended)
                except RelayRefused as exc:
                    if exc.code is wire.ErrorCode.OVERLOADED:
                        shedding = True
                        again.append(i)
                    else:
                        refused = refused or exc
                    continue
                finally:
                    release(body)
                self._check_receipt(events[i], ack)
                acks[i] = ack

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(submit)
                nursery.start_soon(collect)
        except BaseExceptionGroup as group:
            # A lost connection (seen by both tasks) or an alarm: raise it as itself.
            error = first_error(group, prefer=(IntegrityAlarm,), skip=(trio.Cancelled,))
            if error is None:
                raise  # only cancellation: leave it to Trio
            raise error from None
        finally:
            # Ended early: give back the window this round still held.
            window.release(held[1], held[0])
        return again + unsent, refused

    def _check_receipt(self, signed: SignedEvent, ack: wire.Appended) -> None:
        """The ack's receipt (its checkpoint and inclusion proof, ADR-0020) must prove this
        event stored at the ack's seq under the relay key; it is kept (`on_receipt`), and one
        kept before for the same position that disagrees is an equivocation proof."""
        if ack.event_id != event_id(signed):
            raise ReceiptInvalid(
                "the relay acked another event than the one sent",
                collab_id=ack.collab_id,
                seq=ack.seq,
            )
        receipt = SignedReceipt.of_ack(ack)
        self.checkpoints.check_ack(self.relay_pk, receipt)
        if self.on_receipt is None:
            return
        earlier = self.on_receipt(receipt)
        if earlier is not None:
            raise EquivocationDetected(
                "the relay signed two different events for the same position",
                collab_id=ack.collab_id,
                seq=ack.seq,
                proof=EquivocationProof(PROOF_KIND, self.relay_pk, earlier, other_receipt=receipt),
            )

    async def post(
        self,
        *,
        signing_key: nacl.signing.SigningKey,
        collab_key: bytes,
        collab_id: str,
        content: contentmod.Content,
        ts: int,
        refs: tuple[str, ...] = (),
        epoch: int = 0,
        evidence: contentmod.Evidence | None = None,
    ) -> wire.Appended:
        """Seal `content` (with the author's `evidence`, from `CollabView.evidence`) under the
        collab key of `epoch` and append it: the bare primitive, with no view, author stream or
        retry (`Session.post` is the one with all three)."""
        signed = seal_content(
            signing_key=signing_key,
            collab_key=collab_key,
            epoch=epoch,
            collab_id=collab_id,
            actor_id=self._me(),
            content=content,
            ts=ts,
            refs=refs,
            evidence=evidence,
        )
        return await self.append(signed)


def seal_content(
    *,
    signing_key: nacl.signing.SigningKey,
    collab_key: bytes,
    epoch: int,
    collab_id: str,
    actor_id: str,
    content: contentmod.Content,
    ts: int,
    refs: tuple[str, ...] = (),
    evidence: contentmod.Evidence | None = None,
) -> SignedEvent:
    """The one sealing of collab content (a message, an attachment, the collab's name): its
    kind, its encoding with the author's evidence, under the collab key of `epoch`."""
    return seal_event(
        signing_key=signing_key,
        collab_key=collab_key,
        collab_id=collab_id,
        actor_id=actor_id,
        kind=contentmod.kind_of(content),
        ts=ts,
        content=contentmod.encode_content(content, evidence),
        refs=refs,
        epoch=epoch,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
