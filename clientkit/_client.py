"""The async client: one WebSocket connection to a relay, requests matched by rid.

A reader task owns the socket's receive side and routes every frame: replies go to the waiting
request, pushed events go to their collab's subscription channel. Everything the relay sends is
treated as untrusted: events are verified (author signature, canonical body, collab binding,
contiguous seq, recomputed chain) and decrypted before a caller sees them, and acks are checked
against the relay's signed receipt.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import random
import secrets
import time
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Final, TypeVar

import msgspec
import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from clientkit import _collab
from clientkit._transport import CONNECT_TIMEOUT, open_websocket
from clientkit.errors import (
    AccessRefused,
    AccountTakeoverDetected,
    ConnectionLost,
    EquivocationDetected,
    ForkDetected,
    IntegrityAlarm,
    ReceiptInvalid,
    RelayIdentityChanged,
    RelayOverloaded,
    RelayRefused,
    ReorderDetected,
    ReplayDetected,
    TamperDetected,
    TooManyConnections,
    WithholdingDetected,
)
from model import content as contentmod
from model import wire
from model.artifacts import RefHasher
from model.chain import Receipt, verify_receipt
from model.envelope import event_id, seal_event
from model.equivocation import PROOF_KIND, EquivocationProof, Served, SignedReceipt
from model.errors import ChainMismatch
from model.ids import new_id
from model.proofs import KeyPair, account_rekey_bytes, sign_keystore_write, sign_request
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
    from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence

    import nacl.public
    import nacl.signing

    from model.chain import Head
    from model.envelope import SignedEvent
    from model.membership import Operation

R = TypeVar("R", bound=wire.Reply)
S = TypeVar("S", bound=wire.Request)
SUBSCRIPTION_BUFFER: Final = 10_000
# The relay refuses appends past 2 048 in flight or 16 MiB of bodies per connection (protocol.md
# "Limits"). One Client keeps at most half of that in flight across all its callers, so its own
# pipelining is never what gets shed.
APPEND_WINDOW: Final = 1024
APPEND_WINDOW_BYTES: Final = 8 * 1024 * 1024
# `overloaded` refusals of appends are retried for this long (seconds), with jittered
# exponential backoff from RETRY_START doubling up to RETRY_CAP.
APPEND_RETRY_FOR: Final = 30.0
RETRY_START: Final = 0.05
RETRY_CAP: Final = 2.0
# `overloaded` refusals of subscribes (the relay's catch-up caps) are retried for this long.
SUBSCRIBE_RETRY_FOR: Final = 30.0


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


class Client:
    """A connected client. Make one with `connect`."""

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
        self._closed: ConnectionLost | None = None
        self.relay_pk = b""
        self.challenge = b""  # this connection's, from `Welcome`: signed requests sign it
        self.account_id: str | None = None
        # The account's own signing key, once the caller unlocked it (`use_key`): requests that
        # change state are signed with it. Without it they go unsigned and the relay refuses
        # them (`bad_signature`): a login session alone can only read.
        self._signing_key: nacl.signing.SigningKey | None = None
        self._accounts: dict[str, wire.AccountInfo] = {}
        self._append_window = _AppendWindow(APPEND_WINDOW, APPEND_WINDOW_BYTES)
        # Set by a caller with durable state (the CLI): keeps each receipt, returns an earlier
        # one for the same position that disagrees with it.
        self.on_receipt: Callable[[SignedReceipt], SignedReceipt | None] | None = None

    # --- plumbing -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                for frame in wire.unbatch_replies(await self._ws.get_message()):  # type: ignore[arg-type]
                    await self._route(frame)
        except ConnectionClosed as exc:
            reason = exc.reason
            self._fail(
                ConnectionLost(reason.code if reason else None, reason.reason if reason else None)
            )
        except wire.MalformedFrame:
            self._fail(ConnectionLost(None, "relay sent a frame this client cannot read"))
            await self._ws.aclose(1002, "malformed frame")

    async def _route(self, frame: wire.Reply) -> None:
        match frame:
            case wire.Welcome():
                self.relay_pk = frame.relay_pk
                self.challenge = frame.challenge
                self._welcome.set()
            case wire.Event() | wire.Withheld() | wire.CaughtUp() | wire.SubscriptionEnded():
                chan = self._subs.get(frame.collab_id)
                if chan is not None and frame.collab_id not in self._draining:
                    if isinstance(frame, wire.CaughtUp) and frame.collab_id in self._one_shot:
                        self._finished.add(frame.collab_id)  # the relay ended it
                    await chan.send(frame)
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

    def _fail(self, err: ConnectionLost) -> None:
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

    # --- accounts -----------------------------------------------------------------------------

    async def signup(
        self,
        handle: str,
        password: str,
        signing_key: nacl.signing.SigningKey,
        box_pk: bytes,
        *,
        sealed_keystore: bytes = b"",
        account_id: str | None = None,
    ) -> str:
        """Register an account (and, with `sealed_keystore`, store it as version 1)."""
        account_id = account_id or new_id("a")
        keystore_sig = (
            sign_keystore_write(signing_key, account_id, 1, sealed_keystore)
            if sealed_keystore
            else b""
        )
        reply = await self.request(
            lambda rid: wire.Signup(
                rid=rid,
                account_id=account_id,
                handle=handle,
                password=password,
                sign_pk=bytes(signing_key.verify_key),
                box_pk=box_pk,
                keystore=sealed_keystore,
                keystore_sig=keystore_sig,
            ),
            wire.SignedUp,
        )
        return reply.account_id

    async def fetch_keystore(self) -> wire.Keystore:
        """The caller's sealed keystore as stored on the relay (needs only a session)."""
        return await self.request(lambda rid: wire.GetKeystore(rid=rid), wire.Keystore)

    async def store_keystore(
        self, signing_key: nacl.signing.SigningKey, version: int, sealed_keystore: bytes
    ) -> None:
        """Replace the stored keystore with `version` (stored version + 1), signed by the
        account key. Raises `RelayRefused` with code STALE when another device got there first."""
        if self.account_id is None:
            raise RelayRefused(wire.ErrorCode.UNAUTHENTICATED, "log in first")
        sig = sign_keystore_write(signing_key, self.account_id, version, sealed_keystore)
        await self.request(
            lambda rid: wire.PutKeystore(rid=rid, version=version, blob=sealed_keystore, sig=sig),
            wire.KeystoreStored,
        )

    async def rotate_account_keys(
        self,
        old_key: nacl.signing.SigningKey,
        old_box_pk: bytes,
        new_key: nacl.signing.SigningKey,
        new_box_pk: bytes,
        version: int,
        sealed_keystore: bytes,
    ) -> wire.AccountKeysRotated:
        """Replace this account's keys in the relay's directory (ADR-0017), storing
        `sealed_keystore` (sealed to the new keys) as keystore `version` with them. Signed by
        the old key (authority) and the new one (possession). Raises `RelayRefused`: STALE when
        the keys or the keystore changed meanwhile, BAD_SIGNATURE when `old_key` is not the
        registered key."""
        account_id = self._me()
        old = KeyPair(bytes(old_key.verify_key), old_box_pk)
        new = KeyPair(bytes(new_key.verify_key), new_box_pk)
        statement = account_rekey_bytes(account_id, old, new, version, sealed_keystore)
        reply = await self.request(
            lambda rid: wire.RotateAccountKeys(
                rid=rid,
                sign_pk=new.sign_pk,
                box_pk=new.box_pk,
                keystore_version=version,
                keystore=sealed_keystore,
                keystore_sig=sign_keystore_write(new_key, account_id, version, sealed_keystore),
                old_sig=old_key.sign(statement).signature,
                new_sig=new_key.sign(statement).signature,
            ),
            wire.AccountKeysRotated,
        )
        self._accounts.pop(account_id, None)  # the cached directory entry is out of date
        return reply

    async def collabs(self) -> list[str]:
        """The collabs the relay says this account is a member of (it can leave one out)."""
        reply = await self.request(lambda rid: wire.ListCollabs(rid=rid), wire.Collabs)
        return list(reply.collab_ids)

    async def login(self, handle: str, password: str) -> wire.LoggedIn:
        reply = await self.request(
            lambda rid: wire.Login(rid=rid, handle=handle, password=password), wire.LoggedIn
        )
        self.account_id = reply.account_id
        return reply

    async def authenticate(self, token: str) -> str:
        reply = await self.request(
            lambda rid: wire.Authenticate(rid=rid, token=token), wire.Authenticated
        )
        self.account_id = reply.account_id
        return reply.account_id

    async def account(self, account_id: str) -> wire.AccountInfo:
        """Public keys and handle of an account (cached for this connection)."""
        info = self._accounts.get(account_id)
        if info is None:
            info = await self.request(
                lambda rid: wire.GetAccount(rid=rid, account_id=account_id), wire.AccountInfo
            )
            if info.account_id != account_id:
                raise TamperDetected("relay answered for another account", collab_id="-", seq=None)
            self._accounts[account_id] = info
        return info

    async def lookup(self, handle: str) -> wire.AccountInfo:
        """An account by handle, from the relay's directory (use its keys only to add a
        member, after comparing fingerprints; the fold pins them from then on)."""
        info = await self.request(
            lambda rid: wire.GetAccount(rid=rid, handle=handle), wire.AccountInfo
        )
        if info.handle != handle:
            raise TamperDetected("relay answered for another handle", collab_id="-", seq=None)
        return info

    async def create_agent(
        self, account_id: str, handle: str, sign_pk: bytes, box_pk: bytes
    ) -> wire.AgentCreated:
        """Register a bot's account (its keys generated by the caller); returns its token.
        Signed with the key from `use_key`."""
        return await self.request(
            self.signed(
                lambda rid: wire.CreateAgent(
                    rid=rid, account_id=account_id, handle=handle, sign_pk=sign_pk, box_pk=box_pk
                )
            ),
            wire.AgentCreated,
        )

    async def revoke_agent(self, account_id: str) -> None:
        """Invalidate every token of an agent this account created, at once. Signed with the
        key from `use_key`."""
        await self.request(
            self.signed(lambda rid: wire.RevokeAgent(rid=rid, account_id=account_id)),
            wire.AgentRevoked,
        )

    async def list_agents(self) -> list[wire.AgentInfo]:
        """The agents this account created, revoked ones included (a session may ask)."""
        reply = await self.request(lambda rid: wire.ListAgents(rid=rid), wire.Agents)
        return reply.agents

    async def change_password(self, password: str) -> wire.PasswordChanged:
        """Replace the login password. Every other session of the account ends; the reply
        carries this device's new session token. Signed with the key from `use_key`."""
        return await self.request(
            self.signed(lambda rid: wire.ChangePassword(rid=rid, password=password)),
            wire.PasswordChanged,
        )

    async def end_sessions(self) -> None:
        """End every session of this account, this connection's included: every session token
        issued so far stops working. Signed with the key from `use_key`."""
        await self.request(self.signed(lambda rid: wire.EndSessions(rid=rid)), wire.SessionsEnded)

    async def call_tool(
        self, collab_id: str, tool: str, args: dict[str, str] | None = None
    ) -> wire.ToolResult:
        """Have the relay's broker call an operator-declared tool; the secret it uses never
        reaches this client. Raises `RelayRefused` (`unauthorized` without the capability,
        `not_found` for an unknown tool, `tool_failed` with a scrubbed reason,
        `bad_signature` without `use_key`)."""
        return await self.request(
            self.signed(
                lambda rid: wire.CallTool(rid=rid, collab_id=collab_id, tool=tool, args=args or {})
            ),
            wire.ToolResult,
        )

    # --- collabs and events -------------------------------------------------------------------

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

    def _me(self) -> str:
        if self.account_id is None:
            raise RelayRefused(wire.ErrorCode.UNAUTHENTICATED, "log in first")
        return self.account_id

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
        refused as `stale`.
        """
        for attempt in range(attempts):
            view = await self.read(
                collab_id, box_key, past_box_keys=past_box_keys, own_sign_pks=own_sign_pks
            )
            if resend is not None:
                signed, resend = resend, None
            else:
                signed = _collab.proposal(view, signing_key, change(view), _now_ms())
            try:
                return await self.append(signed), view
            except RelayRefused as exc:
                if exc.code is not wire.ErrorCode.STALE or attempt == attempts - 1:
                    raise
            except ConnectionLost as exc:
                exc.unacked = signed
                raise
        raise AssertionError("unreachable")  # pragma: no cover

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
        """
        if history is not None:
            view = history.view
        for attempt in range(attempts):
            if view is None:
                view = await self.read(collab_id, box_key)
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
        delay = RETRY_START
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
            delay = delay * 2 if len(shed) == len(pending) else RETRY_START  # no progress: back off
            delay = min(RETRY_CAP, delay)
            await trio.sleep(min(delay * random.uniform(0.5, 1.0), deadline - now))  # noqa: S311 — jitter
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
            error = _first_error(group)
            if error is None:
                raise  # only cancellation: leave it to Trio
            raise error from None
        finally:
            # Ended early: give back the window this round still held.
            window.release(held[1], held[0])
        return again + unsent, refused

    def _check_receipt(self, signed: SignedEvent, ack: wire.Appended) -> None:
        receipt = Receipt(ack.collab_id, ack.seq, ack.event_id, ack.chain)
        if ack.event_id != event_id(signed) or not verify_receipt(
            self.relay_pk, receipt, ack.receipt_sig
        ):
            raise ReceiptInvalid(
                "ack receipt does not match the event or the relay key",
                collab_id=ack.collab_id,
                seq=ack.seq,
            )
        if self.on_receipt is None:
            return
        signed_receipt = SignedReceipt(
            ack.collab_id, ack.seq, ack.event_id, ack.chain, ack.receipt_sig
        )
        earlier = self.on_receipt(signed_receipt)
        if earlier is not None:
            raise EquivocationDetected(
                "the relay signed two different events for the same position",
                collab_id=ack.collab_id,
                seq=ack.seq,
                proof=EquivocationProof(
                    PROOF_KIND, self.relay_pk, earlier, other_receipt=signed_receipt
                ),
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
        collab key of `epoch` and append it."""
        if self.account_id is None:
            raise RelayRefused(wire.ErrorCode.UNAUTHENTICATED, "log in before posting")
        signed = seal_event(
            signing_key=signing_key,
            collab_key=collab_key,
            collab_id=collab_id,
            actor_id=self.account_id,
            kind=contentmod.kind_of(content),
            ts=ts,
            content=contentmod.encode_content(content, evidence),
            refs=refs,
            epoch=epoch,
        )
        return await self.append(signed)

    async def upload_artifact(self, collab_id: str, sealed: Iterable[bytes]) -> wire.ArtifactStored:
        """Upload the pieces `model.artifacts.seal_stream` made, one acknowledged piece at a
        time (nothing is held whole), each signed with the key from `use_key`; returns the
        relay's confirmation with the ref."""
        upload = secrets.token_urlsafe(24)
        hasher = RefHasher()
        pieces = iter(sealed)
        current = next(pieces)
        index = 0
        while True:
            following = next(pieces, None)
            hasher.update(current)
            final = following is None
            build = self.signed(
                partial(
                    wire.PutArtifactChunk,
                    collab_id=collab_id,
                    upload=upload,
                    index=index,
                    data=current,
                    final=final,
                    ref=hasher.ref() if final else "",
                )
            )
            if final:
                return await self.request(build, wire.ArtifactStored)
            await self.request(build, wire.ArtifactChunkStored)
            assert following is not None
            current, index = following, index + 1

    @asynccontextmanager
    async def download_artifact(
        self, collab_id: str, ref: str
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The stored pieces of an artifact, in order, as the relay sends them.

        Use as ``async with client.download_artifact(c, ref) as pieces: async for p in
        pieces: …``. The pieces are unverified: pass them through `model.artifacts.check_ref`
        and `open_stream`. Leaving the block early is fine; later pieces are dropped.
        """
        if self._closed is not None:
            raise self._closed
        rid = next(self._rids)
        send, recv = trio.open_memory_channel[wire.Reply](64)
        self._streams[rid] = send
        try:
            await self._send(wire.encode(wire.GetArtifact(rid=rid, collab_id=collab_id, ref=ref)))
            async with recv:
                yield _ArtifactPieces(self, recv)
        finally:
            self._streams.pop(rid, None)

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
        delay = RETRY_START
        while True:
            try:
                await self.request(
                    lambda rid: wire.Subscribe(
                        rid=rid, collab_id=collab_id, from_seq=from_seq, follow=follow
                    ),
                    wire.Subscribed,
                )
            except RelayRefused as exc:
                left = deadline - trio.current_time()
                if exc.code is not wire.ErrorCode.OVERLOADED or left <= 0:
                    raise
            else:
                return
            await trio.sleep(min(delay * random.uniform(0.5, 1.0), left))  # noqa: S311 — jitter
            delay = min(RETRY_CAP, delay * 2)

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
        Without `follow` it ends once the history up to the relay's current head is in.
        """
        view = view or CollabView(
            collab_id,
            self._me(),
            box_key,
            keys,
            past_box_keys=past_box_keys,
            own_sign_pks=own_sign_pks,
        )
        history = History(self, view, follow=follow, expect=expect, receipts=receipts or {})
        try:
            await history._subscribe()
            yield history
        finally:
            await history._unsubscribe()


class _ArtifactPieces:
    """Async iterator over a download's pieces; ends after the piece marked final."""

    def __init__(self, client: Client, frames: trio.MemoryReceiveChannel[wire.Reply]) -> None:
        self._client = client
        self._frames = frames
        self._done = False

    def __aiter__(self) -> _ArtifactPieces:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            frame = await self._frames.receive()
        except trio.EndOfChannel:
            raise self._client._closed or ConnectionLost() from None
        if isinstance(frame, wire.Error):
            raise RelayRefused(frame.code, frame.message)
        if not isinstance(frame, wire.ArtifactData):
            raise RelayRefused(wire.ErrorCode.INTERNAL, f"unexpected reply {type(frame).__name__}")
        self._done = frame.final
        return frame.data


class History:
    """An async iterator of verified `Entry`s; `view` is this client's fold so far."""

    def __init__(
        self,
        client: Client,
        view: CollabView,
        *,
        follow: bool,
        expect: Head | None,
        receipts: dict[int, SignedReceipt],
    ) -> None:
        self._client = client
        self.view = view
        self._receipts = receipts
        self._follow = follow
        self._expect = expect
        self._done = False
        # The head before an event that raised an alarm: `head` never names an event that did
        # not pass every check, so a caller saving it cannot save the relay's lie.
        self._alarmed_at: Head | None = None
        self._subscription = AsyncExitStack()
        self._frames: trio.MemoryReceiveChannel[wire.Reply] | None = None
        self._refilled_after: int | None = None  # the head a backfill was last asked from
        self._ahead: collections.deque[Entry] = collections.deque()  # verified, not handed out

    async def _subscribe(self) -> None:
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

    @property
    def head(self) -> Head:
        """The last position that passed every check (signature, chain, the saved head this
        device expects, the receipts it holds): after an alarm, the one before the event that
        raised it, although the view may have taken that event in already."""
        return self.view.head if self._alarmed_at is None else self._alarmed_at

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

    async def _next_entry(self) -> Entry:
        while not self._done:
            assert self._frames is not None
            try:
                frame = await self._frames.receive()
            except trio.EndOfChannel:
                raise self._client._closed or ConnectionLost() from None
            head = self.view.head
            match frame:
                case wire.CaughtUp():
                    if frame.seq > head.seq:  # claims to have sent more than arrived
                        await self._backfill(head.seq + 1, frame.seq)
                        continue
                    if self._expect is not None and self._expect.seq > head.seq:
                        raise self._alarm(
                            ForkDetected,
                            f"this device verified seq {self._expect.seq} before, but the relay's"
                            f" history ends at {head.seq}: it was rolled back",
                            head.seq,
                        )
                    self._done = not self._follow
                case wire.SubscriptionEnded():
                    if self.view.membership is not None and not self.view.is_member:
                        self._done = True  # removed: the relay ends the stream, as it should
                        continue
                    raise ConnectionLost(None, frame.reason)
                case wire.Event() | wire.Withheld() if frame.seq > head.seq + 1:
                    await self._backfill(head.seq + 1, frame.seq - 1)
                case wire.Event() | wire.Withheld():
                    before = self.view.head
                    try:
                        entry = self._verify(frame)
                        self._check_expected()
                        self._check_receipt(entry)
                    except IntegrityAlarm:
                        self._alarmed_at = before
                        raise
                    return entry
        raise StopAsyncIteration

    def _verify(self, frame: wire.Event | wire.Withheld) -> Entry:
        if frame.collab_id != self.view.collab_id:
            raise self._alarm(TamperDetected, "event belongs to another collab", frame.seq)
        try:
            if isinstance(frame, wire.Withheld):
                return self.view.ingest_withheld(frame.seq, frame.event_id, frame.chain)
            return self.view.ingest(frame.seq, frame.event, frame.chain)
        except (ViewRejected, ChainMismatch) as exc:
            raise self._alarm(_ALARMS.get(type(exc), TamperDetected), str(exc), frame.seq) from None

    def _check_receipt(self, entry: Entry) -> None:
        promised = self._receipts.get(entry.seq)
        if promised is None or (promised.event_id, promised.chain) == (entry.event_id, entry.chain):
            return
        raise EquivocationDetected(
            "the relay acked one of this account's events at this seq, and now serves another",
            collab_id=self.view.collab_id,
            seq=entry.seq,
            proof=EquivocationProof(
                PROOF_KIND,
                self._client.relay_pk,
                promised,
                served=Served(entry.seq, entry.event_id, entry.chain),
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


# What each proof the fold raises means to a person (the rest is tampering).
_ALARMS: dict[type[Exception], type[IntegrityAlarm]] = {
    ForeignRekeyProven: AccountTakeoverDetected,
    ReplayProven: ReplayDetected,
    ReorderProven: ReorderDetected,
    WithholdingProven: WithholdingDetected,
    ForkProven: ForkDetected,
}


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The error that ended a group of tasks: an integrity alarm before anything else, then
    the first one raised; None when the group holds only cancellations."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        else:
            leaves.append(exc)
    for wanted in (IntegrityAlarm, Exception, BaseException):
        for exc in leaves:
            if isinstance(exc, wanted) and not isinstance(exc, trio.Cancelled):
                return exc
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


@asynccontextmanager
async def connect(
    url: str, *, pinned_relay_pk: bytes | None = None, access_token: str | None = None
) -> AsyncIterator[Client]:
    """Open a connection; yields once the relay has introduced itself.

    With `pinned_relay_pk`, refuses a relay whose signing key differs (trust on first use).
    `access_token` is a Cloudflare Access token for a relay behind Access (default: the
    COZY_CF_ACCESS_TOKEN environment variable); see `access_headers`. A refused upgrade raises
    `AccessRefused`.
    """
    try:
        async with _connected(url, pinned_relay_pk, access_token) as client:
            yield client
    except BaseExceptionGroup as group:
        # The reader task only ever ends quietly, so a group holds the caller's own error:
        # surface it as itself rather than wrapped.
        if len(group.exceptions) == 1:
            raise _typed_refusal(group.exceptions[0]) from None
        raise
    except trio_websocket.ConnectionRejected as exc:
        raise _typed_refusal(exc) from None


def _typed_refusal(exc: BaseException) -> BaseException:
    """A refused upgrade (Cloudflare Access, SO-6) as `AccessRefused`; anything else as is."""
    if not isinstance(exc, trio_websocket.ConnectionRejected):
        return exc
    text = (exc.body or b"").decode("utf-8", "replace")[:300]
    reason = "".join(c if c.isprintable() else " " for c in text).strip() or "no reason given"
    return AccessRefused(exc.status_code, reason)


@asynccontextmanager
async def _connected(
    url: str, pinned_relay_pk: bytes | None, access_token: str | None
) -> AsyncIterator[Client]:
    async with trio.open_nursery() as nursery:
        try:
            # Close the WebSocket (handshake and all) before cancelling its reader tasks.
            async with open_websocket(url, nursery, access_token=access_token) as ws:
                client = Client(ws)
                nursery.start_soon(client._read_loop)
                with trio.fail_after(CONNECT_TIMEOUT):
                    await client._welcome.wait()
                if client._closed is not None:
                    raise client._closed
                if pinned_relay_pk is not None and client.relay_pk != pinned_relay_pk:
                    raise RelayIdentityChanged(
                        "the relay's signing key changed since this device first met it; "
                        "if the operator rotated it on purpose, re-pin with `cozy account login --repin`"
                    )
                yield client
        finally:
            nursery.cancel_scope.cancel()
