"""The relay refuses a Postgres that could lose acknowledged events (SPEC §9), unless told to.

Checked for real: a per-test database with ``ALTER DATABASE … SET synchronous_commit = off``,
and a Postgres of the test's own with ``fsync = off`` (set with ALTER SYSTEM and a reload);
the embedded pgserver passes as it comes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ledger import Ledger, migrate
from relay._durability import UnsafeDurability, check_durability, durability_problems
from relay._run import run_relay
from relay.config import ConfigError, load_config
from relay.embedded import free_port
from tests.fault_harness import OwnedPostgres
from tests.relay_harness import relay_config, running_relay, sign_up

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

SAFE = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"fsync": "off"}, "fsync = off"),
        ({"full_page_writes": "off"}, "full_page_writes = off"),
        ({"synchronous_commit": "off"}, "synchronous_commit = off"),
        ({"synchronous_commit": "local"}, "synchronous_commit = local"),
    ],
)
def test_each_unsafe_setting_is_named_with_its_fix(change: dict[str, str], named: str) -> None:
    problems = durability_problems(SAFE | change)
    assert len(problems) == 1
    assert named in problems[0]
    assert "RESET" in problems[0]  # how to undo a per-database or per-role override
    with pytest.raises(UnsafeDurability, match="COZY_ALLOW_UNSAFE_DURABILITY=1") as refused:
        check_durability(SAFE | change, allow_unsafe=False)
    assert isinstance(refused.value, ConfigError)  # the CLI prints it and exits 1


@pytest.mark.parametrize("sync", ["on", "remote_write", "remote_apply", "ON"])
def test_durable_settings_pass(sync: str) -> None:
    assert durability_problems(SAFE | {"synchronous_commit": sync}) == []
    check_durability(SAFE | {"synchronous_commit": sync}, allow_unsafe=False)


def test_a_setting_that_could_not_be_read_counts_as_unsafe() -> None:
    assert durability_problems({"fsync": "on", "full_page_writes": "on"}) == [
        "synchronous_commit could not be read (SHOW synchronous_commit)"
    ]


def test_the_override_is_read_from_the_environment_and_the_file(tmp_path: Path) -> None:
    base = {"JWT_SIGNING_KEY": "k" * 32}
    assert not load_config(env=base, data_dir=tmp_path).allow_unsafe_durability
    env = base | {"COZY_ALLOW_UNSAFE_DURABILITY": "1"}
    assert load_config(env=env, data_dir=tmp_path).allow_unsafe_durability
    toml = tmp_path / "relay.toml"
    toml.write_text("allow_unsafe_durability = true\n")
    assert load_config(env=base, toml_path=toml, data_dir=tmp_path).allow_unsafe_durability
    with pytest.raises(ConfigError, match="COZY_ALLOW_UNSAFE_DURABILITY"):
        load_config(env=base | {"COZY_ALLOW_UNSAFE_DURABILITY": "maybe"}, data_dir=tmp_path)


@pytest.fixture
def async_commit_database(database_url: str, pg_admin_url: str) -> Iterator[str]:
    """This test's database, with every session in it committing without waiting for WAL."""
    name = conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(name))
        )
    return database_url


async def test_a_database_with_synchronous_commit_off_is_refused(
    async_commit_database: str, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        with pytest.raises(UnsafeDurability, match="synchronous_commit = off") as refused:
            await run_relay(
                relay_config(async_commit_database, tmp_path), auto_migrate=False,
                handle_signals=False,
            )  # fmt: skip
        assert "fsync" not in str(refused.value)  # only what is wrong is named


async def test_the_override_starts_the_relay_with_a_loud_warning(
    async_commit_database: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = dataclasses.replace(
        relay_config(async_commit_database, tmp_path), allow_unsafe_durability=True
    )
    with trio.fail_after(30):
        async with running_relay(config) as relay:
            await sign_up(relay.url)  # it serves
    logs = "".join(capfd.readouterr())
    assert "UNSAFE_DURABILITY" in logs
    assert "synchronous_commit = off" in logs


async def test_cozy_relay_serve_exits_with_the_reason(
    async_commit_database: str, tmp_path: Path
) -> None:
    env = dict(os.environ, DATABASE_URL=async_commit_database, COZY_OPS_PORT="off")
    env.pop("COZY_ALLOW_UNSAFE_DURABILITY", None)
    command = [sys.executable, "-m", "cozy.cli", "relay", "serve"]
    command += ["--port", str(free_port()), "--data-dir", str(tmp_path / "relay")]
    with trio.fail_after(60):
        done = await trio.run_process(command, env=env, capture_stderr=True, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "synchronous_commit = off" in err
    assert "COZY_ALLOW_UNSAFE_DURABILITY=1" in err


async def test_embedded_postgres_passes_and_fsync_off_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(60):
        pg = await trio.to_thread.run_sync(OwnedPostgres, tmp_path / "pg")
        try:
            await trio.to_thread.run_sync(migrate, pg.url)
            ledger = Ledger(pg.url)
            await trio.to_thread.run_sync(ledger.open)
            try:
                settings = await trio.to_thread.run_sync(ledger.durability_settings)
            finally:
                ledger.close()
            assert durability_problems(settings) == []  # pgserver as it comes is durable
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET fsync = off")
                conn.execute("SELECT pg_reload_conf()")
            await trio.to_thread.run_sync(_wait_for_fsync_off, pg.url)
            config = relay_config(pg.url, tmp_path / "relay")
            with pytest.raises(UnsafeDurability, match="fsync = off"):
                await run_relay(config, handle_signals=False)
        finally:
            await trio.to_thread.run_sync(pg.close)


def _wait_for_fsync_off(url: str) -> None:
    """The postmaster applies a reload asynchronously: wait until new sessions see it."""
    while True:
        with psycopg.connect(url) as conn:
            row = conn.execute("SHOW fsync").fetchone()
        if row is not None and row[0] == "off":
            return
        time.sleep(0.05)
