"""`cozy tail`: a collab's verified history, and with `--follow` its new events as they come,
across relay restarts.

Following survives the relay going away: the verified view is kept, and after a jittered backoff
a new connection resumes the subscription right after the last position that passed every
check, so each event is printed once. Only failures that reconnecting can cure are retried (a
lost connection, a refused connect, a relay restarting or busy); an integrity alarm, a refusal
and anything else end the command as they would without `--follow`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final

import trio
import trio_websocket

from clientkit._cli_discovery import emit_json
from clientkit._cli_session import _as_member, _opened, _unlock
from clientkit._collab import describe
from clientkit._home import Home
from clientkit._retry import backoff_delay
from clientkit._transport import _one_line
from clientkit.errors import (
    AccessRefused,
    ConnectionLost,
    RelayRefused,
    RelayUnreachable,
    StaleView,
    TooManyConnections,
)
from model import content as contentmod
from model import wire
from model.excgroups import innermost
from model.membership import AddMember

if TYPE_CHECKING:
    import argparse

    from clientkit._cli_session import Unlocked
    from clientkit._client import Client
    from model.view import CollabView, Entry

# The pause before reconnecting: from half a second, doubling while attempts fail, to at most
# half a minute (as the bot kit's reconnects).
BACKOFF_START: Final = 0.5
BACKOFF_CAP: Final = 30.0
# The verified head is saved at most this often while entries stream in (and when it ends):
# each save is a transaction with a full sync, which per 100 entries cost a 100k-event tail
# about as much as verifying it.
SAVE_HEAD_EVERY: Final = 1.0
# Refusals a relay gives while it restarts or sheds load: worth connecting again for.
_PASSING: Final[frozenset[wire.ErrorCode]] = frozenset(
    {wire.ErrorCode.SHUTTING_DOWN, wire.ErrorCode.OVERLOADED, wire.ErrorCode.INTERNAL}
)


async def cmd_tail(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    tail = _Tail(me, args)
    failures = 0
    while True:
        try:
            await tail.connect_and_print()
        except Exception as exc:
            error = innermost(exc)
            if not args.follow or not _passing(error):
                raise
            failures = 0 if tail.subscribed else failures + 1
            delay = backoff_delay(failures, start=BACKOFF_START, cap=BACKOFF_CAP)
            print(
                f"lost the relay ({_why(error)}); reconnecting in {delay:.1f} s and resuming"
                f" after seq {tail.resume_after}…",
                file=sys.stderr,
                flush=True,
            )
            await trio.sleep(delay)
        else:
            return  # the history is in (or, following, this account was removed)


class _Tail:
    """What a following tail keeps across connections: the verified view it resumes from, and
    the handles it already looked up."""

    def __init__(self, me: Unlocked, args: argparse.Namespace) -> None:
        self._me = me
        self._args = args
        self._view: CollabView | None = None
        self._names: dict[str, str] = {}
        self.subscribed = False  # the last connection got as far as a subscription

    @property
    def resume_after(self) -> int:
        return 0 if self._view is None else self._view.head.seq

    async def connect_and_print(self) -> None:
        me, args = self._me, self._args
        # Verification starts at the genesis (the membership fold needs every change), or at
        # the fold this device kept (`Session.resume_view`) when `--from` is past it: `--from`
        # filters what is printed. The head saved last time must be on the path.
        state = me.home.state
        self.subscribed = False
        async with _opened(me) as session:
            with _as_member(args.collab):
                async with session.history(
                    args.collab,
                    # after a reconnection: resume right after its head
                    view=self._view or session.resume_view(args.collab, before=args.from_seq),
                    follow=args.follow,
                ) as events:
                    self.subscribed = True
                    if args.stale_after is not None:  # else the relay's interval, plus grace
                        session.client.stale_after = args.stale_after or None
                    saved = trio.current_time()
                    try:
                        while True:
                            try:
                                entry = await events.__anext__()
                            except StopAsyncIteration:
                                break
                            except StaleView as stale:  # a warning: say it once, keep following
                                print(f"warning: {stale}", file=sys.stderr, flush=True)
                                continue
                            if trio.current_time() - saved >= SAVE_HEAD_EVERY:
                                state.save_head(args.collab, events.head)
                                saved = trio.current_time()
                            if entry.seq >= args.from_seq:
                                await self._print(session.client, entry)
                    finally:
                        # Only verified positions are saved, so a relay cannot roll this device
                        # back; the view resumes from the same position (the last entry handed
                        # out).
                        state.save_head(args.collab, events.head)
                        if events.head == events.view.head:  # all of it verified: keep it
                            session.save_view(args.collab, events.view)
                        self._view = events.view

    async def _print(self, client: Client, entry: Entry) -> None:
        names = self._names
        for account_id in (entry.author_id, entry.dm_to, *_mentioned(entry)):
            if account_id and account_id not in names:
                names[account_id] = (await client.account(account_id)).handle
        author = names.get(entry.author_id, "-")
        if self._args.json:
            content = entry.content
            emit_json(
                {
                    "seq": entry.seq,
                    "author": author if entry.author_id else None,
                    "author_id": entry.author_id or None,
                    "ts": entry.ts,
                    "kind": entry.kind or None,
                    "dm_to": entry.dm_to or None,
                    "text": content.text if isinstance(content, contentmod.Message) else None,
                    "summary": describe(entry, names),
                }
            )
            return
        print(f"{entry.seq}\t{author}\t{describe(entry, names)}", flush=True)


def _passing(error: BaseException) -> bool:
    """Whether connecting again later can cure `error`."""
    match error:
        case TooManyConnections():
            return False  # another connection holds the slot: waiting hides that
        case RelayRefused(code=code):
            return code in _PASSING
        case AccessRefused(status=status):
            return status == 503  # the relay cannot check Access tokens right now
        case ConnectionLost() | RelayUnreachable() | trio_websocket.ConnectionClosed():
            return True
        case trio_websocket.HandshakeError() | OSError():
            return True
    return False


def _why(error: BaseException) -> str:
    match error:
        case ConnectionLost(reason=reason):
            return f"the connection closed: {reason or 'no reason given'}"
        case OSError():
            return error.strerror or "cannot connect"
    return _one_line(error)[:200]


def _mentioned(entry: Entry) -> list[str]:
    if entry.proof is None:
        return []
    op = entry.proof.op
    if isinstance(op, AddMember):
        return [op.member.account_id]
    return [getattr(op, "account_id", "")]
