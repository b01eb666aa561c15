"""Session infrastructure: one Postgres per run, one migrated template, one database per test.

Postgres comes from ``COZY_TEST_DATABASE_URL`` when set (CI, a developer's server) and from the
embedded ``pgserver`` wheel otherwise. Database tests never skip: a missing Postgres is a failed
run with instructions, so a green suite always means the ledger contract was exercised.

Each test gets its own database cloned from a template that was migrated once, so tests are
isolated (and could run in parallel) without paying for a migration each time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final

import argon2
import pytest

import ledger as ledger_pkg
from relay import _auth
from tests.helpers import create_database, drop_database, with_dbname
from tests.relay_harness import relay_config, running_relay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from relay._server import Relay

_INSTALL_HINT = (
    "Database tests need Postgres. Either set COZY_TEST_DATABASE_URL to a server where this "
    "user may CREATE DATABASE, or install the embedded server from the lock file "
    "(`make install`, which provides the `pgserver` wheel)."
)


SLOW_LIST: Final = Path(__file__).with_name("slow_tests.txt")


def _slow_tests(rootpath: Path) -> frozenset[str]:
    """The entries of slow_tests.txt; one that names no file, test or class is an error."""
    entries = frozenset(
        line
        for raw in SLOW_LIST.read_text().splitlines()
        if (line := raw.strip()) and not line.startswith("#")
    )
    for entry in entries:
        file, _, rest = entry.partition("::")
        path = rootpath / file
        name = rest.rpartition("::")[2]
        if not path.is_file() or (name and not re.search(rf"\b{name}\b", path.read_text())):
            raise pytest.UsageError(f"{SLOW_LIST.name} names no test: {entry}")
    return entries


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests slow_tests.txt lists `slow`: `make test-fast` runs `-m "not slow"`."""
    slow = _slow_tests(config.rootpath)
    for item in items:
        parts = item.nodeid.split("[")[0].split("::")
        if any("::".join(parts[:n]) in slow for n in range(1, len(parts) + 1)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _ops_on_free_ports() -> Iterator[None]:
    """Relays that tests start from the environment (`cozy relay serve`, `cozy dev` as child
    processes) put their operations listener on a free port, not on the fixed default 9465
    that concurrent runs would fight over. They also accept keystores sealed with the test
    Argon2id profile that test clients use (COZY_ALLOW_TEST_KDF; never on by default). And
    they keep compiled bytecode even where the machine sets PYTHONDONTWRITEBYTECODE (the
    Makefile drops it too): a few hundred child processes would each recompile the client kit,
    Trio and msgspec from source, about 0.5 s of CPU apiece."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        mp.setenv("COZY_OPS_PORT", os.environ.get("COZY_OPS_PORT", "0"))
        mp.setenv("COZY_ALLOW_TEST_KDF", os.environ.get("COZY_ALLOW_TEST_KDF", "1"))
        yield


# The relay's password hashes in this process: Argon2id still, at the cheapest cost argon2-cffi
# takes (1 pass, 1 MiB) instead of the shipped 3 passes over 64 MiB (~0.2 s a hash, twice per
# test sign-up, on a 2-core CI machine). Test-only, like the keystores' INSECURE_TEST profile.
TEST_PASSWORD_HASHER: argon2.PasswordHasher = argon2.PasswordHasher(
    time_cost=1, memory_cost=1024, parallelism=1
)


@pytest.fixture(scope="session", autouse=True)
def _cheap_password_hashes() -> Iterator[None]:
    """In-process relays hash and verify passwords with TEST_PASSWORD_HASHER. The tests of the
    shipped parameters themselves (the rehash on login) take `shipped_password_hashes`.
    Relays started as child processes (`cozy relay serve`, `cozy dev`) keep the shipped cost."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_auth, "_hasher", TEST_PASSWORD_HASHER)
        mp.setattr(_auth, "_DUMMY_HASH", TEST_PASSWORD_HASHER.hash("dummy password for tests"))
        yield


@pytest.fixture
def shipped_password_hashes(monkeypatch: pytest.MonkeyPatch) -> argon2.PasswordHasher:
    """The relay's shipped password hasher, restored for one test (undoing the cheap one)."""
    shipped = argon2.PasswordHasher()
    monkeypatch.setattr(_auth, "_hasher", shipped)
    monkeypatch.setattr(_auth, "_DUMMY_HASH", shipped.hash("dummy password for tests"))
    return shipped


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A conninfo for a Postgres role that may create and drop databases."""
    url = os.environ.get("COZY_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with pytest.MonkeyPatch.context() as mp:
        # pgserver keeps its lock files in the user runtime dir; without one, platformdirs warns
        # and falls back to a shared /tmp path. Must be set before pgserver is imported.
        if not os.environ.get("XDG_RUNTIME_DIR"):
            runtime_dir = tmp_path_factory.mktemp("xdg-runtime")
            runtime_dir.chmod(0o700)
            mp.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
        try:
            import pgserver  # imported late: after XDG_RUNTIME_DIR is set
        except ImportError as exc:
            pytest.fail(f"pgserver is not importable ({exc}). {_INSTALL_HINT}", pytrace=False)
        try:
            server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
            url = server.get_uri()
        except Exception as exc:
            pytest.fail(f"the embedded Postgres failed to start: {exc!r}. {_INSTALL_HINT}")
        try:
            yield url
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def template_database(pg_admin_url: str) -> Iterator[str]:
    """The name of a database migrated to the current schema; cloned for every test."""
    name = create_database(pg_admin_url, "cozy_template")
    try:
        ledger_pkg.migrate(with_dbname(pg_admin_url, name))
        yield name
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def database_url(pg_admin_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for this test only; dropped (connections and all) after."""
    name = create_database(pg_admin_url, "cozy_t", template=template_database)
    try:
        yield with_dbname(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
def empty_database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = create_database(pg_admin_url, "cozy_e")
    try:
        yield with_dbname(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


@pytest.fixture
async def relay(database_url: str, tmp_path: Path) -> AsyncIterator[Relay]:
    """A real relay on a loopback port, on this test's database; shut down like SIGTERM after."""
    async with running_relay(relay_config(database_url, tmp_path / "relay")) as r:
        yield r


@pytest.fixture
def ledger(database_url: str) -> Iterator[ledger_pkg.Ledger]:
    """An opened ledger on this test's database."""
    store = ledger_pkg.Ledger(database_url)
    store.open()
    try:
        yield store
    finally:
        store.close()
