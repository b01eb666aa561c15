"""The connection under `Client`: one WebSocket, requests matched by rid, raw subscriptions.

A reader task owns the socket's receive side and routes every frame: replies go to the waiting
request, pushed events go to their collab's subscription channel, a download's pieces to its
stream. Requests that change state are signed here (`use_key`, `signed`). What lives elsewhere:
accounts and agents calls (`_accounts.py`), verified history (`_history.py`), the append
pipeline and collab management (`_appends.py`), artifacts (`_artifacts.py`); `Client`
(`_client.py`) puts them together.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, TypeVar

import msgspec
import trio
from trio_websocket import ConnectionClosed

from clientkit._checkpoints import CheckpointBook
from clientkit._retry import backoff_delay
from clientkit.errors import ConnectionLost, ProtocolMismatch, RelayRefused, TooManyConnections
from model import checkpoints, wire
from model.proofs import sign_request
from model.protocol import PROTOCOL, announced_protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import nacl.signing
    import trio_websocket

R = TypeVar("R", bound=wire.Reply)
S = TypeVar("S", bound=wire.Request)
SUBSCRIPTION_BUFFER: Final = 10_000
# Refusals with `overloaded` are retried with jittered exponential backoff from RETRY_START
# doubling up to RETRY_CAP (appends: `_appends.py`; subscribes: here).
RETRY_START: Final = 0.05
RETRY_CAP: Final = 2.0
# `overloaded` refusals of subscribes (the relay's catch-up caps) are retried for this long.
SUBSCRIBE_RETRY_FOR: Final = 30.0


class StaleBound(enum.Enum):
    """`Client.stale_after = StaleBound.FROM_RELAY` (the default): the relay's announced
    heartbeat interval plus a grace, rather than a number of seconds; never looser than the
    45 s default (`model.checkpoints.stale_after`)."""

    FROM_RELAY = "from_relay"


class ClientCore:
    """The connection plumbing every part of `Client` builds on."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._rids = itertools.count(1)
        self._waiters: dict[int, trio.MemorySendChannel[wire.Reply]] = {}
        self._subs: dict[str, trio.MemorySendChannel[wire.Reply]] = {}
        self._draining: set[str] = set()  # unsubscribing: late frames are dropped
        self._streams: dict[int, trio.MemorySendChannel[wire.Reply]] = {}  # multi-reply requests
        self._one_shot: set[str] = set()  # subscriptions without follow
        self._finished: set[str] = set()  # one-shot subscriptions the relay has completed
        self._welcome = trio.Event()
        self._closed: ConnectionLost | ProtocolMismatch | None = None
        self.relay_pk = b""
        self.challenge = b""  # this connection's, from `Welcome`: signed requests sign it
        self.account_id: str | None = None
        # The account's own signing key, once the caller unlocked it (`use_key`): requests that
        # change state are signed with it. Without it they go unsigned and the relay refuses
        # them (`bad_signature`): a login session alone can only read.
        self._signing_key: nacl.signing.SigningKey | None = None
        # The relay's signed checkpoints this client holds per collab (clientkit/_checkpoints.py);
        # a caller with durable state gives it a store.
        self.checkpoints = CheckpointBook()
        # The staleness bound, in seconds (ADR-0020): a following `History` that has received no
        # signed checkpoint dated within it raises `StaleView`. By default (`FROM_RELAY`) it
        # follows the heartbeat interval the relay announced in `welcome` plus a grace
        # (`model.checkpoints.stale_after`: 45 s for the default 30 s, or when none was
        # announced); a number sets it, `None` turns the check off.
        self.stale_after: float | StaleBound | None = StaleBound.FROM_RELAY
        self.heartbeat_ms = 0  # as the relay announced it in `welcome` (0: not announced)
        # Liveness, for a watchdog (the bot's): when a message last arrived, and whether the
        # reader is waiting for a slow consumer to take a pushed frame (then the relay is not
        # silent: this side is busy, and the pong waits behind the frames it already sent).
        self._last_heard = 0.0
        self._backpressured = False

    def staleness_bound(self) -> float | None:
        """The bound in force, in seconds (None: off): `stale_after`, resolved."""
        if self.stale_after is StaleBound.FROM_RELAY:
            return checkpoints.stale_after(self.heartbeat_ms)
        return self.stale_after

    # --- plumbing -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._ws.get_message()
                self._last_heard = trio.current_time()
                if not self._welcome.is_set():
                    # Before our own frame types read it: a newer relay's welcome may not decode.
                    announced = announced_protocol(message) if isinstance(message, bytes) else None
                    if announced != PROTOCOL:
                        raise ProtocolMismatch(announced)
                for frame in wire.unbatch_replies(message):  # type: ignore[arg-type]
                    await self._route(frame)
        except ProtocolMismatch as exc:
            self._fail(exc)
            await self._ws.aclose(wire.CloseCode.PROTOCOL_ERROR, "protocol mismatch")
        except ConnectionClosed as exc:
            reason = exc.reason
            self._fail(
                ConnectionLost(reason.code if reason else None, reason.reason if reason else None)
            )
        except wire.MalformedFrame:
            self._fail(ConnectionLost(None, "relay sent a frame this client cannot read"))
            await self._ws.aclose(wire.CloseCode.PROTOCOL_ERROR, "malformed frame")
        finally:
            # Cancelled with its connection (the caller's scope ended): no reply can arrive any
            # more, so a request still waiting, such as a subscription's shielded unsubscribe on
            # the way out, raises ConnectionLost now instead of waiting out its timeout.
            if self._closed is None:
                self._fail(ConnectionLost(None, "the connection was closed"))

    async def _route(self, frame: wire.Reply) -> None:
        match frame:
            case wire.Welcome():
                self.relay_pk = frame.relay_pk
                self.challenge = frame.challenge
                self.heartbeat_ms = frame.heartbeat_ms
                self._welcome.set()
            case (
                wire.Event()
                | wire.Withheld()
                | wire.CaughtUp()
                | wire.TreeHead()
                | wire.SubscriptionEnded()
            ):
                chan = self._subs.get(frame.collab_id)
                if chan is not None and frame.collab_id not in self._draining:
                    if isinstance(frame, wire.CaughtUp) and frame.collab_id in self._one_shot:
                        self._finished.add(frame.collab_id)  # the relay ended it
                    try:
                        chan.send_nowait(frame)
                    except trio.WouldBlock:
                        self._backpressured = True
                        try:
                            await chan.send(frame)
                        finally:
                            self._backpressured = False
            case _:
                rid = getattr(frame, "rid", None)
                stream = self._streams.get(rid) if isinstance(rid, int) else None
                if stream is not None:
                    # A multi-reply request (a download): pieces, or the error ending it. A
                    # consumer that left early closed its end; the rest is dropped.
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send(frame)
                    return
                waiter = self._waiters.pop(rid, None) if rid is not None else None
                if waiter is not None:
                    waiter.send_nowait(frame)

    def heard_since(self, when: float) -> bool:
        """Whether the relay showed it is alive since `when` (Trio time): a message arrived,
        or the reader is held up by this client's own slow consumer."""
        return self._last_heard >= when or self._backpressured

    def _fail(self, err: ConnectionLost | ProtocolMismatch) -> None:
        self._closed = err
        self._welcome.set()
        for w in self._waiters.values():
            w.close()
        self._waiters.clear()
        for s in self._subs.values():
            s.close()
        self._subs.clear()
        for st in self._streams.values():
            st.close()
        self._streams.clear()

    async def request(self, build: Callable[[int], wire.Request], expect: type[R]) -> R:
        """Send one request and wait for its reply. Raises `RelayRefused` on an error frame."""
        rid, reply = self._expect_reply()
        await self._send(wire.encode(build(rid)))
        return await self._reply(reply, expect)

    def use_key(self, signing_key: nacl.signing.SigningKey) -> None:
        """Sign this connection's changing requests (agents, tool calls, uploads, password
        and session changes) with `signing_key`: the logged-in account's own key (a person's
        account key, a bot's agent key). Nothing else is signed with it."""
        self._signing_key = signing_key

    def signed(self, build: Callable[[int], S]) -> Callable[[int], S]:
        """`build`, with the request signed by the key from `use_key` for this connection
        (unsigned without one: the relay then refuses it with `bad_signature`). The kit's own
        methods use it; use it with `request` for a signed request type built by hand."""
        key, account_id = self._signing_key, self.account_id
        if key is None or account_id is None:
            return build

        def build_signed(rid: int) -> S:
            request = build(rid)
            sig = sign_request(key, self.challenge, account_id, request)
            return msgspec.structs.replace(request, sig=sig)

        return build_signed

    async def _send(self, message: bytes) -> None:
        """Send one WebSocket message; a connection that closed meanwhile raises
        `ConnectionLost` (as a reply that never comes does), never trio-websocket's own error,
        so callers retry on one type."""
        try:
            await self._ws.send_message(message)
        except ConnectionClosed as exc:
            reason = exc.reason
            raise self._closed or ConnectionLost(
                reason.code if reason else None, reason.reason if reason else None
            ) from None

    def _expect_reply(self) -> tuple[int, trio.MemoryReceiveChannel[wire.Reply]]:
        """A fresh rid and the channel its one reply will arrive on."""
        if self._closed is not None:
            raise self._closed
        rid = next(self._rids)
        send, recv = trio.open_memory_channel[wire.Reply](1)
        self._waiters[rid] = send
        return rid, recv

    async def _reply(self, recv: trio.MemoryReceiveChannel[wire.Reply], expect: type[R]) -> R:
        try:
            reply = await recv.receive()
        except trio.EndOfChannel:
            raise self._closed or ConnectionLost() from None
        if isinstance(reply, wire.Error):
            if reply.code is wire.ErrorCode.TOO_MANY_CONNECTIONS:
                raise TooManyConnections(reply.message)
            raise RelayRefused(reply.code, reply.message, head_seq=reply.head_seq)
        if not isinstance(reply, expect):
            raise RelayRefused(wire.ErrorCode.INTERNAL, f"unexpected reply {type(reply).__name__}")
        return reply

    def _me(self) -> str:
        if self.account_id is None:
            raise RelayRefused(wire.ErrorCode.UNAUTHENTICATED, "log in first")
        return self.account_id

    @asynccontextmanager
    async def subscribe(
        self, collab_id: str, from_seq: int = 1, *, follow: bool = True
    ) -> AsyncIterator[trio.MemoryReceiveChannel[wire.Reply]]:
        """Raw pushed frames (`Event`, `CaughtUp`, `SubscriptionEnded`) for one collab.

        One subscription per collab per connection at a time. Leaving the block early
        unsubscribes and waits for the relay's confirmation, so no frame of this subscription
        can leak into a later one.
        """
        if collab_id in self._subs:
            raise RelayRefused(wire.ErrorCode.INVALID_REQUEST, f"already subscribed to {collab_id}")
        send, recv = trio.open_memory_channel[wire.Reply](SUBSCRIPTION_BUFFER)
        self._subs[collab_id] = send
        if not follow:
            self._one_shot.add(collab_id)
        try:
            await self._subscribe(collab_id, from_seq, follow=follow)
            yield recv
        finally:
            self._draining.add(collab_id)
            try:
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    if self._closed is None and collab_id not in self._finished:
                        await self.request(
                            lambda rid: wire.Unsubscribe(rid=rid, collab_id=collab_id),
                            wire.Unsubscribed,
                        )
            except (RelayRefused, ConnectionLost):
                pass  # already finished on the relay's side, or the connection is gone
            finally:
                self._draining.discard(collab_id)
                self._one_shot.discard(collab_id)
                self._finished.discard(collab_id)
                self._subs.pop(collab_id, None)

    async def _subscribe(self, collab_id: str, from_seq: int, *, follow: bool) -> None:
        """Send `subscribe` until it is accepted. The relay caps how many catch-ups run at once
        (per connection, account and relay) and refuses more with `overloaded`: those are sent
        again after a jittered exponential backoff, for at most SUBSCRIBE_RETRY_FOR seconds,
        after which the refusal is raised."""
        deadline = trio.current_time() + SUBSCRIBE_RETRY_FOR
        attempt = 0
        while True:
            try:
                await self.request(
                    lambda rid: wire.Subscribe(
                        rid=rid,
                        collab_id=collab_id,
                        from_seq=from_seq,
                        follow=follow,
                        tree_size=self.checkpoints.tree_size(self.relay_pk, collab_id),
                    ),
                    wire.Subscribed,
                )
            except RelayRefused as exc:
                left = deadline - trio.current_time()
                if exc.code is not wire.ErrorCode.OVERLOADED or left <= 0:
                    raise
            else:
                return
            await trio.sleep(min(backoff_delay(attempt, start=RETRY_START, cap=RETRY_CAP), left))
            attempt += 1
