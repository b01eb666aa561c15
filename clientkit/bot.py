"""The bot kit: a bot is an agent that reacts to what happens in its collab.

    bot = Bot("echo-bot.cozy-agent")          # its store defaults to ./echo-bot.state

    @bot.on_message
    async def echo(ctx: Context) -> None:
        await ctx.reply(f"echo: {ctx.text}")

    bot.run_forever()

Every handler has one shape, `async def handler(ctx)`: `ctx.text`, `ctx.author` (handle and
account id), `ctx.entry` (the verified event), `ctx.is_dm`, `ctx.args` (a command's parsed
arguments). `ctx.reply` answers where the message came from (a DM gets a DM to its author,
sealed to the pair), `ctx.post` posts to the collab, `ctx.dm` writes to one member.

What it takes care of, learning from what users of other bot SDKs trip over:

- **Start from now.** A bot started for the first time (its store has no cursor) hands its
  handlers only what is said from then on, not the collab's backlog; `backlog=True` hands it
  everything since it joined. An entry from before the bot joined (or while it was not a
  member) never reaches a handler, whatever the setting: it could not be answered (its
  membership does not include the bot) and the bot was not there to hear it.
- **State that must not be lost** lives in `store` (checked writable before anything else):
  the verified head, the relay's receipts and the **cursor** — the last event whose handler
  finished. Shutting down never revokes anything.
- **Delivery is at least once; posts are exactly once.** The cursor is committed, together with
  the verified head, only after the handler returned (in batches while a backlog is handled:
  at most `CURSOR_EVERY` entries or `CURSOR_AFTER` seconds, at once for live traffic, within
  `CURSOR_AFTER` once the stream goes quiet, and when the bot stops; clientkit/_bot_cursor.py);
  a crash replays what was handled since, and nothing is ever skipped. A handler's posts and DMs are not repeated by a replay:
  each is kept in the store, signed, before it is sent, and the handler's n-th send for an
  entry returns the stored n-th one (sending the kept bytes again if its ack was lost) instead
  of signing a new one. Other side effects (tool calls, anything outside the collab) happen
  again on a replay: make those idempotent (or check `ctx.entry.event_id`).
- **Connections that die or go silent** are re-opened with jittered exponential backoff; a ping
  watchdog notices a silent socket. `on_connect` runs on the first connection, `on_resume` on
  each reconnection. A relay that cannot be reached at the very first connection is reported
  (`RelayUnreachable`): that is a wrong URL or a relay not started, not a blip.
- **A busy relay** (`overloaded`): `ctx.post` retries with jittered backoff for up to
  `Client.append`'s `retry_for`; past it `RelayOverloaded` reaches the handler, and if the
  handler lets it through, `run` backs off, reconnects and handles that event again (its post
  was not stored). A subscribe refused with `overloaded` (the relay's catch-up caps) is retried
  by the client kit for 30 s and then, like any `overloaded`, by `run` reconnecting later.
  `too_many_connections` is not retried: `run` raises `TooManyConnections`,
  whose message says which connection to close.
- **The end of the road is said, not retried**: a revoked token (`RelayRefused` with code
  `unauthenticated`, or the relay closing the connection with 4003) and a removal from the
  collab (`BotRemoved`) stop `run`.
- **Integrity alarms are not swallowed.** An `IntegrityAlarm` (the relay lied: see
  docs/ordering.md) goes to the `on_alarm` hook if there is one and otherwise stops `run` by
  raising it: a bot must not keep acting on a history it cannot trust.
- `run_forever()` is `run` for a script: it logs "connected as …", stops quietly on Ctrl-C or
  SIGTERM and says in one line why it stopped, with a non-zero exit status for a failure.
- The bot never sees its own events as new messages, posts with ordering evidence, and never
  holds a tool's secret (`ctx.call_tool` goes through the relay's broker).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

import nacl.public
import nacl.signing
import trio
from trio_websocket import ConnectionClosed

from clientkit._agent import AgentCredentials, CredentialsError, load_credentials
from clientkit._bot_commands import Command, UsageError, split_command
from clientkit._bot_context import (
    Author,
    BotRemoved,
    BotSetupError,
    Context,
    NotAMember,
)
from clientkit._bot_cursor import Cursor
from clientkit._client import Client, History, connect
from clientkit._connection import StaleBound
from clientkit._retry import backoff_delay
from clientkit._session import Identity, Keys, Session
from clientkit._state import ClientState
from clientkit.errors import (
    ConnectionLost,
    IntegrityAlarm,
    RelayOverloaded,
    RelayRefused,
    RelayUnreachable,
    StaleView,
)
from model import content as contentmod
from model import wire
from model.chain import Head
from model.excgroups import innermost
from model.membership import AddMember, CreateCollab, MemberKind, RemoveMember

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from model.view import CollabView, Entry

    Handler = Callable[["Context"], Awaitable[None]]
    Hook = Callable[["Bot"], Awaitable[None]]
    AlarmHook = Callable[["Bot", IntegrityAlarm], Awaitable[None]]
    StaleHook = Callable[["Bot", StaleView], Awaitable[None]]

DEVICE: Final = "bot"  # the author stream of the bot's posts (docs/ordering.md)
DM_DEVICE: Final = "bot-dm"  # its DMs: kept and resent like posts, but they carry no evidence
BACKOFF_START: Final = 0.5
BACKOFF_CAP: Final = 30.0
PING_EVERY: Final = 20.0
PING_TIMEOUT: Final = 10.0
REVOKED_CLOSE_CODE: Final = 4003  # the relay closes a revoked agent's connections with it

log = logging.getLogger("clientkit.bot")


class Bot:
    def __init__(
        self,
        credentials: str | Path | AgentCredentials,
        *,
        store: str | Path | None = None,
        prefix: str = "!",
        backlog: bool = False,
    ) -> None:
        """`credentials` is the 0600 file `cozy agent create` wrote (read when the bot starts,
        or at once by `from_credentials`). `store` is where the bot keeps its cursor and
        verified state; by default beside the credential file (`NAME.state` for
        `NAME.cozy-agent`). Losing it means re-handling events. `prefix` starts a command.
        `backlog` hands a bot's first run what was said since it joined, not only what is said
        from then on."""
        if isinstance(credentials, AgentCredentials):
            self._credentials: AgentCredentials | None = credentials
            self._source: Path | None = None
        else:
            self._credentials, self._source = None, Path(credentials)
        if store is None:
            if self._source is None:
                raise BotSetupError("pass store=: where the bot keeps its cursor and state")
            store = self._source.with_suffix(".state")
        self.store = Path(store)
        self.prefix = prefix
        self.backlog = backlog
        self.connections = 0
        self.ping_every = PING_EVERY
        self.ping_timeout = PING_TIMEOUT
        # The staleness bound of the bot's connections (`Client.stale_after`, ADR-0020): by
        # default the relay's announced heartbeat interval plus a grace.
        self.stale_after: float | StaleBound | None = StaleBound.FROM_RELAY
        self._messages: list[Handler] = []
        self._dms: list[Handler] = []
        self._members: list[Handler] = []
        self._commands: dict[str, Command] = {}
        self._on_connect: list[Hook] = []
        self._on_resume: list[Hook] = []
        self._on_alarm: AlarmHook | None = None
        self._on_stale: StaleHook | None = None
        self._seen: CollabView | None = None  # this session's read of the collab at its head
        self._live: Session | None = None  # the client session of the current connection
        self._placed = False  # whether the store knows where the bot's author stream got
        self._store_checked = False
        self._reached = False  # a connection to the relay was ever opened

    @classmethod
    def from_credentials(
        cls, path: str | Path, *, store: str | Path, prefix: str = "!", backlog: bool = False
    ) -> Bot:
        """Load the credential file and check the store now (raises `CredentialsError`,
        `BotSetupError`), for code that wants to fail before it registers handlers."""
        bot = cls(path, store=store, prefix=prefix, backlog=backlog)
        bot._check_setup()
        return bot

    @property
    def credentials(self) -> AgentCredentials:
        if self._credentials is None:
            assert self._source is not None
            self._credentials = load_credentials(self._source)
        return self._credentials

    @property
    def collab_id(self) -> str:
        return self.credentials.collab_id

    @property
    def account_id(self) -> str:
        return self.credentials.account_id

    @property
    def handle(self) -> str:
        return self.credentials.handle

    def _check_setup(self) -> None:
        """Raises `CredentialsError` or `BotSetupError`, each one line saying what to fix."""
        _ = self.credentials
        if self._store_checked:
            return
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
        self._store_checked = True

    @property
    def state(self) -> ClientState:
        return ClientState(self.store / "state.db")

    # --- registration -------------------------------------------------------------------------

    def on_message(self, fn: Handler) -> Handler:
        """Every message posted to the collab (not DMs; commands too)."""
        self._messages.append(fn)
        return fn

    def on_dm(self, fn: Handler) -> Handler:
        """Every direct message to the bot (`ctx.reply` answers with a DM)."""
        self._dms.append(fn)
        return fn

    def on_member(self, fn: Handler) -> Handler:
        """Every membership change (`ctx.entry.proof`) after the bot joined."""
        self._members.append(fn)
        return fn

    def command(self, name: str, *, help: str = "") -> Callable[[Handler], Handler]:
        """`@bot.command("weather")`: runs for `PREFIX weather …`, in the collab or a DM,
        with the `@arg`s below it parsed into `ctx.args`; a bad invocation is answered with
        the command's usage in one line and never reaches the handler."""

        def register(fn: Handler) -> Handler:
            command = Command(name, fn, help)
            command.build(self.prefix)
            self._commands[name] = command
            return fn

        return register

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

    def on_stale(self, fn: StaleHook) -> StaleHook:
        """Runs when the relay sent no fresh signed checkpoint within the staleness bound
        (`StaleView`, once per stale spell); the bot keeps serving. Without a hook it is logged
        as a warning."""
        self._on_stale = fn
        return fn

    # --- running ------------------------------------------------------------------------------

    def run_forever(self) -> NoReturn:
        """Run until Ctrl-C or SIGTERM, for a script: logs "connected as …", and when it stops
        says why in one line on stderr and exits (0 for a signal, non-zero for a failure)."""
        from clientkit._bot_run import run_forever

        run_forever(self)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Reconnects on connection loss; raises integrity alarms
        (unless `on_alarm` handles them), `RelayUnreachable` if the first connection fails,
        and refusals that retrying cannot fix."""
        self._check_setup()
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
                elif not _retryable(error):
                    raise error from None  # TooManyConnections among them: retrying won't help
                elif not self._reached:
                    raise RelayUnreachable(
                        f"cannot reach the relay at {self.credentials.relay_url}"
                        f" ({str(error) or type(error).__name__}): is it running, and is that"
                        " its address?"
                    ) from None
                else:
                    log.warning("%s; reconnecting", _lost(error))
                failures += 1
            started = True
            await trio.sleep(backoff_delay(failures, start=BACKOFF_START, cap=BACKOFF_CAP))

    async def _session(self, task_status: trio.TaskStatus[None] | None) -> None:
        creds = self.credentials
        async with (
            connect(creds.relay_url, pinned_relay_pk=bytes.fromhex(creds.relay_pk)) as client,
            trio.open_nursery() as nursery,
        ):
            self._reached = True
            # Watched from the first request on: a relay that goes silent at any point (even
            # mid-handshake of a subscription) ends the session, and `run` reconnects.
            nursery.start_soon(self._watchdog, client, nursery.cancel_scope)
            await self._serve(client, task_status, nursery)
            nursery.cancel_scope.cancel()
        raise ConnectionLost(None, "the relay ended the stream")

    def _session_over(self, client: Client) -> Session:
        """The bot as a client session (clientkit/_session.py): every read checked against
        the store's saved head and receipts, every post and DM sealed, kept and retried there.
        Its DM stream is `DM_DEVICE` (the session's `dm_device` of `DEVICE`)."""
        creds = self.credentials
        return Session(
            client,
            Identity(creds.account_id, creds.handle, MemberKind.AGENT),
            Keys(nacl.signing.SigningKey(creds.sign_seed), nacl.public.PrivateKey(creds.box_sk)),
            self.state,
            device=DEVICE,
        )

    async def _serve(
        self,
        client: Client,
        task_status: trio.TaskStatus[None] | None,
        nursery: trio.Nursery,
    ) -> None:
        state = self.state
        await client.authenticate(self.credentials.token)
        client.stale_after = self.stale_after
        client.use_key(nacl.signing.SigningKey(self.credentials.sign_seed))  # tool calls, uploads
        session = self._live = self._session_over(client)
        # A reply signed before a crash or a lost connection, whose ack was never recorded,
        # goes out again (the same bytes) before anything new is signed.
        await session.resend_unacked(self.collab_id)
        self.connections += 1
        for hook in self._on_connect if self.connections == 1 else self._on_resume:
            await hook(self)
        cursor = Cursor(session, self.collab_id, state.cursor(self.collab_id))
        nursery.start_soon(cursor.commit_when_quiet)
        # Where the stream resumes: the fold this store kept at (or before) the cursor, or the
        # genesis (Session.resume_view: the store's own sealed work, checked against its head).
        start = session.resume_view(self.collab_id, before=cursor.seq + 1) if cursor.seq else None
        if cursor.seq == 0 and not self.backlog:  # a new bot starts from now
            # The collab at the relay's head, and how far this bot's own stream got (a store
            # that was lost or restored from a backup must not make a replay reuse counters).
            start = self._seen = await session.read(self.collab_id)
            if not start.is_member:
                raise BotRemoved(
                    f"{self.handle} is not a member of {self.collab_id}: it was removed (or"
                    " never added); a manager can add it again with `cozy collab add`"
                )
            state.commit_cursor(self.collab_id, start.head)
            cursor.seq = start.head.seq
        # Handlers replaying entries see the collab as it was then, and a store that was lost
        # (or is new) knows nothing of how far this bot's own stream got: before its first post
        # the collab is read at the relay's head (`_place_stream`), so a replayed reply never
        # reuses a counter. A store that sent before knows; a backlog that posts nothing, or
        # whose first post comes once the stream caught up, is read once, not twice.
        self._placed = self.collab_id in session.views or any(
            state.last_sent(self.collab_id, device) for device in (DEVICE, DM_DEVICE)
        )
        again = "re" if self.connections > 1 else ""
        log.info("%sconnected as %s in %s", again, self.handle, self.collab_id)
        # Whether the bot was a member at the entry being read.
        member = start is not None and start.is_member
        # One pass from there: the handlers are handed what is past the cursor.
        async with session.history(self.collab_id, view=start, follow=True) as events:
            if task_status is not None:
                task_status.started()
            try:
                while True:
                    try:
                        entry = await events.__anext__()
                    except StopAsyncIteration:
                        break
                    except StaleView as stale:  # a warning: keep serving, tell the owner
                        if self._on_stale is not None:
                            await self._on_stale(self, stale)
                        else:
                            log.warning("%s", stale)
                        continue
                    member = _member_after(entry, member, self.account_id)
                    if entry.seq > cursor.seq and member:
                        await self._dispatch(client, events, entry)
                        # The entry's own position: a handler may have read the stream ahead
                        # (`History.read_ahead`), and those entries are still to be handled.
                        cursor.handled(
                            Head(entry.seq, entry.chain), events.view, more=events.buffered()
                        )
            finally:
                cursor.commit(final=True)  # what was handled stays handled, however it ends
            self._seen = events.view
        if not events.view.is_member:
            raise BotRemoved(f"{self.handle} was removed from {self.collab_id}")

    async def _watchdog(self, client: Client, scope: trio.CancelScope) -> None:
        """Ends the session when the relay goes silent: no pong within `ping_timeout`, and
        nothing else heard since the ping went out. A bot busy catching up is not silence: the
        pong is queued behind events the relay already sent, which count as a sign of life."""
        while True:
            await trio.sleep(self.ping_every)
            pinged = trio.current_time()
            with trio.move_on_after(self.ping_timeout) as waited:
                await client.request(lambda rid: wire.Ping(rid=rid), wire.Pong)
            if waited.cancelled_caught and not client.heard_since(pinged):
                scope.cancel()
                raise _Silent

    async def _dispatch(self, client: Client, history: History, entry: Entry) -> None:
        if entry.author_id == self.account_id or not entry.author_id:
            return  # never react to our own events (nor to a DM between others)
        if entry.proof is not None:
            handlers = self._members
        elif isinstance(entry.content, contentmod.Message):
            handlers = self._dms if entry.dm_to else self._messages
        else:
            return
        author = Author((await client.account(entry.author_id)).handle, entry.author_id)
        ctx = Context(self, entry, author, client, history)
        for handler in handlers:
            await handler(ctx)
        if isinstance(entry.content, contentmod.Message):
            await self._run_command(ctx)

    async def _run_command(self, ctx: Context) -> None:
        invoked = split_command(ctx.text, self.prefix)
        command = None if invoked is None else self._commands.get(invoked[0])
        if invoked is None or command is None:
            return  # not a command, or another bot's
        try:
            ctx.args = command.parse(invoked[1])
        except UsageError as exc:
            await ctx.reply(str(exc))
            return
        await command.handler(ctx)

    # --- sending: everything the bot says leaves through the connection's `Session` -----------

    async def _post(self, ctx: Context, text: str) -> int:
        return await self._send(ctx, text)

    async def _dm(self, ctx: Context, to: str, text: str) -> int:
        view = ctx._history.view
        assert view.membership is not None
        recipient = to if to in view.membership.members else None
        if recipient is None and not to.startswith("a_"):
            found = (await ctx._client.lookup(to)).account_id
            recipient = found if found in view.membership.members else None
        if recipient is None:
            raise NotAMember(f"cannot DM {to}: not a member of {self.collab_id}")
        # Sealed to the key the bot's own fold pinned, never the directory's (`Session.dm`).
        return await self._send(ctx, text, dm_to=recipient)

    async def _send(self, ctx: Context, text: str, *, dm_to: str | None = None) -> int:
        """Seal against the followed view and append, exactly once per handler send
        (`Session.post` / `Session.dm` with the entry's intent, `once`).

        If the key rotated meanwhile (a member was removed while the handler ran), the relay
        bounces it, the view reads its stream ahead to the rotation, and it is sealed again.
        The send is the handler's n-th for its entry: kept in the store before it is sent, and
        on a replay of that entry (a crash or lost ack before the cursor was committed) the
        same event is sent again or, if stored, its seq returned — exactly once.
        """
        session = self._live
        assert session is not None
        ctx._sends += 1
        kind = b"reply" if dm_to is None else b"dm"
        intent = b"%s:%s:%d" % (kind, ctx.entry.event_id.hex().encode(), ctx._sends)
        source, history = ctx.entry.seq, ctx._history
        if dm_to is None and not self._placed and not history.caught_up:
            await self._place_stream(session)  # (a DM carries no counter readers check)
        if dm_to is None:
            self._placed = True  # its posts from here on are in the store (`last_sent`)
            sent = await session.post(
                self.collab_id, text, intent=intent, source=source, history=history, once=True
            )
        else:
            sent = await session.dm(
                self.collab_id,
                dm_to,
                text,
                intent=intent,
                source=source,
                history=history,
                once=True,
            )
        return sent.seq

    async def _place_stream(self, session: Session) -> None:
        """Where this bot's author stream got, for a store that does not know (new, or lost):
        the collab read at the relay's head on a connection of its own (the bot's own
        subscription is mid-backlog on its connection), its view kept in `Session.views`, from
        which every post takes its counter (`AuthorStream.seen`)."""
        creds = self.credentials
        async with connect(
            creds.relay_url, pinned_relay_pk=bytes.fromhex(creds.relay_pk)
        ) as client:
            await client.authenticate(creds.token)
            client.stale_after = self.stale_after
            reader = self._session_over(client)
            session.views[self.collab_id] = await reader.read(self.collab_id)


def _member_after(entry: Entry, was: bool, me: str) -> bool:
    """Whether `me` is a member once `entry` is in: only a change naming `me` alters it."""
    op = entry.proof.op if entry.proof is not None else None
    if isinstance(op, CreateCollab) and op.owner.account_id == me:
        return True
    if isinstance(op, AddMember) and op.member.account_id == me:
        return True
    if isinstance(op, RemoveMember) and op.account_id == me:
        return False
    return was


def _retryable(error: BaseException) -> bool:
    """Errors a later connection can cure; a revocation (4003) is not one of them."""
    if isinstance(error, ConnectionLost):
        return error.code != REVOKED_CLOSE_CODE
    if isinstance(error, RelayRefused):
        return isinstance(error, RelayOverloaded) or error.code is wire.ErrorCode.OVERLOADED
    return isinstance(error, (ConnectionClosed, OSError, _Silent, RelayUnreachable))


class _Silent(Exception):
    """The relay stopped answering pings."""


__all__ = [
    "Author",
    "Bot",
    "BotRemoved",
    "BotSetupError",
    "Context",
    "CredentialsError",
    "NotAMember",
    "RelayUnreachable",
]


def _lost(error: BaseException) -> str:
    """What the log says about a lost connection: the close code and reason, or the error's
    type (never a message that could quote data)."""
    if isinstance(error, ConnectionLost):
        return str(error)
    return f"connection to the relay lost ({type(error).__name__})"
