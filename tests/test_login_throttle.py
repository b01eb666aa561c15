"""Login throttling, Argon2id rehash on login, and the JWT kill switch (SO-6; SPEC §4).

Real relay, real Postgres, real WebSockets; the operator and user commands run as real
processes. Delays are kept short by swapping in a policy with a 0.2 s base delay (the
documented numbers are checked on the pure policy) and by writing `login_failures` rows the way
a long attack would have left them.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import secrets
from typing import TYPE_CHECKING

import argon2
import nacl.public
import nacl.signing
import psycopg
import pytest
import trio

import relay._auth as relay_auth
import relay._throttle as relay_throttle
from clientkit import RelayRefused, connect
from clientkit._transport import open_websocket
from ledger import AccountRow, Ledger, LoginPolicy
from model import wire
from model.ids import new_id
from relay.config import load_config
from relay.embedded import free_port
from tests.cli_harness import client_env, cozy
from tests.relay_harness import PASSWORD, running_relay

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay
    from relay.config import RelayConfig

WRONG = "not the password, not even close"
LOCKED = re.compile(r"^too many failed logins for this handle; try again in (\d+) s$")


@pytest.fixture
def fast_policy(monkeypatch: pytest.MonkeyPatch) -> LoginPolicy:
    """The relay's policy as shipped but for the base delay, which is long enough (2 s) that the
    next attempt reliably arrives while the lock holds, even on a loaded machine where a login
    round trip with its Argon2 work takes most of a second (0.2 s made these tests flaky)."""
    policy = dataclasses.replace(relay_throttle.LOGIN_POLICY, base_delay=2.0)
    monkeypatch.setattr(relay_throttle, "LOGIN_POLICY", policy)
    return policy


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Every call of the relay's password verifier: the hash it got (None: unknown handle)."""
    calls: list[str | None] = []
    real = relay_auth.verify_password

    def counting(password_hash: str | None, password: str) -> bool:
        calls.append(password_hash)
        return real(password_hash, password)

    monkeypatch.setattr(relay_auth, "verify_password", counting)
    return calls


async def sign_up(url: str, handle: str) -> str:
    async with connect(url) as client:
        return await client.signup(
            handle,
            PASSWORD,
            nacl.signing.SigningKey.generate(),
            bytes(nacl.public.PrivateKey.generate().public_key),
        )


async def login(url: str, handle: str, password: str) -> wire.Reply:
    """One login on a fresh connection: the relay's reply, decoded."""
    return wire.decode_reply(await login_frame(url, handle, password))


async def login_frame(url: str, handle: str, password: str) -> bytes:
    """One login on a fresh connection: the relay's reply exactly as it crossed the wire."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, open_websocket(url, nursery) as ws:
            assert isinstance(wire.decode_reply(await ws.get_message()), wire.Welcome)  # type: ignore[arg-type]
            await ws.send_message(wire.encode(wire.Login(rid=1, handle=handle, password=password)))
            frame = await ws.get_message()
            assert isinstance(frame, bytes)
            return frame


def refusal(reply: wire.Reply) -> tuple[wire.ErrorCode, str]:
    assert isinstance(reply, wire.Error), reply
    return reply.code, reply.message


def keyer(relay: Relay) -> relay_throttle.HandleKeyer:
    """How `relay` keys its `login_failures` rows (a keyed hash of the handle)."""
    return relay_throttle.HandleKeyer(relay.config.jwt_signing_key.value)


def throttle_row(database_url: str, handle_key: bytes) -> dict[str, object]:
    """The handle's `login_failures` row; `lock` is the current lock length in seconds."""
    with psycopg.connect(database_url) as conn:
        r = conn.execute(
            "SELECT failures, window_failures,"
            " extract(epoch FROM locked_until - last_failure_at)::float8"
            " FROM login_failures WHERE handle_key = %s",
            (handle_key,),
        ).fetchone()
    assert r is not None, "no login_failures row for that handle"
    return {"failures": r[0], "window_failures": r[1], "lock": r[2]}


async def wait_unlocked(database_url: str, handle_key: bytes) -> None:
    store = Ledger(database_url)
    store.open()
    try:
        with trio.fail_after(20):
            for _ in range(100):
                wait = store.login_wait(handle_key)
                if wait == 0:
                    break
                await trio.sleep(wait + 0.02)
    finally:
        store.close()


# --- the policy as documented ---------------------------------------------------------------


@pytest.mark.objective("SO-6")
def test_the_shipped_policy_is_five_free_failures_then_doubling_from_1s_to_15min() -> None:
    policy = relay_throttle.LOGIN_POLICY
    delays = [policy.delay_after(n) for n in range(1, 21)]
    assert delays == [0.0] * 5 + [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900, 900, 900]
    assert policy.delay_after(10_000) == 900
    assert (policy.window_cap, policy.window_seconds) == (100, 3600)


# --- lockouts over the wire -----------------------------------------------------------------


@pytest.mark.objective("SO-6")
async def test_lockout_grows_refuses_without_verifying_and_a_success_resets_it(
    relay: Relay, database_url: str, fast_policy: LoginPolicy, verifications: list[str | None]
) -> None:
    key = keyer(relay)
    await sign_up(relay.url, "alice")
    for n in range(1, 6):  # the free failures: answered, verified, no lock
        assert (
            refusal(await login(relay.url, "alice", WRONG))[0] is wire.ErrorCode.INVALID_CREDENTIALS
        )
        assert throttle_row(database_url, key("alice"))["lock"] is None
        assert len(verifications) == n
    locks = []
    for n in (6, 7, 8):
        await wait_unlocked(database_url, key("alice"))
        code, _ = refusal(await login(relay.url, "alice", WRONG))
        assert code is wire.ErrorCode.INVALID_CREDENTIALS
        row = throttle_row(database_url, key("alice"))
        assert (row["failures"], row["window_failures"]) == (n, n)
        locks.append(row["lock"])
        # Locked: even the right password is refused, and it never reaches the verifier.
        code, message = refusal(await login(relay.url, "alice", PASSWORD))
        assert code is wire.ErrorCode.RATE_LIMITED
        assert LOCKED.match(message), message
        assert len(verifications) == n
        assert throttle_row(database_url, key("alice"))["window_failures"] == n
    assert locks == pytest.approx([2.0, 4.0, 8.0], abs=0.01)
    await wait_unlocked(database_url, key("alice"))
    assert isinstance(await login(relay.url, "alice", PASSWORD), wire.LoggedIn)
    # A success resets the consecutive failures but not the hourly count.
    row = throttle_row(database_url, key("alice"))
    assert (row["failures"], row["window_failures"]) == (0, 8)
    assert refusal(await login(relay.url, "alice", WRONG))[0] is wire.ErrorCode.INVALID_CREDENTIALS
    assert throttle_row(database_url, key("alice"))["lock"] is None


@pytest.mark.objective("SO-6")
async def test_a_known_and_an_unknown_handle_get_byte_identical_answers_at_every_step(
    relay: Relay, database_url: str, fast_policy: LoginPolicy, verifications: list[str | None]
) -> None:
    key = keyer(relay)
    await sign_up(relay.url, "bob-known")
    steps: list[bytes] = []
    for step in range(1, 10):
        if step in (8,):
            await wait_unlocked(database_url, key("bob-known"))
            await wait_unlocked(database_url, key("bob-ghost"))
        known = await login_frame(relay.url, "bob-known", WRONG)
        unknown = await login_frame(relay.url, "bob-ghost", WRONG)
        assert known == unknown, f"step {step}: {known!r} != {unknown!r}"
        steps.append(known)
    codes = [refusal(wire.decode_reply(f))[0] for f in steps]
    bad, limited = wire.ErrorCode.INVALID_CREDENTIALS, wire.ErrorCode.RATE_LIMITED
    assert codes == [bad] * 6 + [limited, bad, limited]
    # Both were verified equally often (the unknown one against the dummy hash), and both rows
    # look alike.
    assert verifications.count(None) == len(verifications) // 2 == 7
    known_row = throttle_row(database_url, key("bob-known"))
    assert known_row == pytest.approx(throttle_row(database_url, key("bob-ghost")), abs=0.01)


@pytest.mark.objective("SO-6")
async def test_after_100_failures_in_an_hour_the_handle_is_locked_until_the_hour_ends(
    relay: Relay, database_url: str, verifications: list[str | None]
) -> None:
    key = keyer(relay)
    await sign_up(relay.url, "carol")
    # 99 failures in the last 10 minutes, with logins in between (no consecutive lock).
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO login_failures (handle_key, failures, window_start, window_failures)"
            " VALUES (%s, 0, now() - interval '10 minutes', 99)",
            (key("carol"),),
        )
    assert refusal(await login(relay.url, "carol", WRONG))[0] is wire.ErrorCode.INVALID_CREDENTIALS
    assert len(verifications) == 1  # the 100th attempt was verified
    row = throttle_row(database_url, key("carol"))
    assert (row["failures"], row["window_failures"]) == (1, 100)
    # Attempt 101, with the right password: refused until the window's hour is over, unverified.
    code, message = refusal(await login(relay.url, "carol", PASSWORD))
    assert code is wire.ErrorCode.RATE_LIMITED
    match = LOCKED.match(message)
    assert match is not None, message
    assert 49 * 60 < int(match.group(1)) <= 50 * 60
    assert len(verifications) == 1
    # The hour passes: the right password works again and the next failure opens a new window.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE login_failures SET window_start = now() - interval '1 hour',"
            " locked_until = now() WHERE handle_key = %s",
            (key("carol"),),
        )
    assert isinstance(await login(relay.url, "carol", PASSWORD), wire.LoggedIn)
    assert refusal(await login(relay.url, "carol", WRONG))[0] is wire.ErrorCode.INVALID_CREDENTIALS
    row = throttle_row(database_url, key("carol"))
    assert (row["failures"], row["window_failures"], row["lock"]) == (1, 1, None)


# --- rehash on login ------------------------------------------------------------------------


@pytest.mark.objective("SO-6")
@pytest.mark.usefixtures("shipped_password_hashes")  # the relay's real hasher, not the tests'
async def test_a_login_rehashes_a_password_hashed_with_weaker_argon2_parameters(
    relay: Relay, ledger: Ledger
) -> None:
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    current = argon2.PasswordHasher()
    assert current.check_needs_rehash(weak)
    ledger.create_account(
        AccountRow(
            new_id("a"),
            "dave",
            weak,
            bytes(nacl.signing.SigningKey.generate().verify_key),
            bytes(nacl.public.PrivateKey.generate().public_key),
        )
    )
    assert isinstance(await login(relay.url, "dave", PASSWORD), wire.LoggedIn)
    row = ledger.account_by_handle("dave")
    assert row is not None
    assert row.password_hash != weak
    assert not current.check_needs_rehash(row.password_hash)
    params = argon2.extract_parameters(row.password_hash)
    assert (params.type, params.time_cost, params.memory_cost, params.parallelism) == (
        argon2.Type.ID,
        current.time_cost,
        current.memory_cost,
        current.parallelism,
    )
    assert current.verify(row.password_hash, PASSWORD)
    # Up to date now: the next login leaves it alone.
    assert isinstance(await login(relay.url, "dave", PASSWORD), wire.LoggedIn)
    again = ledger.account_by_handle("dave")
    assert again is not None
    assert again.password_hash == row.password_hash


# --- operator commands ----------------------------------------------------------------------


def server_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JWT_SIGNING_KEY", "COZY_RELAY_CONFIG", "COZY_DATA_DIR", "DATABASE_URL")
    }
    env.update(extra)
    return env


@pytest.mark.objective("SO-6")
async def test_operators_list_and_clear_lockouts_with_cozy_relay_lockouts(
    ledger: Ledger, database_url: str, tmp_path: Path
) -> None:
    policy = relay_throttle.LOGIN_POLICY
    data_dir = ["--data-dir", str(tmp_path / "relay")]
    # The relay's own key (created in its data dir on first use), as `cozy relay` finds it.
    config = load_config(env={}, data_dir=tmp_path / "relay")
    key = relay_throttle.HandleKeyer(config.jwt_signing_key.value)
    ledger.create_account(
        AccountRow(
            new_id("a"),
            "mallory",
            "$argon2id$x",
            bytes(nacl.signing.SigningKey.generate().verify_key),
            bytes(nacl.public.PrivateKey.generate().public_key),
        )
    )
    for _ in range(12):  # locked for 2**6 = 64 s
        ledger.record_login_failure(key("mallory"), policy=policy)
    ledger.record_login_failure(key("typo-only"), policy=policy)
    ledger.record_login_failure(key("\x1b[31mred"), policy=policy)
    env = server_env(DATABASE_URL=database_url)

    listed = (await cozy("relay", "lockouts", "list", *data_dir, env=env)).stdout.decode()
    lines = [line.split() for line in listed.splitlines()]
    assert lines[0] == ["HANDLE", "FAILURES", "HOURLY", "FAILURES", "LOCKED", "UNTIL"]
    rows = {line[0]: line[1:] for line in lines[1:]}
    assert rows["mallory"][:2] == ["12", "12"]
    assert rows["mallory"][-1] == "UTC"
    # Strings that are no account's handle are not stored, so they cannot be shown: only
    # their keyed hash is, and that is all an operator (or a thief) sees.
    unnamed = [r for name, r in rows.items() if name.startswith("(no-account:")]
    assert unnamed == [["1", "1", "-"], ["1", "1", "-"]]
    assert "typo-only" not in listed
    assert "red" not in listed
    assert "\x1b" not in listed

    cleared = await cozy("relay", "lockouts", "clear", "mallory", *data_dir, env=env)
    assert b"cleared mallory" in cleared.stdout
    assert ledger.login_wait(key("mallory")) == 0.0
    again = await cozy("relay", "lockouts", "clear", "mallory", *data_dir, env=env, check=False)
    assert again.returncode == 1
    assert b"nothing to clear" in again.stderr
    # A handle that is no account can still be cleared by name.
    await cozy("relay", "lockouts", "clear", "typo-only", *data_dir, env=env)
    listed = (await cozy("relay", "lockouts", "list", *data_dir, env=env)).stdout.decode()
    assert "mallory" not in listed
    assert listed.count("(no-account:") == 1


@pytest.mark.objective("SO-6")
async def test_a_database_thief_finds_no_handle_ever_tried_in_login_failures(
    relay: Relay, database_url: str
) -> None:
    await sign_up(relay.url, "grace")
    # Someone types a password into the handle field (it fits the handle pattern), and
    # someone probes made-up handles; each attempt is counted.
    tried = ["grace", "tr0ub4dor-and-3", "ceo.of.acme", "mallory-was-here"]
    for handle in tried:
        assert (
            refusal(await login(relay.url, handle, WRONG))[0] is wire.ErrorCode.INVALID_CREDENTIALS
        )
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT * FROM login_failures").fetchall()
        columns = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'login_failures'"
            )
        ]
    assert len(rows) == len(tried)  # still one row per handle tried: the throttle works
    assert "handle" not in columns
    dump = repr(rows).encode() + b"".join(
        bytes(v) for row in rows for v in row if isinstance(v, bytes | memoryview)
    )
    for handle in tried:
        for form in (handle.encode(), handle.encode().hex().encode()):
            assert form not in dump, handle
    # Without the relay's key a thief cannot test a guess either: the row of "grace" is not
    # an unkeyed hash of it, nor one keyed with anything but the relay's derived key.
    keys = {bytes(r[columns.index("handle_key")]) for r in rows}
    assert keyer(relay)("grace") in keys
    assert hashlib.blake2b(b"grace", digest_size=32).digest() not in keys
    assert hashlib.sha256(b"grace").digest() not in keys
    other = relay_throttle.HandleKeyer(b"another relay's jwt signing key, 32+ bytes long")
    assert other("grace") not in keys


# --- the kill switch ------------------------------------------------------------------------


@pytest.mark.objective("SO-6")
async def test_rotating_the_jwt_key_kills_every_session_and_the_cli_says_to_log_in_again(
    database_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "relay"
    port = free_port()

    def config() -> RelayConfig:
        return load_config(
            env={},
            data_dir=data_dir,
            database_url=database_url,
            port=port,
            ops_port=0,
            allow_test_kdf=True,  # the CLI below seals with the test profile
        )

    home = tmp_path / "erin"
    first = config()
    async with running_relay(first) as relay_a:
        url = relay_a.url
        await cozy("account", "signup", "--relay", url, "--handle", "erin", env=client_env(home))
    old_token = json.loads((home / "profile.json").read_text())["token"]
    key_file = data_dir / "jwt_signing_key"
    old_key = key_file.read_text()

    rotated = await cozy("relay", "rotate-jwt-key", "--data-dir", str(data_dir), env=server_env())
    new_key = key_file.read_text()
    assert new_key != old_key
    assert len(base64.b64decode(new_key, validate=True)) == 32
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert old_key.encode() not in rotated.stdout + rotated.stderr
    assert b"restart" in rotated.stdout

    async with running_relay(config()) as relay_b:
        assert relay_b.url == url
        async with connect(url) as client:
            with pytest.raises(RelayRefused) as refused:
                await client.authenticate(old_token)
        assert refused.value.code is wire.ErrorCode.UNAUTHENTICATED
        revoked = await cozy(
            "collab", "create", "demo", env=client_env(home, password=False), check=False
        )
        assert revoked.returncode == 1
        assert b"revoked" in revoked.stderr
        assert b"cozy account login" in revoked.stderr
        await cozy("account", "login", env=client_env(home))
        created = await cozy("collab", "create", "demo", env=client_env(home, password=False))
        assert created.stdout.decode().startswith("c_")


@pytest.mark.objective("SO-6")
async def test_rotate_jwt_key_with_a_configured_key_prints_a_new_one_and_never_the_old(
    tmp_path: Path,
) -> None:
    old = "operator-chosen-signing-key-" + secrets.token_hex(16)
    result = await cozy(
        "relay",
        "rotate-jwt-key",
        "--data-dir",
        str(tmp_path / "relay"),
        env=server_env(JWT_SIGNING_KEY=old),
    )
    out = result.stdout.decode() + result.stderr.decode()
    assert old not in out
    assert "JWT_SIGNING_KEY environment variable" in out
    printed = [w for w in out.split() if re.fullmatch(r"[A-Za-z0-9_-]{64}", w)]
    assert len(printed) == 1
    assert not (tmp_path / "relay" / "jwt_signing_key").exists()
    # A key from the TOML file is reported the same way.
    toml = tmp_path / "relay.toml"
    toml.write_text(f'jwt_signing_key = "{old}"\n')
    result = await cozy("relay", "rotate-jwt-key", "--config", str(toml), env=server_env())
    assert old.encode() not in result.stdout + result.stderr
    assert f"jwt_signing_key in {toml}".encode() in result.stdout


@pytest.mark.objective("SO-6")
async def test_cozy_account_login_explains_a_lockout(
    relay: Relay, database_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "fay"
    await cozy("account", "signup", "--relay", relay.url, "--handle", "fay", env=client_env(home))
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO login_failures (handle_key, failures, locked_until)"
            " VALUES (%s, 9, now() + interval '5 minutes')",
            (keyer(relay)("fay"),),
        )
    result = await cozy("account", "login", env=client_env(home), check=False)
    assert result.returncode == 1
    # The lock was set to end 300 s from the insert; the CLI's start-up takes a moment (seconds
    # on a loaded machine), so the wait it reports may have ticked down a little.
    waited = re.search(
        rb"too many failed logins for this handle; try again in (\d+) s", result.stderr
    )
    assert waited is not None, result.stderr
    assert 280 <= int(waited.group(1)) <= 300
    assert b"cozy relay lockouts clear fay" in result.stderr
