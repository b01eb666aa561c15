"""Durable author streams: sign once, keep it, then send — and after a crash send it again.

An author stream is this device's chain of events in one collab (`Evidence.device`, counter,
previous event id; docs/ordering.md). Every reader checks that its counters go up by one, so
a counter must never be signed twice: two events with one counter are, to every member, the
relay repeating or reordering the author's events (`ReorderDetected`), and the ledger keeps
both forever. The in-memory view cannot promise that: a process that signed an event and
died before recording its fate, or a bot that replays a handler whose reply was stored but
whose cursor was not committed, would read the counter off a view that has not seen that
event yet.

So, here:

- **counters come from the durable record.** The next counter follows the higher of this
  stream's last event in the view and its last *signed* event in the device state (stored or
  not), and names that event as the previous one.
- **kept before sent.** Each signed event is written to the device state (`ClientState`,
  `sent`) before it goes on the wire, with the caller's *intent* (what it was for).
- **resent, never re-signed.** Before a stream signs anything new, an event whose outcome was
  never recorded is sent again, the same bytes: the relay answers with its seq (it was stored)
  or stores it now. Only a refusal that says the event is not stored and never will be (its
  code in `NOT_STORED`) frees its counter.
- **exactly once per intent.** A send whose intent has an event whose ack was never recorded
  resends that event and returns its seq instead of posting again (`Sent.earlier`): a rerun
  `cozy post` of the same text after an interruption reports the post it made. A bot's
  replayed handler (`once`) also gets back a reply whose ack *was* recorded but whose cursor
  was not: its stored reply, not a second one.

What this module does not do: decide the relay's answer. A relay that answers a stored event
with a refusal (rather than `duplicate`) leads to the counter being reused; the relay answers
duplicates before any admission check (issue 14, bug 3).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import msgspec

from clientkit._state import SentEvent
from clientkit.errors import RelayRefused
from model import wire
from model.envelope import event_id

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import nacl.public

    from clientkit._client import Client, History
    from clientkit._state import ClientState
    from model import content as contentmod
    from model.envelope import SignedEvent
    from model.view import CollabView

# Refusals after which the event is not stored and never will be: its counter is free again.
# Everything else (`overloaded`, `shutting_down`, `internal`, a lost connection, a
# cancellation) leaves the outcome unknown and the event kept, to be sent again.
NOT_STORED: Final = frozenset(
    {
        wire.ErrorCode.STALE,
        wire.ErrorCode.UNAUTHORIZED,
        wire.ErrorCode.INVALID_EVENT,
        wire.ErrorCode.INVALID_REQUEST,
        wire.ErrorCode.BAD_SIGNATURE,
        wire.ErrorCode.NOT_FOUND,
        wire.ErrorCode.FRAME_TOO_LARGE,
        wire.ErrorCode.MALFORMED_FRAME,
    }
)


@dataclass(frozen=True)
class Sent:
    """Where a send ended: `seq` of the stored event; `earlier` when it was stored by an
    earlier attempt (this call sent nothing new, or resent the kept event)."""

    seq: int
    earlier: bool


class AuthorStream:
    """This device's author stream `device` in `collab_id`, kept in `state`."""

    def __init__(
        self, state: ClientState, collab_id: str, device: str, *, seen: CollabView | None = None
    ) -> None:
        """`seen` is a further view to take the stream's position from: a bot's read at the
        relay's head when it connected, while its handlers see views of older positions."""
        self.state = state
        self.collab_id = collab_id
        self.device = device
        self.seen = seen

    def evidence(self, view: CollabView, clock: int) -> contentmod.Evidence:
        """The evidence for the stream's next event, made at `view`'s head: its counter
        follows the latest of the view's (and `seen`'s) last event of the stream and the last
        one signed."""
        evidence = view.evidence(self.device, clock)
        if self.seen is not None:
            later = self.seen.evidence(self.device, clock)
            if later.counter > evidence.counter:
                evidence = msgspec.structs.replace(evidence, counter=later.counter, prev=later.prev)
        last = self.state.last_sent(self.collab_id, self.device)
        if last is not None and last.counter >= evidence.counter:
            evidence = msgspec.structs.replace(
                evidence, counter=last.counter + 1, prev=last.event_id
            )
        return evidence

    async def resend_unacked(self, client: Client) -> list[SentEvent]:
        """Send again, in order, the stream's events whose outcome was never recorded; return
        those the relay has now stored (acked). Raises what `Client.append` raises, except the
        refusals in NOT_STORED, after which the event is forgotten."""
        stored: list[SentEvent] = []
        for kept in self.state.unacked(self.collab_id, self.device):
            try:
                ack = await client.append(kept.signed)
            except RelayRefused as exc:
                if exc.code not in NOT_STORED:
                    raise
                self.state.forget_signed(self.collab_id, self.device, kept.counter)
                continue
            self.state.mark_stored(self.collab_id, self.device, kept.counter, ack.seq)
            stored.append(kept)
        return stored

    async def send(
        self,
        client: Client,
        box_key: nacl.public.PrivateKey,
        seal: Callable[[CollabView, contentmod.Evidence], SignedEvent],
        *,
        intent: bytes,
        source: int = 0,
        view: CollabView | None = None,
        history: History | None = None,
        once: bool = False,
        read: Callable[[], Awaitable[CollabView]] | None = None,
    ) -> Sent:
        """Seal (with the stream's next evidence), keep, then append one event for `intent`.

        Unacked events of the stream are sent again first. If one of them was made for `intent`
        (an interrupted earlier attempt), its seq is returned and nothing new is signed; with
        `once` (a bot's replayed handler), so is the seq of any kept stored event for `intent`.
        Without `once` an intent whose event was acked is simply posted again: a person who
        repeats a finished command means it. `view`/`history`/`read` are
        as for `Client.seal_and_append`, which does the append (and seals again under a new key
        after a `stale` bounce: the bounced event's counter is freed first). A refusal in
        NOT_STORED forgets the event and is raised; any other error leaves it kept.
        """
        done = self.state.sent_for(self.collab_id, self.device, intent)
        interrupted = done is not None and done.seq is None
        if done is None or done.seq is None:
            await self.resend_unacked(client)
            done = self.state.sent_for(self.collab_id, self.device, intent)
        if done is not None and done.seq is not None and (interrupted or once):
            return Sent(done.seq, earlier=True)
        attempt: list[int] = []

        def keep_and_seal(v: CollabView) -> SignedEvent:
            if attempt:  # bounced as `stale`: not stored, its counter is free
                self.state.forget_signed(self.collab_id, self.device, attempt.pop())
            evidence = self.evidence(v, int(time.time() * 1000))
            signed = seal(v, evidence)
            self.state.keep_signed(
                SentEvent(
                    self.collab_id,
                    self.device,
                    evidence.counter,
                    event_id(signed),
                    signed,
                    intent,
                    source,
                    None,
                )
            )
            attempt.append(evidence.counter)
            return signed

        try:
            ack, _ = await client.seal_and_append(
                self.collab_id, box_key, keep_and_seal, view=view, history=history, read=read
            )
        except RelayRefused as exc:
            if attempt and exc.code in NOT_STORED:
                self.state.forget_signed(self.collab_id, self.device, attempt.pop())
            raise
        self.state.mark_stored(self.collab_id, self.device, attempt[-1], ack.seq)
        return Sent(ack.seq, earlier=ack.duplicate)
