"""`cozy relay serve|migrate|verify-ledger` and `cozy dev`."""

from __future__ import annotations

import dataclasses
import sys
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import trio

from ledger import Ledger, LedgerError, migrate
from relay._run import run_relay
from relay.config import RelayConfig, load_config
from relay.embedded import embedded_openbao, embedded_postgres

if TYPE_CHECKING:
    import argparse


def run(args: argparse.Namespace) -> int:
    action = args.server_action
    if action == "bench":
        from cozy import bench

        return bench.main(args)
    if action == "dev":
        config = load_config(data_dir=args.data_dir, port=args.port)
        trio.run(_dev, config)
        return 0
    config = load_config(
        toml_path=args.config,
        data_dir=args.data_dir,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
    )
    try:
        if action == "serve":
            trio.run(_serve, config)
            return 0
        return trio.run(_maintain, config, action)
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _serve(config: RelayConfig) -> None:
    await run_relay(config)


async def _dev(config: RelayConfig) -> None:
    """Embedded Postgres + OpenBao dev server + relay; Ctrl-C stops all three."""
    async with AsyncExitStack() as stack:
        print("starting embedded Postgres…", file=sys.stderr)
        db = await stack.enter_async_context(embedded_postgres(config.data_dir / "postgres"))
        print("starting OpenBao dev server…", file=sys.stderr)
        bao = await stack.enter_async_context(embedded_openbao())
        config = dataclasses.replace(config, database_url=db, bao_addr=bao.addr)
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(run_relay, config)
            print(
                f"\n  relay    {relay.url}\n  postgres {config.data_dir / 'postgres'} (embedded)\n"
                f"  openbao  {bao.addr} (dev mode, in memory)\n\n"
                "Try it in another shell:\n"
                f"  export COZY_HOME=/tmp/cozy-alice COZY_PASSWORD='a long login password' "
                "COZY_PASSPHRASE='a different long passphrase for keys'\n"
                f"  .venv/bin/cozy account signup --relay {relay.url} --handle alice\n"
                "  .venv/bin/cozy collab create demo     # prints the collab id\n"
                "  .venv/bin/cozy post COLLAB_ID 'hello'\n"
                "  .venv/bin/cozy tail COLLAB_ID\n\n"
                "Ctrl-C stops the relay, OpenBao and Postgres.\n",
                file=sys.stderr,
                flush=True,
            )


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
