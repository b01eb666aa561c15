"""Keys as a person lives with them: new devices, recovery, passphrase changes, a stolen
database — real `cozy` processes against a real relay and Postgres."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import psycopg
import pytest

from clientkit._home import Home
from model import keystore, recovery
from tests.cli_harness import cli_signup, client_env, cozy

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay

NEW_PASSPHRASE = "quartz lantern before midnight rain"


@pytest.mark.objective("SO-2")
async def test_a_new_device_restores_reads_and_posts_and_recovery_replaces_the_passphrase(
    relay: Relay, tmp_path: Path
) -> None:
    laptop, phone = tmp_path / "laptop", tmp_path / "phone"
    code = await cli_signup(relay.url, laptop, "erin")
    collab = (
        (await cozy("collab", "create", "plans", env=client_env(laptop))).stdout.decode().strip()
    )
    await cozy("post", collab, "from the laptop", env=client_env(laptop))

    restored = await cozy(
        "account", "restore", "--relay", relay.url, "--handle", "erin", env=client_env(phone)
    )
    assert b"restored erin" in restored.stdout
    assert b"[3/4]" in restored.stderr  # progress is shown
    await cozy("post", collab, "from the phone", env=client_env(phone))
    tail = (await cozy("tail", collab, env=client_env(phone))).stdout.decode()
    assert "from the laptop" in tail
    assert "from the phone" in tail

    # A mistyped recovery code is caught before anything changes.
    typo = code[:-1] + ("0" if code[-1] != "0" else "1")
    bad = await cozy(
        "account",
        "recover",
        env=client_env(phone, COZY_RECOVERY_CODE=typo, COZY_NEW_PASSPHRASE=NEW_PASSPHRASE),
        check=False,
    )
    assert bad.returncode == 1
    assert b"checksum" in bad.stderr

    recovered = await cozy(
        "account",
        "recover",
        env=client_env(phone, COZY_RECOVERY_CODE=code.lower(), COZY_NEW_PASSPHRASE=NEW_PASSPHRASE),
    )
    assert b"new passphrase set" in recovered.stdout
    # The old passphrase stops working on this device and on the relay's copy.
    old = await cozy("tail", collab, env=client_env(phone), check=False)
    assert old.returncode == 1
    assert b"wrong passphrase" in old.stderr
    with_new = client_env(phone, COZY_PASSPHRASE=NEW_PASSPHRASE)
    assert b"from the phone" in (await cozy("tail", collab, env=with_new)).stdout
    third = tmp_path / "tablet"
    stale = await cozy(
        "account",
        "restore",
        "--relay",
        relay.url,
        "--handle",
        "erin",
        env=client_env(third),
        check=False,
    )
    assert stale.returncode == 1
    await cozy(
        "account", "restore", "--relay", relay.url, "--handle", "erin",
        env=client_env(third, COZY_PASSPHRASE=NEW_PASSPHRASE),
    )  # fmt: skip
    # The account keys did not change: the laptop's events still verify as erin's.
    assert (
        b"from the laptop"
        in (
            await cozy("tail", collab, env=client_env(third, COZY_PASSPHRASE=NEW_PASSPHRASE))
        ).stdout
    )


@pytest.mark.objective("SO-2")
async def test_changing_the_passphrase_rewraps_without_changing_keys(
    relay: Relay, tmp_path: Path
) -> None:
    home = tmp_path / "frank"
    await cli_signup(relay.url, home, "frank")
    before = keystore.open_content(
        Home(home).load_keystore(),
        keystore.unwrap_key(Home(home).load_keystore(), client_env(home)["COZY_PASSPHRASE"]),
    )
    weak = await cozy(
        "account",
        "passphrase",
        env=client_env(home, COZY_NEW_PASSPHRASE="password123"),
        check=False,
    )
    assert weak.returncode == 1
    assert b"at least 15" in weak.stderr
    await cozy("account", "passphrase", env=client_env(home, COZY_NEW_PASSPHRASE=NEW_PASSPHRASE))
    sealed = Home(home).load_keystore()
    after = keystore.open_content(sealed, keystore.unwrap_key(sealed, NEW_PASSPHRASE))
    assert (after.sign_seed, after.box_sk) == (before.sign_seed, before.box_sk)


@pytest.mark.objective("SO-2")
@pytest.mark.objective("SO-1")
async def test_a_database_thief_finds_no_secret_in_any_table(
    relay: Relay, tmp_path: Path, database_url: str
) -> None:
    canary = "CANARY-7f3a9c the merger closes on friday"
    homes = {name: tmp_path / name for name in ("gina", "hal")}
    codes = {name: await cli_signup(relay.url, home, name) for name, home in homes.items()}
    collabs = []
    for name, home in homes.items():
        collab = (
            (await cozy("collab", "create", f"secret-room-{name}", env=client_env(home)))
            .stdout.decode()
            .strip()
        )
        await cozy("post", collab, f"{canary} ({name})", env=client_env(home))
        collabs.append(collab)
    # Everything a thief must not find, in every encoding we can think of.
    secrets: dict[str, bytes] = {}
    for name, home in homes.items():
        env = client_env(home)
        sealed = Home(home).load_keystore()
        key = keystore.unwrap_key(sealed, env["COZY_PASSPHRASE"])
        content = keystore.open_content(sealed, key)
        secrets |= {
            f"{name} sign seed": content.sign_seed,
            f"{name} box key": content.box_sk,
            f"{name} keystore key": key,
            f"{name} passphrase": env["COZY_PASSPHRASE"].encode(),
            f"{name} login password": env["COZY_PASSWORD"].encode(),
            f"{name} recovery code": codes[name].encode(),
            f"{name} recovery secret": recovery.parse_code(codes[name]),
        }
    secrets["canary"] = b"CANARY-7f3a9c"
    dump = _dump_every_table(database_url)
    assert len(dump) > 1000
    for what, value in secrets.items():
        forms = (value, value.hex().encode(), value.hex().upper().encode(), base64.b64encode(value))
        for form in forms:
            assert form not in dump, f"the database holds the {what}"


def _dump_every_table(database_url: str) -> bytes:
    """Every row of every table in the schema, as raw bytes and text, the way a thief sees it."""
    out = bytearray()
    with psycopg.connect(database_url) as conn:
        tables = [
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        assert {"accounts", "events", "keystores", "collabs"} <= set(tables)
        for table in tables:
            with conn.cursor().copy(f'COPY "{table}" TO STDOUT (FORMAT BINARY)') as copy:
                for block in copy:
                    out += bytes(block)
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                out += repr(row).encode()
    return bytes(out)


@pytest.mark.objective("SO-2")
async def test_a_device_refuses_a_keystore_older_than_one_it_has_seen(
    relay: Relay, tmp_path: Path
) -> None:
    home = tmp_path / "kim"
    await cli_signup(relay.url, home, "kim")
    collab = (await cozy("collab", "create", "notes", env=client_env(home))).stdout.decode().strip()
    profile = Home(home).load_profile()
    assert profile.keystore_version == 1  # stored at sign-up; collab keys live on the ledger
    # Pretend this device had seen a later version than the relay now serves (a rollback).
    profile.keystore_version = 7
    Home(home).save_profile(profile)
    rolled_back = await cozy("post", collab, "hello", env=client_env(home), check=False)
    assert rolled_back.returncode == 1
    assert b"rolling your keystore back" in rolled_back.stderr
