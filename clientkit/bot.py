"""The bot kit: a bot is an agent that reacts to what happens in its collab.

    bot = Bot.from_credentials("helper.cozy-agent", store="./helper-state")

    @bot.on_message
    async def echo(ctx: Context, text: str) -> None:
        await ctx.reply(f"you said: {text}")

    trio.run(bot.run)

What it takes care of, learning from what users of other bot SDKs trip over:

- **State that must not be lost** lives in `store` (required; checked writable before anything
  else): the verified head, the relay's receipts and the **cursor** — the last event whose
  handler finished. Shutting down never revokes anything.
- **Delivery is at least once; posts are exactly once.** The cursor is committed, together with
  the verified head, only after the handler returned; a crash in between replays that event on
  restart, and nothing is ever skipped. A handler's posts are not repeated by a replay: each
  reply is kept in the store, signed, before it is sent, and the handler's n-th `ctx.post` for
  an entry returns the stored n-th reply (sending the kept bytes again if its ack was lost)
  instead of signing a new one. Other side effects (tool calls, anything outside the collab)
  happen again on a replay: make those idempotent (or check `ctx.entry.event_id`).
- **Connections that die or go silent** are re-opened with jittered exponential backoff; a ping
  watchdog notices a silent socket. `on_connect` runs on the first connection, `on_resume` on
  each reconnection.
- **A busy relay** (`overloaded`): `ctx.post` retries with jittered backoff for up to
  `Client.append`'s `retry_for`; past it `RelayOverloaded` reaches the handler, and if the
  handler lets it through, `run` backs off, reconnects and handles that event again (its post
  was not stored). A subscribe refused with `overloaded` (the relay's catch-up caps) is retried
  by the client kit for 30 s and then, like any `overloaded`, by `run` reconnecting later.
  `too_many_connections` is not retried: `run` raises `TooManyConnections`,
  whose message says which connection to close.
- **Integrity alarms are not swallowed.** An `IntegrityAlarm` (the relay lied: see
  docs/ordering.md) goes to the `on_alarm` hook if there is one and otherwise stops `run` by
  raising it: a bot must not keep acting on a history it cannot trust.
- The bot never sees its own events as new messages, posts with ordering evidence, and never
  holds a tool's secret (`ctx.call_tool` goes through the relay's broker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import nacl.public
import nacl.signing
import trio
from trio_websocket import ConnectionClosed

from clientkit._agent import AgentCredentials, load_credentials
from clientkit._client import Client, History, connect
from clientkit._outbox import AuthorStream
from clientkit._retry import backoff_delay
from clientkit._state import ClientState
from clientkit.errors import ConnectionLost, IntegrityAlarm, RelayOverloaded, RelayRefused
from model import content as contentmod
from model import wire
from model.chain import Head
from model.envelope import seal_event
from model.excgroups import innermost

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from model.envelope import SignedEvent
    from model.membership import Proof
    from model.view import CollabView, Entry

    MessageHandler = Callable[["Context", str], Awaitable[None]]
    MemberHandler = Callable[["Context", Proof], Awaitable[None]]
    Hook = Callable[["Bot"], Awaitable[None]]
    AlarmHook = Callable[["Bot", IntegrityAlarm], Awaitable[None]]

DEVICE: Final = "bot"
BACKOFF_START: Final = 0.5
BACKOFF_CAP: Final = 30.0
PING_EVERY: Final = 20.0
PING_TIMEOUT: Final = 10.0


class BotSetupError(Exception):
    """The bot cannot start: the message says what to fix."""


@dataclass
class Context:
    """What a handler gets: the entry, and ways to answer."""

    bot: Bot
    entry: Entry
    _client: Client
    _history: History
    _posts: int = 0  # posts this handler made so far: the n-th is the same post on a replay

    async def post(self, text: str) -> int:
        """Post `text` to the collab (sealed, signed, with evidence). Returns its seq.

        If the collab key rotated while the handler ran (a member was removed), the relay
        bounces the post and it is sealed again under the new key, never stored under the old.
        """
        return await self.bot._post(self, text)

    # Collabs have no threads yet: a reply is a post to the same collab.
    reply = post

    async def call_tool(self, tool: str, args: dict[str, str] | None = None) -> wire.ToolResult:
        """Have the relay's broker call a tool (needs the `tool:NAME` capability)."""
        return await self._client.call_tool(self.bot.collab_id, tool, args)


@dataclass
class Bot:
    credentials: AgentCredentials
    store: Path
    _messages: list[MessageHandler] = field(default_factory=list)
    _dms: list[MessageHandler] = field(default_factory=list)
    _members: list[MemberHandler] = field(default_factory=list)
    _on_connect: list[Hook] = field(default_factory=list)
    _on_resume: list[Hook] = field(default_factory=list)
    _on_alarm: AlarmHook | None = None
    _seen: CollabView | None = None  # this session's read of the collab at the relay's head
    connections: int = 0
    ping_every: float = PING_EVERY
    ping_timeout: float = PING_TIMEOUT

    @classmethod
    def from_credentials(cls, path: str | Path, *, store: str | Path) -> Bot:
        """Load the 0600 credential file `cozy agent create` wrote; `store` is where the bot
        keeps its cursor and verified state (required: losing it means re-handling events)."""
        bot = cls(load_credentials(Path(path)), Path(store))
        bot._check_store()
        return bot

    @property
    def collab_id(self) -> str:
        return self.credentials.collab_id

    @property
    def account_id(self) -> str:
        return self.credentials.account_id

    def _check_store(self) -> None:
        try:
            self.store.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe = self.store / ".writable"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BotSetupError(
                f"the bot's store {self.store} is not writable ({exc.strerror}): fix it before"
                " starting, or the bot would re-handle or skip events after a restart"
            ) from None

    @property
    def state(self) -> ClientState:
        return ClientState(self.store / "state.db")

    # --- registration -------------------------------------------------------------------------

    def on_message(self, fn: MessageHandler) -> MessageHandler:
        self._messages.append(fn)
        return fn

    def on_dm(self, fn: MessageHandler) -> MessageHandler:
        self._dms.append(fn)
        return fn

    def on_member(self, fn: MemberHandler) -> MemberHandler:
        self._members.append(fn)
        return fn

    def on_connect(self, fn: Hook) -> Hook:
        self._on_connect.append(fn)
        return fn

    def on_resume(self, fn: Hook) -> Hook:
        """Runs on every reconnection after the first connection (not on the first)."""
        self._on_resume.append(fn)
        return fn

    def on_alarm(self, fn: AlarmHook) -> AlarmHook:
        self._on_alarm = fn
        return fn

    # --- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Reconnects on connection loss; raises integrity alarms
        (unless `on_alarm` handles them) and refusals that retrying cannot fix."""
        failures = 0
        started = False
        while True:
            try:
                await self._session(task_status if not started else None)
                failures = 0
            except Exception as exc:  # noqa: BLE001 — classified below; the rest re-raised
                error = innermost(exc)
                if isinstance(error, IntegrityAlarm) and self._on_alarm is not None:
                    await self._on_alarm(self, error)
                elif not isinstance(
                    error, (ConnectionLost, ConnectionClosed, OSError, _Silent, RelayOverloaded)
                ) and not _overloaded(error):
                    raise error from None  # TooManyConnections among them: retrying won't help
                failures += 1
            started = True
            await trio.sleep(backoff_delay(failures, start=BACKOFF_START, cap=BACKOFF_CAP))

    async def _session(self, task_status: trio.TaskStatus[None] | None) -> None:
        creds = self.credentials
        async with (
            connect(creds.relay_url, pinned_relay_pk=bytes.fromhex(creds.relay_pk)) as client,
            trio.open_nursery() as nursery,
        ):
            # Watched from the first request on: a relay that goes silent at any point (even
            # mid-handshake of a subscription) ends the session, and `run` reconnects.
            nursery.start_soon(self._watchdog, client, nursery.cancel_scope)
            await self._serve(client, task_status)
            nursery.cancel_scope.cancel()
        raise ConnectionLost(None, "the relay ended the stream")

    async def _serve(self, client: Client, task_status: trio.TaskStatus[None] | None) -> None:
        box = nacl.public.PrivateKey(self.credentials.box_sk)
        state = self.state
        await client.authenticate(self.credentials.token)
        client.use_key(nacl.signing.SigningKey(self.credentials.sign_seed))  # tool calls, uploads
        client.on_receipt = state.add_receipt
        # A reply signed before a crash or a lost connection, whose ack was never recorded,
        # goes out again (the same bytes) before anything new is signed.
        await self._stream.resend_unacked(client)
        self.connections += 1
        for hook in self._on_connect if self.connections == 1 else self._on_resume:
            await hook(self)
        # The collab at the relay's head: its keys, and how far this bot's own stream got (a
        # store that was lost or restored from a backup must not make a replay reuse counters).
        self._seen = await client.read(self.collab_id, box)
        keys = self._seen.known_keys()
        cursor = state.cursor(self.collab_id)
        async with client.history(
            self.collab_id,
            box,
            keys=keys,
            expect=state.head(self.collab_id),
            receipts=state.receipts(self.collab_id),
            follow=True,
        ) as events:
            if task_status is not None:
                task_status.started()
            async for entry in events:
                if entry.seq > cursor:
                    await self._dispatch(Context(self, entry, client, events))
                    # The entry's own position: a handler may have read the stream ahead
                    # (`History.read_ahead`), and those entries are still to be handled.
                    state.commit_cursor(self.collab_id, Head(entry.seq, entry.chain))
                    cursor = entry.seq

    async def _watchdog(self, client: Client, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.ping_every)
            with trio.move_on_after(self.ping_timeout) as waited:
                await client.request(lambda rid: wire.Ping(rid=rid), wire.Pong)
            if waited.cancelled_caught:
                scope.cancel()
                raise _Silent

    async def _dispatch(self, ctx: Context) -> None:
        entry = ctx.entry
        if entry.author_id == self.account_id:
            return  # never react to our own events
        if entry.proof is not None:
            for member_handler in self._members:
                await member_handler(ctx, entry.proof)
        elif isinstance(entry.content, contentmod.Message):
            for handler in self._dms if entry.dm_to else self._messages:
                await handler(ctx, entry.content.text)

    async def _post(self, ctx: Context, text: str) -> int:
        """Seal against the followed view; if the key rotated meanwhile (a member was removed
        while the handler ran), the relay bounces it, the view reads its stream ahead to the
        rotation, and it is sealed again under the new key.

        The reply is the handler's n-th post for its entry: kept in the store before it is
        sent, and on a replay of that entry (a crash or lost ack before the cursor was
        committed) the same reply is sent again or, if stored, its seq returned — exactly once.
        """
        signing_key = nacl.signing.SigningKey(self.credentials.sign_seed)

        def seal(view: CollabView, evidence: contentmod.Evidence) -> SignedEvent:
            epoch, key = view.current_key()
            return seal_event(
                signing_key=signing_key,
                collab_key=key,
                collab_id=self.collab_id,
                actor_id=self.account_id,
                kind=contentmod.KIND_MESSAGE,
                ts=evidence.clock,
                content=contentmod.encode_content(contentmod.Message(text), evidence),
                epoch=epoch,
            )

        ctx._posts += 1
        sent = await self._stream.send(
            ctx._client,
            nacl.public.PrivateKey(self.credentials.box_sk),
            seal,
            intent=b"reply:%s:%d" % (ctx.entry.event_id.hex().encode(), ctx._posts),
            source=ctx.entry.seq,
            history=ctx._history,
            once=True,
        )
        return sent.seq

    @property
    def _stream(self) -> AuthorStream:
        return AuthorStream(self.state, self.collab_id, DEVICE, seen=self._seen)


def _overloaded(error: BaseException) -> bool:
    """A refusal that says the relay is busy (e.g. its catch-up caps): reconnecting later helps."""
    return isinstance(error, RelayRefused) and error.code is wire.ErrorCode.OVERLOADED


class _Silent(Exception):
    """The relay stopped answering pings."""
