"""A lying relay for tests: rewrite a collab's history the ways a compromised relay could.

Importable by teams testing their bots and deployments (`from clientkit.testing import …`).
Two layers:

- `lie(history, Misbehaviour)` — pure: takes the honest history (seq, event, chain) and returns
  what a lying relay would present instead. Every rewrite that renumbers also *re-chains*, as a
  real relay can (the chain is computed by the relay, not signed by authors), so the lie is
  internally consistent and only the evidence inside events, the author streams and saved heads
  can expose it.
- `LyingRelay` — a WebSocket proxy that sits between clients and a real relay, passes every
  request through, and presents each non-following subscription's history through `lie` (and can
  forge `appended` receipts: `Lie.FORGE_RECEIPT`, `TAMPER_INCLUSION` and the `_RECEIPT_LIES`). One misbehaviour per client connection, or none.

Hypothesis strategies for schedules are in `misbehaviours`.
"""

from __future__ import annotations

import enum
import hashlib
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from model import wire
from model.chain import Head, next_head, start_of
from model.checkpoints import CheckpointSigner, clock_name
from model.envelope import SequencedEvent, SignedEvent, decode_body, event_id
from model.merkle import LeafTree, leaf_hash
from model.note import parse_note
from model.tlog import add_signatures, parse_checkpoint

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    import hypothesis.strategies as st


class Lie(enum.StrEnum):
    """The misbehaviour classes of issue 5 (docs/ordering.md has what each one triggers)."""

    GAP = "gap"  # drop one event, leave its seq empty
    DROP = "drop"  # drop one event, renumber and re-chain the rest (a consistent fork)
    SWAP = "swap"  # deliver two neighbours in the other order, re-chained
    DUPLICATE = "duplicate"  # deliver one event twice at the same seq
    REPLAY = "replay"  # append an old event again at the end, re-chained
    TAMPER = "tamper"  # flip one byte of a body
    # Flip one byte of a body's ciphertext and re-chain from it, as a relay inventing content
    # would: the body decodes and the chain holds, only the author's signature shows the lie.
    FORGE = "forge"
    SPLICE = "splice"  # replace an event with one from another collab
    TRUNCATE = "truncate"  # withhold the tail: stop early, claim to be caught up
    FORGE_RECEIPT = "forge_receipt"  # ack at another seq than its receipt's leaf index
    DELAY = "delay"  # hold a subscription's history back for a while, then deliver it honestly
    INVENT_WITHHELD = "invent_withheld"  # a made-up `withheld` DM link after the real head
    RELABEL_WITHHELD = "relabel_withheld"  # show a real event as a `withheld` DM between others
    # Signed-checkpoint lies (ADR-0020); the first two need the relay's key (`LyingRelay.signer`):
    # a compromised relay signs them itself.
    BEHIND = "behind"  # truncate before `at` and sign that smaller head as the newest (later)
    FORK_HEAD = "fork_head"  # sign caught_up's head over another root (a forked history)
    TAMPER_INCLUSION = "tamper_inclusion"  # flip a byte of an ack's inclusion proof
    SILENCE = "silence"  # stop heartbeats: drop every `checkpoint` push (everything else honest)
    # Receipt lies (an ack's receipt is its checkpoint and inclusion proof, ADR-0020):
    STRIP_RECEIPT = "strip_receipt"  # ack without its checkpoint and inclusion proof
    FOREIGN_CHECKPOINT = "foreign_checkpoint"  # the ack's checkpoint, signed by another key
    EXCLUDE_EVENT = "exclude_event"  # (needs `signer`) a signed tree without the acked event
    # Withhold the newest events from a follower (needs `signer`): honest up to the first
    # `caught_up`, then every later event is hidden and each heartbeat is that head re-signed
    # with a fresh date, carrying the witness cosignatures it came with (the best a relay can do:
    # an honest witness that saw a larger tree will not cosign the old one again).
    FREEZE = "freeze"
    # Hide the first live event from a follower (after its `caught_up`) and pass the relay's
    # heartbeats on unchanged: heads the witnesses cosigned, of the history that holds it. A
    # relay showing its witnesses one history and a member another, with real cosignatures.
    HIDE_LIVE = "hide_live"
    # Bend the proof that a heartbeat's head extends the older head its witnesses cosigned
    # (`witnessed_proof`, sent when commits outran them): a head of another history than theirs.
    BEND_WITNESSED = "bend_witnessed"
    # (needs `signer`) Replace a heartbeat's `witnessed` head by the same tree signed again by the
    # relay's key, dated now, with no witness's line: a date the witnesses never gave.
    UNWITNESSED = "unwitnessed"


@dataclass(frozen=True)
class Misbehaviour:
    lie: Lie
    at: int  # the seq it applies to (1-based, in the honest history)
    foreign: SequencedEvent | None = None  # for SPLICE: an event of another collab
    only_first: bool = False  # lie to a connection's first subscription only (then be honest)


History = list[SequencedEvent]
DELAY_SECONDS = 0.5  # how long `Lie.DELAY` holds a history back (slow is not a lie)


def rechain(collab_id: str, events: Sequence[SignedEvent], after: Head | None = None) -> History:
    """Number `events` after `after` (default: the genesis) and chain them, as a relay does."""
    head = after or start_of(collab_id)
    out: History = []
    for signed in events:
        head = Head(head.seq + 1, next_head(head.chain, event_id(signed)))
        out.append(SequencedEvent(collab_id, head.seq, signed, head.chain))
    return out


def lie(history: Sequence[SequencedEvent], m: Misbehaviour) -> History:
    """What a relay telling lie `m` presents instead of the honest `history`.

    `history` may be a resumed stretch (not starting at seq 1); a lie about a seq it does not
    hold changes nothing, and lies that re-chain need the event before `m.at` (or seq 1).
    """
    events = list(history)
    at = [e.seq for e in events].index(m.at) if any(e.seq == m.at for e in events) else None
    if at is None:
        return events
    collab_id = events[0].collab_id
    before = events[:at]
    after = Head(before[-1].seq, before[-1].chain) if before else None
    if after is None and events[0].seq != 1 and m.lie in _RECHAINING:
        return events  # the chain before this stretch is unknown to the proxy

    def rechained(tail: list[SignedEvent]) -> History:
        return [*before, *rechain(collab_id, tail, after)]

    rest = [e.event for e in events[at:]]
    match m.lie:
        case Lie.GAP:
            return [*before, *events[at + 1 :]]
        case Lie.DROP:
            return rechained(rest[1:])
        case Lie.SWAP:
            if len(rest) > 1:
                rest[0], rest[1] = rest[1], rest[0]
            return rechained(rest)
        case Lie.DUPLICATE:
            return [*before, events[at], *events[at:]]
        case Lie.REPLAY:
            last = events[-1]
            return [*events, *rechain(collab_id, [events[at].event], Head(last.seq, last.chain))]
        case Lie.TAMPER:
            body = bytearray(events[at].event.body)
            body[-1] ^= 1
            tampered = SignedEvent(bytes(body), events[at].event.sig)
            return [*before, msgspec.structs.replace(events[at], event=tampered), *events[at + 1 :]]
        case Lie.FORGE:
            decoded = decode_body(rest[0].body)
            ciphertext = bytes([decoded.ciphertext[0] ^ 1]) + decoded.ciphertext[1:]
            forged = msgspec.msgpack.encode(msgspec.structs.replace(decoded, ciphertext=ciphertext))
            return rechained([SignedEvent(forged, rest[0].sig), *rest[1:]])
        case Lie.SPLICE:
            assert m.foreign is not None, "SPLICE needs an event of another collab"
            return rechained([m.foreign.event, *rest[1:]])
        case Lie.TRUNCATE:
            return before
        case Lie.BEHIND:
            return before
        case (
            Lie.FORGE_RECEIPT
            | Lie.DELAY
            | Lie.INVENT_WITHHELD
            | Lie.RELABEL_WITHHELD
            | Lie.FORK_HEAD
            | Lie.TAMPER_INCLUSION
            | Lie.STRIP_RECEIPT
            | Lie.FOREIGN_CHECKPOINT
            | Lie.EXCLUDE_EVENT
            | Lie.FREEZE
            | Lie.HIDE_LIVE
            | Lie.BEND_WITNESSED
            | Lie.UNWITNESSED
        ):
            return events  # told on the wire (`LyingRelay`, `withheld_lie`), not as events
    raise AssertionError(m)  # pragma: no cover


_RECHAINING = frozenset({Lie.DROP, Lie.SWAP, Lie.SPLICE, Lie.FORGE})
_RECEIPT_LIES = frozenset({Lie.STRIP_RECEIPT, Lie.FOREIGN_CHECKPOINT, Lie.EXCLUDE_EVENT})
WITHHELD_LIES = frozenset({Lie.INVENT_WITHHELD, Lie.RELABEL_WITHHELD})
# Lies told frame by frame on a subscription's stream, live ones included (`_on_stream`), not
# about the catch-up history `_present` holds back until `caught_up`.
_STREAM_LIES = frozenset({Lie.FREEZE, Lie.HIDE_LIVE, Lie.BEND_WITNESSED, Lie.UNWITNESSED})


def withheld_lie(
    history: Sequence[SequencedEvent], m: Misbehaviour
) -> list[wire.Event | wire.Withheld]:
    """The frames a relay telling `m` (one of `WITHHELD_LIES`) presents for `history`.

    The relay holds every real event, so its lie is as good as it can make it: the chain always
    extends, the link names real members (the collab's first author, and the author of the
    event at `m.at` or someone else), and a relabelled event keeps its real id and its author's
    real signature. What it cannot make is the author's signature over a DM header.
    """
    frames: list[wire.Event | wire.Withheld] = [
        wire.Event(collab_id=e.collab_id, seq=e.seq, event=e.event, chain=e.chain) for e in history
    ]
    at = next((i for i, e in enumerate(history) if e.seq == m.at), None)
    if not history or at is None:
        return frames
    bodies = [decode_body(e.event.body) for e in history]
    target = history[at]
    if m.lie is Lie.RELABEL_WITHHELD:
        body = bodies[at]
        recipient = next((b.actor_id for b in bodies if b.actor_id != body.actor_id), body.actor_id)
        eid = event_id(target.event)
        frames[at] = _withheld(
            target, eid, target.chain, body.actor_id, recipient, body.epoch, target.event.sig
        )
        return frames
    last = history[-1]
    author = bodies[0].actor_id
    recipient = next(
        (b.actor_id for b in (bodies[at], *bodies) if b.actor_id != author), bodies[at].actor_id
    )
    eid = os.urandom(32)
    invented = SequencedEvent(last.collab_id, last.seq + 1, last.event, next_head(last.chain, eid))
    frames.append(
        _withheld(
            invented, eid, invented.chain, author, recipient, bodies[-1].epoch, os.urandom(64)
        )
    )
    return frames


def _withheld(
    at: SequencedEvent,
    eid: bytes,
    chain: bytes,
    author_id: str,
    recipient_id: str,
    epoch: int,
    sig: bytes,
) -> wire.Withheld:
    fields: dict[str, Any] = {
        "collab_id": at.collab_id,
        "seq": at.seq,
        "event_id": eid,
        "chain": chain,
        "author_id": author_id,
        "recipient_id": recipient_id,
        "epoch": epoch,
        "sealed": os.urandom(32),
        "sig": sig,
    }
    # Only the fields this protocol version's frame has (a harness that lies to older clients
    # too: they were fooled by a bare position).
    return wire.Withheld(
        **{k: v for k, v in fields.items() if k in wire.Withheld.__struct_fields__}
    )


def misbehaviours(length: int, lies: Sequence[Lie] = tuple(Lie)) -> st.SearchStrategy[Misbehaviour]:
    """Hypothesis strategy: one misbehaviour somewhere in a history of `length` events."""
    import hypothesis.strategies as st

    return st.builds(Misbehaviour, st.sampled_from(list(lies)), st.integers(1, max(length, 1)))


def _hide_live(frame: wire.Reply, live: dict[str, bool]) -> list[wire.Reply]:
    """`Lie.HIDE_LIVE`: every frame but the first event after a collab's `caught_up`."""
    match frame:
        case wire.CaughtUp():
            live.setdefault(frame.collab_id, False)
        case wire.Event() if live.get(frame.collab_id) is False:
            live[frame.collab_id] = True
            return []
    return [frame]


def _bend_witnessed(frame: wire.Reply) -> wire.Reply:
    """`Lie.BEND_WITNESSED`: a byte of a heartbeat's `witnessed_proof` flipped."""
    if not isinstance(frame, wire.TreeHead) or not frame.witnessed_proof:
        return frame
    first, *rest = frame.witnessed_proof
    bent = bytes([first[0] ^ 1]) + first[1:]
    return msgspec.structs.replace(frame, witnessed_proof=[bent, *rest])


# --- the proxy ------------------------------------------------------------------------------------


@dataclass
class LyingRelay:
    """A WebSocket proxy in front of `upstream`. `plan(n)` picks the lie for the n-th client
    connection (None: honest). `url` is set once `serve` has started."""

    upstream: str
    plan: Callable[[int], Misbehaviour | None] = lambda _n: None
    # The relay's own checkpoint key, for the lies a compromised relay signs (`Lie.BEHIND`,
    # `Lie.FORK_HEAD`): `model.checkpoints.CheckpointSigner(relay name, relay seed)`.
    signer: CheckpointSigner | None = None
    url: str = ""
    connections: int = 0
    told: list[Misbehaviour] = field(default_factory=list)
    # collab -> the seq before its latest subscription's first: where an empty catch-up ends
    # (a device resuming from its kept view subscribes past seq 1).
    _before: dict[str, int] = field(default_factory=dict)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve for the duration of the block; yields the URL clients should connect to.

        An error raised in the block (an alarm, say) comes out as itself, not wrapped in the
        proxy's task group."""
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            url = await nursery.start(self.serve)
            try:
                yield url
            except BaseException as exc:  # noqa: BLE001 — re-raised below, outside the group
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(
                    serve_websocket,
                    self._handle,
                    "127.0.0.1",
                    0,
                    None,
                    max_message_size=wire.WS_HARD_LIMIT,
                )
            )
            self.url = f"ws://127.0.0.1:{server.port}"
            task_status.started(self.url)

    async def _handle(self, request: WebSocketRequest) -> None:
        client = await request.accept()
        self.connections += 1
        misbehaviour = self.plan(self.connections)
        if misbehaviour is not None:
            self.told.append(misbehaviour)
        try:
            async with (
                open_websocket_url(self.upstream, max_message_size=wire.WS_HARD_LIMIT) as relay,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(self._pump_up, client, relay, nursery.cancel_scope)
                await self._pump_down(relay, client, misbehaviour)
                nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass

    @staticmethod
    async def _pump_up(
        client: WebSocketConnection, relay: WebSocketConnection, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                await relay.send_message(await client.get_message())
        except ConnectionClosed:
            scope.cancel()

    async def _pump_down(
        self, relay: WebSocketConnection, client: WebSocketConnection, m: Misbehaviour | None
    ) -> None:
        held: dict[str, History] = {}  # collab -> catch-up events held back until caught_up
        # collab -> the head a `Lie.FREEZE` keeps showing, or whether `Lie.HIDE_LIVE` hid yet
        stream: dict[str, Any] = {}
        lied = 0
        while True:
            data = await relay.get_message()
            for frame in wire.unbatch_replies(data):  # type: ignore[arg-type]
                if m is not None and m.only_first and lied and isinstance(frame, wire.Subscribed):
                    m = None  # one lie told; honest from the next subscription on
                if isinstance(frame, wire.CaughtUp) and frame.collab_id in held:
                    lied += 1
                    if m is not None and m.lie is Lie.DELAY:
                        await trio.sleep(DELAY_SECONDS)
                if m is not None and m.lie in _STREAM_LIES:
                    presented = self._on_stream(frame, m.lie, stream)
                else:
                    presented = self._present(frame, held, m)
                for out in presented:
                    await client.send_message(wire.encode(out))

    def _on_stream(self, frame: wire.Reply, lie: Lie, stream: dict[str, Any]) -> list[wire.Reply]:
        match lie:
            case Lie.FREEZE:
                return self._freeze(frame, stream)
            case Lie.HIDE_LIVE:
                return _hide_live(frame, stream)
            case Lie.BEND_WITNESSED:
                return [_bend_witnessed(frame)]
            case _:
                return [self._unwitnessed(frame)]

    def _unwitnessed(self, frame: wire.Reply) -> wire.Reply:
        """`Lie.UNWITNESSED`: the heartbeat's `witnessed` tree, dated now by the relay alone."""
        if not isinstance(frame, wire.TreeHead) or not frame.witnessed:
            return frame
        assert self.signer is not None, "Lie.UNWITNESSED needs the relay's key"
        cp = parse_checkpoint(parse_note(frame.witnessed).text)
        alone = self.signer.sign(frame.collab_id, cp.size, cp.root, int(time.time()))
        return msgspec.structs.replace(frame, witnessed=alone)

    def _empty_end(self, collab_id: str, m: Misbehaviour) -> int:
        """Where a catch-up that presents no event says the history ends: before the
        subscription's first seq, or before `m.at` for a lie that cuts the history there."""
        before = self._before.get(collab_id, 0)
        return min(before, m.at - 1) if m.lie in (Lie.TRUNCATE, Lie.BEHIND) else before

    def _present(
        self, frame: wire.Reply, held: dict[str, History], m: Misbehaviour | None
    ) -> list[wire.Reply]:
        if m is None:
            return [frame]
        if m.lie is Lie.SILENCE:
            return [] if isinstance(frame, wire.TreeHead) else [frame]
        match frame:
            case wire.Subscribed():
                held[frame.collab_id] = []
                self._before[frame.collab_id] = frame.from_seq - 1
                return [frame]
            case wire.Withheld() if frame.collab_id in held and m.lie in WITHHELD_LIES:
                return []  # the lie needs real DM links kept in order; none here to lie about
            case wire.Event() if frame.collab_id in held:
                held[frame.collab_id].append(
                    SequencedEvent(frame.collab_id, frame.seq, frame.event, frame.chain)
                )
                return []
            case wire.CaughtUp() if frame.collab_id in held and m.lie in WITHHELD_LIES:
                frames = withheld_lie(held.pop(frame.collab_id), m)
                last = frames[-1].seq if frames else self._empty_end(frame.collab_id, m)
                return [*frames, wire.CaughtUp(collab_id=frame.collab_id, seq=last)]
            case wire.CaughtUp() if frame.collab_id in held:
                presented = lie(held.pop(frame.collab_id), m)
                last = presented[-1].seq if presented else self._empty_end(frame.collab_id, m)
                return [
                    *(wire.Event(collab_id=e.collab_id, seq=e.seq, event=e.event, chain=e.chain)
                      for e in presented),
                    self._signed_caught_up(frame, presented, last, m),
                ]  # fmt: skip
            case wire.Appended() if m.lie is Lie.FORGE_RECEIPT:
                return [msgspec.structs.replace(frame, seq=frame.seq + 1)]
            case wire.Appended() if m.lie is Lie.TAMPER_INCLUSION and frame.inclusion:
                first = bytes([frame.inclusion[0][0] ^ 1]) + frame.inclusion[0][1:]
                return [msgspec.structs.replace(frame, inclusion=[first, *frame.inclusion[1:]])]
            case wire.Appended() if m.lie in _RECEIPT_LIES:
                return [self._lying_receipt(frame, m)]
        return [frame]

    def _lying_receipt(self, frame: wire.Appended, m: Misbehaviour) -> wire.Appended:
        """An ack whose receipt does not prove its event stored: stripped, re-signed under a key
        that is not the relay's, or (with the relay's own key) over a tree without the event."""
        if m.lie is Lie.STRIP_RECEIPT:
            return msgspec.structs.replace(frame, checkpoint=b"", inclusion=[])
        text = frame.checkpoint.decode().split("\n\n", 1)[0] + "\n"
        honest = parse_checkpoint(text)
        relay_name = honest.origin.removesuffix(f"/collab/{frame.collab_id}")
        when = int(time.time())
        if m.lie is Lie.FOREIGN_CHECKPOINT:
            other = CheckpointSigner(relay_name, os.urandom(32))
            note = other.sign(frame.collab_id, honest.size, honest.root, when)
            return msgspec.structs.replace(frame, checkpoint=note)
        assert self.signer is not None, "EXCLUDE_EVENT needs the relay's key (`signer`)"
        tree = LeafTree(leaf_hash(os.urandom(32)) for _ in range(honest.size))
        note = self.signer.sign(frame.collab_id, honest.size, tree.root(), when)
        proof = list(tree.inclusion_proof(frame.seq - 1))
        return msgspec.structs.replace(frame, checkpoint=note, inclusion=proof)

    def _freeze(self, frame: wire.Reply, frozen: dict[str, bytes]) -> list[wire.Reply]:
        match frame:
            case wire.CaughtUp() if frame.collab_id not in frozen and frame.checkpoint:
                frozen[frame.collab_id] = frame.checkpoint
            case wire.Event() | wire.Withheld() if frame.collab_id in frozen:
                return []
            case wire.TreeHead() if frame.collab_id in frozen:
                return [self._refreshed(frame.collab_id, frozen[frame.collab_id])]
        return [frame]

    def _refreshed(self, collab_id: str, note: bytes) -> wire.TreeHead:
        """`note`'s tree signed again by the relay's key, dated now, with the witness lines it
        had (a cosignature is over the checkpoint text, so old lines still verify)."""
        assert self.signer is not None, "Lie.FREEZE needs the relay's key"
        parsed = parse_note(note)
        cp = parse_checkpoint(parsed.text)
        own = {cp.origin, clock_name(self.signer.relay_name)}
        fresh = self.signer.sign(collab_id, cp.size, cp.root, int(time.time()))
        lines = [sig for sig in parsed.signatures if sig.name not in own]
        return wire.TreeHead(
            collab_id=collab_id,
            checkpoint=add_signatures(fresh, lines) if lines else fresh,
            proof_from=cp.size,
            consistency=[],
        )

    def _signed_caught_up(
        self, frame: wire.CaughtUp, presented: History, last: int, m: Misbehaviour
    ) -> wire.CaughtUp:
        """The `caught_up` a lying relay sends after `presented`: for the checkpoint lies, one
        it signs with its own key (dated a second on, so the lie is the newer statement)."""
        if m.lie not in (Lie.BEHIND, Lie.FORK_HEAD) or self.signer is None:
            return wire.CaughtUp(collab_id=frame.collab_id, seq=last)
        if m.lie is Lie.FORK_HEAD:
            # The honest size and proof, over a root of another history.
            forged = hashlib.sha256(b"another history" + frame.checkpoint).digest()
            note = self.signer.sign(frame.collab_id, frame.seq, forged, int(time.time()) + 1)
            return msgspec.structs.replace(frame, checkpoint=note)
        # BEHIND: the real tree of what it presents (a history read from seq 1), as the newest.
        tree = LeafTree(leaf_hash(event_id(e.event)) for e in presented)
        note = self.signer.sign(frame.collab_id, last, tree.root(), int(time.time()) + 1)
        return wire.CaughtUp(collab_id=frame.collab_id, seq=last, checkpoint=note)
