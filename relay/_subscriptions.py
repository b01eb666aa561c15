"""Reads: a subscription catches up from the ledger and, when following, stays live through the
fan-out (fanout/_fanout.py). Each belongs to the session that opened it and ends with it."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import TYPE_CHECKING

from trio_websocket import ConnectionClosed

from fanout import Subscription
from ledger import LedgerError
from model import wire
from relay._context import RequestRefused

if TYPE_CHECKING:
    from relay._checkpoints import CollabTrees
    from relay._connection import Connection
    from relay._context import Services


class Subscriptions:
    def __init__(self, services: Services, trees: CollabTrees | None = None) -> None:
        self._s = services
        self._trees = trees

    def subscribe(self, conn: Connection, req: wire.Subscribe) -> None:
        if req.from_seq < 1:
            raise RequestRefused(wire.ErrorCode.INVALID_REQUEST, "from_seq starts at 1")
        if req.collab_id in conn.subscriptions:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "already subscribed to this collab on this connection",
            )
        sub = Subscription(
            req.collab_id,
            req.from_seq,
            conn,
            follow=req.follow,
            account_id=conn.account_id or "",
        )
        sub.tree_size = max(0, req.tree_size)
        if (busy := self._s.fanout.admit(sub)) is not None:  # catch-up caps (fanout/_catchup.py)
            raise self._s.overload(busy)
        # Registered now, with no await since its membership was checked, so a removal that
        # commits from here on finds it and ends it (the streaming task starts later).
        self._s.fanout.register(sub)
        conn.subscriptions[req.collab_id] = sub
        conn.reply(wire.Subscribed(rid=req.rid, collab_id=req.collab_id, from_seq=req.from_seq))
        conn.nursery.start_soon(self._stream, conn, sub)

    def unsubscribe(self, conn: Connection, req: wire.Unsubscribe) -> None:
        found = conn.subscriptions.pop(req.collab_id, None)
        if found is None:
            raise RequestRefused(wire.ErrorCode.NOT_FOUND, "not subscribed to this collab")
        self._s.fanout.remove(found)
        conn.reply(wire.Unsubscribed(rid=req.rid, collab_id=req.collab_id))

    def end_all(self, conn: Connection, reason: str) -> None:
        """The session ended: end every subscription it opened, telling the client why."""
        subs, conn.subscriptions = list(conn.subscriptions.values()), {}
        for sub in subs:
            self._s.fanout.end(sub, reason)

    def drop_all(self, conn: Connection) -> None:
        """The connection closed: forget its subscriptions without a word."""
        subs, conn.subscriptions = list(conn.subscriptions.values()), {}
        for sub in subs:
            self._s.fanout.remove(sub)

    async def _stream(self, conn: Connection, sub: Subscription) -> None:
        try:
            if self._trees is not None:
                # Held before the catch-up, so its `caught_up` can carry the checkpoint (without
                # one when the ledger cannot be read now: the catch-up reports that itself).
                with contextlib.suppress(LedgerError):
                    await self._trees.load(sub.collab_id)
            await self._s.fanout.stream(sub)
            self._next_heartbeat(conn, sub)
        except ConnectionClosed:
            self._s.fanout.remove(sub)
        finally:
            # A finished (non-following) subscription frees its collab slot on this connection.
            if sub.ended and conn.subscriptions.get(sub.collab_id) is sub:
                del conn.subscriptions[sub.collab_id]

    def _next_heartbeat(self, conn: Connection, sub: Subscription) -> None:
        """While the subscription is open, its current signed checkpoint at least every
        `checkpoint_interval_ms` (ADR-0020), with the proof from the last one it was sent.

        A timer per beat (relay/_timers.py), not a task asleep per subscription: an idle
        subscriber costs no task between beats; each beat (a tree read) runs in a short task.
        """
        if self._trees is None or not sub.follow or not _current(conn, sub):
            return
        interval = self._s.config.checkpoint_interval_ms / 1000
        self._s.timers.call_later(interval, partial(self._heartbeat_due, conn, sub))

    def _heartbeat_due(self, conn: Connection, sub: Subscription) -> None:
        if _current(conn, sub):
            conn.nursery.start_soon(self._heartbeat, conn, sub)

    async def _heartbeat(self, conn: Connection, sub: Subscription) -> None:
        assert self._trees is not None
        try:
            frame, size = await self._trees.heartbeat(sub.collab_id, sub.tree_size)
        except LedgerError:
            pass  # the tree could not be read now: the next beat tries again
        else:
            if _current(conn, sub):
                conn.reply(frame)
                sub.tree_size = size
        self._next_heartbeat(conn, sub)


def _current(conn: Connection, sub: Subscription) -> bool:
    """`sub` is still open on `conn` (not ended, unsubscribed, or gone with the connection)."""
    return not sub.ended and conn.subscriptions.get(sub.collab_id) is sub
