"""The bot's cursor: the last entry whose handlers finished, committed in batches (clientkit/bot.py).

Committing per entry (a transaction with a full sync each) cost a fresh bot more than its
verification; so while a backlog is handled the cursor is committed every `CURSOR_EVERY`
entries or `CURSOR_AFTER` seconds, at once when nothing more is queued (live traffic), within
`CURSOR_AFTER` when the stream goes quiet, and when the session ends. A crash replays at most
that batch: delivery is at least once, and posts and DMs are exactly once (each is kept in the
store, by entry, before it is sent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from clientkit._session import Session
    from model.chain import Head
    from model.view import CollabView

# While a backlog is handled, the cursor is committed every this many entries or seconds.
CURSOR_EVERY: Final = 1000
CURSOR_AFTER: Final = 1.0
# And the fold at the cursor is kept this often (sealed, in the store: a restart resumes there).
VIEW_EVERY: Final = 30.0


class Cursor:
    """The bot's cursor (the last entry whose handlers finished), committed with the verified
    head in batches: at most `CURSOR_EVERY` entries or `CURSOR_AFTER` seconds behind while a
    backlog is being handled, at once when nothing more is queued (live traffic), and when the
    session ends. A crash replays at most that batch: delivery is at least once, and posts and
    DMs are exactly once (each is kept in the store, by entry, before it is sent)."""

    def __init__(self, session: Session, collab_id: str, seq: int) -> None:
        self._session = session
        self._collab_id = collab_id
        self.seq = seq
        self._pending: Head | None = None
        self._committed: Head | None = None
        self._view: CollabView | None = None
        self._count = 0
        self._since = self._kept = trio.current_time()

    def handled(self, head: Head, view: CollabView, *, more: bool) -> None:
        self.seq, self._pending, self._view = head.seq, head, view
        self._count += 1
        if (
            not more
            or self._count >= CURSOR_EVERY
            or trio.current_time() - self._since >= CURSOR_AFTER
        ):
            self.commit()

    async def commit_when_quiet(self) -> None:
        """A batch still pending when the stream went quiet is committed `CURSOR_AFTER` later
        (its last entry was handled while a frame that held no entry, such as `caught_up`, was
        still queued, and no entry came after it to commit it)."""
        while True:
            await trio.sleep(CURSOR_AFTER)
            if self._pending is not None and trio.current_time() - self._since >= CURSOR_AFTER:
                self.commit()

    def commit(self, *, final: bool = False) -> None:
        """Commit what is pending; now and then (`VIEW_EVERY` seconds, and when the session
        ends) keep the fold at the cursor too, so a restart resumes there."""
        pending, view, now = self._pending, self._view, trio.current_time()
        if pending is not None:
            self._session.state.commit_cursor(self._collab_id, pending)
            self._committed = pending
        if (
            view is not None
            and view.head == self._committed  # not read ahead: the fold is at the cursor
            and (final or now - self._kept >= VIEW_EVERY)
        ):
            self._session.save_view(self._collab_id, view)
            self._kept = now
        self._pending, self._count, self._since = None, 0, now
