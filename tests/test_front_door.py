"""The front door (SO-5, SO-6; ADR-0018): what an attacker gets from the relay before logging in.

Real relay, real Postgres, real WebSockets. Nothing here is timed: Argon2 work is counted at
argon2-cffi's own entry points (`verify_secret` / `hash_secret`, which run the computation),
so the checks hold however slow or loaded the machine is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import threading
from typing import TYPE_CHECKING

import argon2._password_hasher as argon2_hasher
import nacl.public
import nacl.signing
import pytest
import trio
import trio_websocket

from clientkit import connect
from clientkit._transport import open_websocket
from model import wire
from model.ids import new_id
from relay._frontdoor import AUTH_TIMEOUT_CODE, EVICTED_CODE, Argon2Slots
from relay._throttle import RateBudget
from relay.config import FRONT_DOOR_ENV, ConfigError, FrontDoorLimits, RelayConfig, load_config
from tests.relay_harness import PASSWORD, relay_config, running_relay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from relay._server import Relay

WRONG = "not the password, not even close"
SHIPPED = FrontDoorLimits()


@dataclasses.dataclass
class Argon2Log:
    """Every Argon2 computation the process ran, in order: ("verify", password) or
    ("hash", password), and ("mark", label) entries the test adds between them."""

    entries: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, kind: str, data: bytes) -> None:
        with self.lock:
            self.entries.append((kind, data))

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for k, _ in self.entries if k == kind)

    def mark(self, label: str) -> int:
        self.add("mark", label.encode())
        with self.lock:
            return len(self.entries) - 1

    def after(self, index: int) -> list[tuple[str, bytes]]:
        with self.lock:
            return self.entries[index + 1 :]


@pytest.fixture
def argon2_log(monkeypatch: pytest.MonkeyPatch) -> Argon2Log:
    log = Argon2Log()
    real_verify, real_hash = argon2_hasher.verify_secret, argon2_hasher.hash_secret

    def verify_secret(hash: bytes, secret: bytes, type: argon2_hasher.Type) -> bool:
        log.add("verify", secret)
        return real_verify(hash, secret, type)

    def hash_secret(secret: bytes, salt: bytes, **kwargs: object) -> bytes:
        log.add("hash", secret)
        return real_hash(secret, salt, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(argon2_hasher, "verify_secret", verify_secret)
    monkeypatch.setattr(argon2_hasher, "hash_secret", hash_secret)
    return log


def front_door_config(database_url: str, tmp_path: Path, **limits: int) -> RelayConfig:
    """The test relay's config with the shipped front-door limits (the harness lifts the
    enumeration budgets for other tests), changed by `limits`."""
    return dataclasses.replace(
        relay_config(database_url, tmp_path / "relay"),
        front_door=dataclasses.replace(SHIPPED, **limits),
    )


@pytest.fixture
async def shipped_relay(database_url: str, tmp_path: Path) -> AsyncIterator[Relay]:
    """A relay with the front-door limits exactly as shipped."""
    async with running_relay(front_door_config(database_url, tmp_path)) as relay:
        yield relay


async def request(ws: trio_websocket.WebSocketConnection, frame: wire.Request) -> wire.Reply:
    await ws.send_message(wire.encode(frame))
    data = await ws.get_message()
    assert isinstance(data, bytes)
    return wire.decode_reply(data)


async def opened(
    url: str, nursery: trio.Nursery, stack: contextlib.AsyncExitStack
) -> trio_websocket.WebSocketConnection:
    """A connection that read its `welcome`, closed (TCP stream and all) when `stack` ends."""
    ws = await stack.enter_async_context(open_websocket(url, nursery))
    assert isinstance(wire.decode_reply(await ws.get_message()), wire.Welcome)  # type: ignore[arg-type]
    return ws


def signup_frame(rid: int, handle: str, password: str = PASSWORD) -> wire.Signup:
    return wire.Signup(
        rid=rid,
        account_id=new_id("a"),
        handle=handle,
        password=password,
        sign_pk=bytes(nacl.signing.SigningKey.generate().verify_key),
        box_pk=bytes(nacl.public.PrivateKey.generate().public_key),
    )


async def sign_up(
    url: str, handle: str, password: str = PASSWORD, key: nacl.signing.SigningKey | None = None
) -> str:
    async with connect(url) as client:
        return await client.signup(
            handle,
            password,
            key or nacl.signing.SigningKey.generate(),
            bytes(nacl.public.PrivateKey.generate().public_key),
        )


async def login_frame(url: str, handle: str, password: str) -> bytes:
    """One login on a fresh connection: the relay's reply exactly as it crossed the wire."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, open_websocket(url, nursery) as ws:
            assert isinstance(wire.decode_reply(await ws.get_message()), wire.Welcome)  # type: ignore[arg-type]
            await ws.send_message(wire.encode(wire.Login(rid=1, handle=handle, password=password)))
            frame = await ws.get_message()
            assert isinstance(frame, bytes)
            return frame


def code_of(reply: wire.Reply) -> str:
    return reply.code.value if isinstance(reply, wire.Error) else type(reply).__name__


# --- item 8: handle enumeration is a matter of rate ------------------------------------------


@pytest.mark.objective("SO-6")
async def test_a_loop_of_200_signups_from_one_client_is_rate_limited_after_the_budget(
    shipped_relay: Relay,
) -> None:
    """The enumerator's cheapest tool: sign-up answers `handle_taken` for a taken handle."""
    await sign_up(shipped_relay.url, "alice")
    budget = SHIPPED.signups_per_caller_per_hour
    codes: list[str] = []
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
            ws = await opened(shipped_relay.url, nursery, stack)
            for i in range(200):
                handle = "alice" if i % 2 == 0 else f"probe-{i}"
                codes.append(code_of(await request(ws, signup_frame(i, handle))))
            await ws.aclose()
    # The first sign-up (alice's own) came from this caller too.
    answered = codes[: budget - 1]
    assert set(answered) <= {"handle_taken", "SignedUp"}, answered
    assert "handle_taken" in answered
    # Then only rate_limited: at most one more answer, from the bucket's refill meanwhile.
    rest = codes[budget - 1 :]
    assert rest.count("rate_limited") >= len(rest) - 1, rest
    assert shipped_relay.front_door.throttled >= len(rest) - 1


@pytest.mark.objective("SO-6")
async def test_a_loop_of_200_handle_lookups_from_one_client_is_rate_limited_after_the_budget(
    shipped_relay: Relay,
) -> None:
    await sign_up(shipped_relay.url, "alice")
    budget = SHIPPED.handle_lookups_per_caller_per_hour
    codes: list[str] = []
    async with connect(shipped_relay.url) as client:
        me = await client.login("alice", PASSWORD)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
                ws = await opened(shipped_relay.url, nursery, stack)
                assert isinstance(
                    await request(ws, wire.Authenticate(rid=0, token=me.token)), wire.Authenticated
                )
                for i in range(200):
                    handle = "alice" if i % 2 == 0 else f"probe-{i}"
                    reply = await request(ws, wire.GetAccount(rid=i + 1, handle=handle))
                    codes.append(code_of(reply))
                await ws.aclose()
        answered, rest = codes[:budget], codes[budget:]
        assert set(answered) == {"AccountInfo", "not_found"}, answered
        assert rest.count("rate_limited") >= len(rest) - 1, rest
        # Lookups by account id cannot enumerate (ids are 130 random bits) and stay open: a
        # client still resolves the members it sees.
        assert (await client.account(me.account_id)).handle == "alice"


def test_rate_budgets_charge_the_caller_and_the_relay_and_forget_idle_callers() -> None:
    budget = RateBudget(per_caller_per_hour=3, per_hour=5)
    assert [budget.spend("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.spend("a", 0.0) == pytest.approx(1200.0)  # one token per 20 min
    assert budget.caller_refused("a", 0.0)
    assert [budget.spend("b", 0.0) for _ in range(2)] == [0.0, 0.0]
    # The relay's budget is spent: a fresh caller is refused too, and nothing is stored.
    assert budget.spend("c", 0.0) == pytest.approx(720.0)
    assert not budget.caller_refused("c", 0.0)
    assert budget.tracked_callers() == 2
    # Refill: after 20 minutes "a" has one token again, and so does the relay.
    assert budget.spend("a", 1200.0) == 0.0
    # Callers whose bucket is full again are forgotten once the table grows.
    big = RateBudget(per_caller_per_hour=10, per_hour=10**9)
    for i in range(5000):
        big.spend(f"peer:{i}", float(i))
    assert big.tracked_callers() < 5000


# --- item 9: every login costs one Argon2 verification ---------------------------------------


@pytest.mark.objective("SO-6")
async def test_every_login_costs_one_argon2_verification_whatever_the_handle(
    relay: Relay, argon2_log: Argon2Log
) -> None:
    """An agent's handle used to be answered without any Argon2 work (its stored value is not
    an Argon2 hash), so one timed try told agents from people. Count, do not time."""
    alice_key = nacl.signing.SigningKey.generate()
    await sign_up(relay.url, "alice", key=alice_key)
    async with connect(relay.url) as client:
        await client.login("alice", PASSWORD)
        client.use_key(alice_key)  # creating an agent is signed (ADR-0019)
        await client.create_agent(
            new_id("a"),
            "alice-bot",
            bytes(nacl.signing.SigningKey.generate().verify_key),
            bytes(nacl.public.PrivateKey.generate().public_key),
        )
    costs = {}
    for kind, handle in [
        ("person, wrong password", "alice"),
        ("agent", "alice-bot"),
        ("unknown handle", "nobody-here"),
        ("impossible handle", "NOT A HANDLE"),
    ]:
        before = argon2_log.count("verify")
        reply = wire.decode_reply(await login_frame(relay.url, handle, WRONG))
        assert isinstance(reply, wire.Error)
        assert reply.code is wire.ErrorCode.INVALID_CREDENTIALS
        costs[kind] = argon2_log.count("verify") - before
    assert costs == dict.fromkeys(costs, 1)


@pytest.mark.objective("SO-5")
async def test_an_agent_handle_never_logs_in_and_is_answered_like_a_wrong_password(
    relay: Relay,
) -> None:
    """Agents have no password: whatever is tried, including the relay's own placeholder, the
    answer is byte for byte the one a person's handle gets for a wrong password."""
    alice_key = nacl.signing.SigningKey.generate()
    await sign_up(relay.url, "alice", key=alice_key)
    async with connect(relay.url) as client:
        await client.login("alice", PASSWORD)
        client.use_key(alice_key)  # creating an agent is signed (ADR-0019)
        created = await client.create_agent(
            new_id("a"),
            "alice-bot",
            bytes(nacl.signing.SigningKey.generate().verify_key),
            bytes(nacl.public.PrivateKey.generate().public_key),
        )
    tries = [PASSWORD, "!agent: no password", "", created.token, secrets.token_urlsafe(16)]
    for password in tries:  # five: the free failures, so neither handle is locked yet
        agent = await login_frame(relay.url, "alice-bot", password)
        person = await login_frame(relay.url, "alice", WRONG)
        assert agent == person
        reply = wire.decode_reply(agent)
        assert isinstance(reply, wire.Error)
        assert reply.code is wire.ErrorCode.INVALID_CREDENTIALS


# --- item 6, front door: unauthenticated connections ----------------------------------------


@pytest.mark.objective("SO-6")
async def test_100_idle_unauthenticated_sockets_do_not_keep_a_new_user_out(
    database_url: str, tmp_path: Path
) -> None:
    """Cap hit: the oldest unauthenticated connection is closed with 4002, so idle sockets
    cannot hold the door shut; the relay never holds more than the cap."""
    cap = 32
    config = front_door_config(database_url, tmp_path, max_unauthenticated_connections=cap)
    async with running_relay(config) as relay:
        await sign_up(relay.url, "alice")
        closes: list[tuple[int, str | None]] = []
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
                idle = [await opened(relay.url, nursery, stack) for _ in range(100)]
                async with connect(relay.url) as client:
                    logged_in = await client.login("alice", PASSWORD)
                    assert logged_in.account_id
                    assert await client.account(logged_in.account_id)
                for ws in idle[: 100 - cap]:
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await ws.get_message()
                    reason = closed.value.reason
                    closes.append((reason.code, reason.reason))
                for ws in idle:
                    await ws.aclose()
        assert len(closes) == 100 - cap
        assert {code for code, _ in closes} == {EVICTED_CODE}
        assert "reconnect and log in" in (closes[0][1] or "")
        assert relay.front_door.evicted >= 100 - cap
        assert relay.front_door.unauthenticated <= cap


@pytest.mark.objective("SO-6")
async def test_a_connection_that_does_not_log_in_in_time_is_closed_with_a_reason(
    database_url: str, tmp_path: Path
) -> None:
    # Long enough that the connection which logs in is read well before its deadline even on
    # a loaded machine; the idle one opens after it, so it is closed after that deadline too.
    config = front_door_config(database_url, tmp_path, auth_timeout_seconds=5)
    async with running_relay(config) as relay:
        await sign_up(relay.url, "alice")
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
                ws = await opened(relay.url, nursery, stack)
                assert isinstance(
                    await request(ws, wire.Login(rid=1, handle="alice", password=PASSWORD)),
                    wire.LoggedIn,
                )
                idle = await opened(relay.url, nursery, stack)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await idle.get_message()
                assert closed.value.reason.code == AUTH_TIMEOUT_CODE
                assert "log in" in (closed.value.reason.reason or "")
                await idle.aclose()
                # The connection that logged in in time is still served past its deadline.
                assert isinstance(await request(ws, wire.Ping(rid=2)), wire.Pong)
                await ws.aclose()
        assert relay.front_door.timed_out == 1


# --- item 6, front door: fair Argon2 slots --------------------------------------------------


@pytest.mark.objective("SO-6")
@pytest.mark.parametrize("victim", ["signup", "login"])
async def test_a_login_flood_for_one_handle_does_not_starve_another_users_turn(
    relay: Relay, argon2_log: Argon2Log, victim: str
) -> None:
    """Mallory keeps a dozen connections logging in to her own account with her right
    password, so every attempt costs a full Argon2 verification and none is ever locked. The
    victim's sign-up (or login) must get the next Argon2 slot that frees, not wait behind the
    whole flood: counted in verifications that started between the victim's request and its
    own Argon2 work, the bound is one per slot plus two (the login lane's place in its round,
    and a slot freed while the request was on its way in); the old FIFO made it ~10."""
    flooders = 12
    await sign_up(relay.url, "mallory")
    victim_password = "the victim's own long password"
    if victim == "login":
        await sign_up(relay.url, "victim", victim_password)
    victim_secret = victim_password.encode()
    stop, swinging = trio.Event(), trio.Event()
    logins = 0

    async def flood() -> None:
        nonlocal logins
        async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
            ws = await opened(relay.url, nursery, stack)
            rid = 0
            while not stop.is_set():
                rid += 1
                reply = await request(ws, wire.Login(rid=rid, handle="mallory", password=PASSWORD))
                assert isinstance(reply, wire.LoggedIn), reply
                logins += 1
                if logins >= 2 * flooders:
                    swinging.set()
            await ws.aclose()

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
            for _ in range(flooders):
                nursery.start_soon(flood)
            await swinging.wait()  # the flood is in full swing
            ws = await opened(relay.url, nursery, stack)
            mark = argon2_log.mark("victim sends")
            if victim == "signup":
                reply = await request(ws, signup_frame(1, "victim", victim_password))
                assert isinstance(reply, wire.SignedUp), reply
            else:
                reply = await request(
                    ws, wire.Login(rid=1, handle="victim", password=victim_password)
                )
                assert isinstance(reply, wire.LoggedIn), reply
            stop.set()
            await ws.aclose()
    after = argon2_log.after(mark)
    own = next(i for i, (_, secret) in enumerate(after) if secret == victim_secret)
    ahead = [kind for kind, _ in after[:own]]
    assert set(ahead) <= {"verify"}
    bound = SHIPPED.argon2_slots + 2
    assert len(ahead) <= bound, f"{len(ahead)} of Mallory's verifications went first"


async def test_argon2_slots_alternate_classes_and_lanes_and_survive_cancellation() -> None:
    slots = Argon2Slots(1)
    order: list[str] = []
    gate = trio.Event()

    async def holder() -> None:
        async with slots.turn("login", "first"):
            await gate.wait()

    async def waiter(kind: str, lane: str, name: str) -> None:
        async with slots.turn(kind, lane):  # type: ignore[arg-type]
            order.append(name)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.sleep(0.01)
        for i in range(3):
            nursery.start_soon(waiter, "login", "mallory", f"m{i}")
            await trio.sleep(0.01)
        nursery.start_soon(waiter, "login", "bob", "bob")
        await trio.sleep(0.01)
        doomed = trio.CancelScope()

        async def doomed_waiter() -> None:
            with doomed:
                await waiter("signup", "peer:y", "never")

        nursery.start_soon(doomed_waiter)
        await trio.sleep(0.01)
        nursery.start_soon(waiter, "signup", "peer:z", "carol")
        await trio.sleep(0.01)
        doomed.cancel()
        await trio.sleep(0.01)
        gate.set()
    # Sign-ups and logins alternate; within logins, Mallory's lane and Bob's take turns.
    assert order == ["carol", "m0", "bob", "m1", "m2"], order
    stats = slots.statistics()
    assert (stats.busy, sum(stats.waiting.values())) == (0, 0)


def test_every_front_door_limit_is_a_setting_with_an_environment_variable(tmp_path: Path) -> None:
    env = {name: str(low + 1) for name, low, _ in FRONT_DOOR_ENV.values()}
    loaded = load_config(env=env, data_dir=tmp_path).front_door
    assert dataclasses.asdict(loaded) == {
        key: low + 1 for key, (_, low, _) in FRONT_DOOR_ENV.items()
    }
    assert set(FRONT_DOOR_ENV) == {f.name for f in dataclasses.fields(FrontDoorLimits)}
    assert load_config(env={}, data_dir=tmp_path).front_door == SHIPPED
    with pytest.raises(ConfigError, match="COZY_MAX_UNAUTHENTICATED_CONNECTIONS"):
        load_config(env={"COZY_MAX_UNAUTHENTICATED_CONNECTIONS": "0"}, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="COZY_AUTH_TIMEOUT"):
        load_config(env={"COZY_AUTH_TIMEOUT": "soon"}, data_dir=tmp_path)
