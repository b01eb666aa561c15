"""The relay's front door: what it spends on callers before they have logged in (SO-6).

Three things live here, each bounded by a `FrontDoorLimits` value from the relay's config
(docs/operator-guide.md, "The front door"; ADR-0018):

- **Unauthenticated connections.** At most `max_unauthenticated_connections` at once: one more
  closes the *oldest* of them (code 4002), so a pile of idle sockets cannot keep a new user
  out: an attacker must open connections faster than a user logs in. A connection still
  unauthenticated `auth_timeout_seconds` after it opened is closed (code 4001), once the login
  or sign-up it may be waiting for has been answered.
- **Argon2 slots, shared fairly** (`Argon2Slots`). Password hashing and verification take one of
  `argon2_slots` slots. Waiters are served in turns: sign-ups and logins alternate, so each
  class gets at least every other slot that frees while both wait; within logins every handle
  with attempts waiting gets one turn per round (a flood for one handle costs another handle's
  login at most one verification per slot), and within sign-ups every caller does.
- **Rate budgets against handle enumeration** (`relay._throttle.RateBudget`): sign-ups, and
  handle lookups (`get_account` by handle, `create_agent`), per caller and for the relay.

What does not live here: the per-handle login lockouts (relay/_throttle.py and the ledger),
which are on the database clock and shared by every relay; these limits are per relay process.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final, Literal

import trio

from model import wire
from relay._throttle import RateBudget, Throttled

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from relay._connection import Connection
    from relay._timers import Timer, Timers
    from relay.config import FrontDoorLimits

AUTH_TIMEOUT_CODE: Final = wire.CloseCode.AUTH_TIMEOUT
EVICTED_CODE: Final = wire.CloseCode.EVICTED

Turn = Literal["signup", "login"]
_TURNS: Final[tuple[Turn, ...]] = ("signup", "login")


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False


@dataclass(frozen=True, slots=True)
class Argon2SlotStats:
    slots: int
    busy: int
    waiting: dict[str, int]  # per turn ("signup", "login")
    lanes: dict[str, int]  # lanes with waiters, per turn


class Argon2Slots:
    """`slots` places for Argon2 work, handed out in turns (see the module docstring).

    `async with slots.turn("login", handle):` waits for a place. A waiter cancelled before
    its turn leaves the queue; one cancelled just as its place was handed over passes it on,
    so a place is never lost. Work-conserving: a place never stays free while anyone waits.
    """

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._free = slots
        self._lanes: dict[Turn, OrderedDict[str, deque[_Waiter]]] = {
            t: OrderedDict() for t in _TURNS
        }
        self._last: Turn = "login"  # so that the first contended turn goes to a sign-up

    @asynccontextmanager
    async def turn(self, kind: Turn, lane: str) -> AsyncIterator[None]:
        await self._acquire(kind, lane)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, kind: Turn, lane: str) -> None:
        if self._free > 0 and not any(self._lanes.values()):
            self._free -= 1
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                self._release()
                raise
            return
        waiter = _Waiter()
        self._lanes[kind].setdefault(lane, deque()).append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._release()  # handed over as we were cancelled: pass it on
            else:
                queue = self._lanes[kind][lane]
                queue.remove(waiter)
                if not queue:
                    del self._lanes[kind][lane]
            raise

    def _release(self) -> None:
        waiter = self._next_waiter()
        if waiter is None:
            self._free += 1
            return
        waiter.granted = True
        waiter.event.set()

    def _next_waiter(self) -> _Waiter | None:
        start = _TURNS.index(self._last) + 1
        for i in range(len(_TURNS)):
            kind = _TURNS[(start + i) % len(_TURNS)]
            lanes = self._lanes[kind]
            if not lanes:
                continue
            lane, queue = next(iter(lanes.items()))
            waiter = queue.popleft()
            del lanes[lane]
            if queue:
                lanes[lane] = queue  # to the back of the round
            self._last = kind
            return waiter
        return None

    def statistics(self) -> Argon2SlotStats:
        return Argon2SlotStats(
            slots=self._slots,
            busy=self._slots - self._free,
            waiting={t: sum(len(q) for q in self._lanes[t].values()) for t in _TURNS},
            lanes={t: len(self._lanes[t]) for t in _TURNS},
        )


class FrontDoor:
    """Unauthenticated connections, Argon2 slots and enumeration budgets of one relay."""

    def __init__(self, limits: FrontDoorLimits, timers: Timers) -> None:
        self.limits = limits
        self._timers = timers
        self.argon2 = Argon2Slots(limits.argon2_slots)
        self.signups = RateBudget(limits.signups_per_caller_per_hour, limits.signups_per_hour)
        self.lookups = RateBudget(
            limits.handle_lookups_per_caller_per_hour, limits.handle_lookups_per_hour
        )
        # Unauthenticated connections, oldest first, each with its deadline's timer.
        self._waiting: OrderedDict[Connection, Timer] = OrderedDict()
        self._busy: dict[Connection, trio.Event] = {}  # a login or sign-up being answered
        self.evicted = 0
        self.timed_out = 0
        self.throttled = 0

    @property
    def unauthenticated(self) -> int:
        return len(self._waiting)

    def admit(self, conn: Connection) -> None:
        """Count a new connection as unauthenticated; over the cap, close the oldest one.

        The oldest that is not waiting for a login or sign-up answer goes first, so a flood of
        new sockets does not cut off a user whose login is already in the Argon2 queue.
        """
        self._waiting[conn] = self._timers.call_later(
            self.limits.auth_timeout_seconds, partial(self._deadline_passed, conn)
        )
        while len(self._waiting) > self.limits.max_unauthenticated_connections:
            oldest = next((c for c in self._waiting if c not in self._busy), None)
            if oldest is None:
                oldest = next(iter(self._waiting))
            self._waiting.pop(oldest).cancel()
            self.evicted += 1
            oldest.close_gracefully(
                EVICTED_CODE,
                "too many connections are waiting to log in: reconnect and log in right away",
            )

    def authenticated(self, conn: Connection) -> None:
        """The connection logged in or authenticated: it no longer counts against the cap, and
        its deadline is off."""
        if (deadline := self._waiting.pop(conn, None)) is not None:
            deadline.cancel()

    def closed(self, conn: Connection) -> None:
        self.authenticated(conn)

    def _deadline_passed(self, conn: Connection) -> None:
        """`auth_timeout_seconds` after `admit` (a timer, relay/_timers.py): close `conn` if it
        is still unauthenticated. A login or sign-up in progress is answered first (its reply
        flushed with the close), in a task of the connection's own."""
        if conn not in self._waiting or conn.closing:
            return
        if conn in self._busy:
            conn.nursery.start_soon(self._close_after_answer, conn)
        else:
            self._time_out(conn)

    async def _close_after_answer(self, conn: Connection) -> None:
        while (busy := self._busy.get(conn)) is not None:
            await busy.wait()
        self._time_out(conn)

    def _time_out(self, conn: Connection) -> None:
        if conn in self._waiting and not conn.closing:
            self._waiting.pop(conn, None)
            self.timed_out += 1
            conn.close_gracefully(
                AUTH_TIMEOUT_CODE,
                f"no login within {self.limits.auth_timeout_seconds} s of connecting:"
                " reconnect and log in right away",
            )

    @asynccontextmanager
    async def answering(self, conn: Connection) -> AsyncIterator[None]:
        """Mark a login or sign-up on `conn` as in progress (the deadline waits for it)."""
        done = self._busy[conn] = trio.Event()
        try:
            yield
        finally:
            del self._busy[conn]
            done.set()

    def spend_signup(self, caller: str) -> None:
        """Charge one sign-up to `caller` and the relay. Raises `Throttled`."""
        self._spend(self.signups, caller, "sign-ups")

    def spend_handle_lookup(self, caller: str) -> None:
        """Charge one handle lookup to `caller` and the relay. Raises `Throttled`."""
        self._spend(self.lookups, caller, "handle lookups")

    def _spend(self, budget: RateBudget, caller: str, what: str) -> None:
        now = trio.current_time()
        wait = budget.spend(caller, now)
        if wait <= 0:
            return
        self.throttled += 1
        seconds = max(1, math.ceil(wait))
        if budget.caller_refused(caller, now):
            message = f"too many {what} from you; try again in {seconds} s"
        else:
            message = f"this relay takes no more {what} right now; try again in {seconds} s"
        raise Throttled(message, wait=wait)
