"""`cozy relay serve|migrate|verify-ledger|rebuild-projections|lockouts|rotate-jwt-key`; `cozy dev`
and `cozy bench` live in cozy/_dev.py and cozy/bench."""

from __future__ import annotations

import os
import sys
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from ledger import Ledger, LedgerError, SchemaNotReady, migrate
from model.errors import ModelError
from relay import _throttle
from relay._run import run_relay, settle_heap
from relay.config import (
    DEFAULT_DATA_DIR,
    ConfigError,
    RelayConfig,
    jwt_signing_key_origin,
    load_config,
    new_jwt_signing_key,
    rotate_jwt_signing_key,
)
from relay.embedded import embedded_postgres

if TYPE_CHECKING:
    import argparse

    from ledger import LockoutRow


def run(args: argparse.Namespace) -> int:
    action = args.server_action
    if action == "bench":
        from cozy import bench

        return bench.main(args)
    if action == "dev":
        from cozy import _dev

        return _dev.run(args)
    if action == "rotate-jwt-key":
        return _rotate_jwt_key(args)
    data_dir = args.data_dir
    if action in _ON_EXISTING_LEDGER:
        data_dir = _existing_ledger_dir(args)
    config = load_config(
        toml_path=args.config,
        data_dir=data_dir,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
    )
    if action in _ON_EXISTING_LEDGER and config.database_url is None:
        _require_embedded_ledger(config.data_dir)
    try:
        if action == "serve":
            trio.run(_serve, config)
            return 0
        if action == "lockouts":
            return trio.run(_lockouts, config, args)
        return trio.run(_maintain, config, action)
    except SchemaNotReady:
        if action not in _ON_EXISTING_LEDGER:
            raise
        where = "DATABASE_URL" if config.database_url else f"{config.data_dir / 'postgres'}"
        print(
            f"error: the database at {where} holds no ledger (it was never migrated), so there"
            " is nothing to check: point --data-dir or DATABASE_URL at the relay's data"
            f" (`cozy dev` keeps it in {DEV_DATA_DIR})",
            file=sys.stderr,
        )
        return 1
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModelError as exc:  # a management event in the ledger does not fold
        print(f"error: {exc}; run `cozy relay verify-ledger` to find tampering", file=sys.stderr)
        return 2


# Commands that read or repair a ledger that must already exist: they never create a database,
# and an empty one is refused rather than "checked".
_ON_EXISTING_LEDGER: Final = ("verify-ledger", "rebuild-projections", "lockouts")
# Where `cozy dev` keeps its embedded Postgres, relative to the directory it runs in (the
# checkout, with `make run`); cozy/cli.py's `dev --data-dir` default.
DEV_DATA_DIR: Final = Path(".cozy/dev")


def _existing_ledger_dir(args: argparse.Namespace) -> Path | None:
    """The data dir of a maintenance command given none: the relay's default (.cozy/relay)
    if it holds a database, else `cozy dev`'s when run where `cozy dev` keeps one (a
    checkout); neither is refused before anything is created. None leaves the choice to the
    config (a TOML file, COZY_DATA_DIR, DATABASE_URL)."""
    given: Path | None = args.data_dir
    explicit = ("COZY_DATA_DIR", "COZY_RELAY_CONFIG", "DATABASE_URL")
    if (
        args.data_dir is not None
        or args.config is not None
        or any(v in os.environ for v in explicit)
    ):
        return given
    if (DEFAULT_DATA_DIR / "postgres").exists():
        return None
    if (DEV_DATA_DIR / "postgres").exists():
        print(f"using the ledger of `cozy dev` in {DEV_DATA_DIR}", file=sys.stderr)
        return DEV_DATA_DIR
    _require_embedded_ledger(DEFAULT_DATA_DIR)  # refuses: checked before the config makes keys
    return None


def _require_embedded_ledger(data_dir: Path) -> None:
    """Refuse before an embedded Postgres is started: starting one in an empty directory would
    create a database, and there is no ledger in a database just created."""
    if not (data_dir / "postgres").exists():
        raise ConfigError(
            f"no ledger to work on: {data_dir / 'postgres'} does not exist and DATABASE_URL is"
            f" not set. Pass the relay's --data-dir (`cozy dev` keeps its data in {DEV_DATA_DIR},"
            " relative to where it runs) or set DATABASE_URL"
        )


async def _serve(config: RelayConfig) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(run_relay, config)
        settle_heap()


async def _maintain(config: RelayConfig, action: str) -> int:
    async with AsyncExitStack() as stack:
        url = config.database_url
        if url is None:
            url = await stack.enter_async_context(embedded_postgres(config.data_dir / "postgres"))
        if action == "migrate":
            applied = await trio.to_thread.run_sync(migrate, url)
            print(f"applied migrations: {applied or 'none (up to date)'}")
            return 0
        ledger = Ledger(url)
        await trio.to_thread.run_sync(ledger.open)
        if action == "rebuild-projections":
            try:
                rebuilt = await trio.to_thread.run_sync(ledger.rebuild_projections)
            finally:
                ledger.close()
            print(
                f"folded the management events of {rebuilt.collabs} collabs;"
                f" {len(rebuilt.repaired)} projection(s) differed and were rewritten"
            )
            for collab_id in rebuilt.repaired:
                print(f"REPAIRED {collab_id}")
            return 0
        try:
            report = await trio.to_thread.run_sync(
                lambda: ledger.verify_ledger(
                    lambda c, n: print(f"  {c}: {n} events verified", file=sys.stderr)
                )
            )
        finally:
            ledger.close()
        print(f"verified {report.events} events in {report.collabs} collabs")
        for problem in report.problems:
            print(f"PROBLEM {problem}")
        return 0 if report.ok else 2


async def _lockouts(config: RelayConfig, args: argparse.Namespace) -> int:
    """`cozy relay lockouts list` and `cozy relay lockouts clear HANDLE`.

    Rows are stored under keyed hashes of the handles (relay/_throttle.py), made with a key
    derived from this relay's JWT signing key: the list names the rows of existing accounts
    by recomputing their keys, and shows any other row (a typo, a guessed or made-up handle)
    only as an unnamed one.
    """
    keyer = _throttle.HandleKeyer(config.jwt_signing_key.value)
    async with AsyncExitStack() as stack:
        url = config.database_url
        if url is None:
            url = await stack.enter_async_context(embedded_postgres(config.data_dir / "postgres"))
        ledger = Ledger(url)
        await trio.to_thread.run_sync(ledger.open)
        stack.callback(ledger.close)
        policy = _throttle.LOGIN_POLICY
        if args.lockouts_action == "list":
            rows = await trio.to_thread.run_sync(lambda: ledger.list_login_lockouts(policy=policy))
            names: dict[bytes, str] = {}
            if rows:
                handles = await trio.to_thread.run_sync(ledger.account_handles)
                names = {keyer(h): h for h in handles}
            _print_lockouts(rows, names)
            return 0
        handle = args.handle
        cleared = await trio.to_thread.run_sync(
            lambda: ledger.clear_login_failures(keyer(handle), policy=policy)
        )
    if not cleared:
        print(
            f"nothing to clear: {_printable(handle)} is not locked and has no failed logins"
            " counted (under this relay's JWT signing key)",
            file=sys.stderr,
        )
        return 1
    print(f"cleared {_printable(handle)}: its failed logins are forgotten; it may log in now")
    return 0


def _print_lockouts(rows: list[LockoutRow], names: dict[bytes, str]) -> None:
    if not rows:
        print("no handle has failed logins counted")
        return
    table = [("HANDLE", "FAILURES", "HOURLY FAILURES", "LOCKED UNTIL")]
    for r in rows:
        until = "-"
        if r.locked_until is not None:
            until = datetime.fromtimestamp(r.locked_until, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        name = names.get(r.handle_key)
        # Not an account's handle: the string tried is not stored, only its keyed hash.
        shown = _printable(name) if name is not None else f"(no-account:{r.handle_key.hex()[:12]})"
        table.append((shown, str(r.failures), str(r.window_failures), until))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _printable(handle: str) -> str:
    # Anyone can make a row by trying to log in with any string: never echo control characters
    # (terminal escapes) to the operator's terminal.
    return handle if handle.isprintable() else ascii(handle)


def _rotate_jwt_key(args: argparse.Namespace) -> int:
    """The kill switch: replace the data dir's key, or hand out a new one for env / TOML."""
    origin = jwt_signing_key_origin(toml_path=args.config)
    if origin is not None:
        # The configured key cannot be replaced from here; never print it, only a new one.
        print(
            f"The JWT signing key comes from {origin}; this command cannot replace it there.\n"
            "A freshly generated key (not stored anywhere; treat it as a secret):\n\n"
            f"    {new_jwt_signing_key()}\n\n"
            "To rotate:\n"
            f"  1. replace the current value ({origin}) with it in your secret store;\n"
            "  2. restart every relay on this database with the new key (they must all share it);\n"
            "  3. every session and agent token signed with the old key then stops working:\n"
            "     people run `cozy account login` again and agents need new tokens.\n"
            "Discard the old key."
        )
        return 0
    config = load_config(toml_path=args.config, data_dir=args.data_dir)
    path = rotate_jwt_signing_key(config.data_dir)
    print(
        f"rotated the JWT signing key in {path} (a new random key, mode 0600).\n"
        "Every session and agent token stops working once the relay is restarted with it:\n"
        "restart the relay now; people then run `cozy account login` again and agents need\n"
        "new tokens. Relays sharing this database must all get the new key file."
    )
    return 0
