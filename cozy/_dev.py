"""`cozy dev` (embedded Postgres + OpenBao dev server + witness + relay) and `cozy dev secret put`.

Two dev stacks may run on one machine: the WebSocket port comes from `--port` (0: a free one)
and the ops listener moves to a free port when its default (or COZY_OPS_PORT) is taken, unless
`--ops-port` names one. OpenBao runs in dev mode (in memory), so the tool secrets a developer
gives `cozy dev secret put` are also kept in a 0600 file in the data dir and put into OpenBao
again each time `cozy dev` starts (cozy/_devsecrets.py). Unless `--no-witness`, a witness runs
beside the relay with its state in the data dir, and the relay submits to it (cozy/_devwitness.py).
"""

from __future__ import annotations

import dataclasses
import getpass
import sys
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Final

import trio

from cozy import _devsecrets
from cozy._devwitness import DevWitness, dev_witness
from model.scrub import MIN_SECRET_BYTES
from relay._run import run_relay
from relay.config import ConfigError, RelayConfig, Secret, load_config
from relay.embedded import embedded_openbao, embedded_postgres

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping

    from relay._server import Relay
    from relay.broker import ToolSpec

# The README's first steps, printed by the banner with this stack's relay URL in place of
# README_RELAY_URL; tests/test_cli.py checks that README.md holds the same lines and runs them.
README_RELAY_URL: Final = "ws://127.0.0.1:8765"
TRY_IT: Final = (
    "export COZY_HOME=/tmp/cozy-alice COZY_PASSWORD='a long login password'"
    " COZY_PASSPHRASE='a different long passphrase'",
    f".venv/bin/cozy account signup --relay {README_RELAY_URL} --handle alice",
    "C=$(.venv/bin/cozy collab create demo)",
    '.venv/bin/cozy post $C "hello"',
    ".venv/bin/cozy tail $C",
)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "dev_action", None) == "secret":
        return _secret_put(args)
    config = load_config(
        toml_path=args.config, data_dir=args.data_dir, port=args.port, ops_port=args.ops_port
    )
    # Without --ops-port, a taken ops port (often another `cozy dev`'s) moves to a free one.
    config = dataclasses.replace(config, ops_port_fallback=args.ops_port is None)
    trio.run(_dev, config, not args.no_witness)
    return 0


async def _dev(config: RelayConfig, with_witness: bool) -> None:
    """Embedded Postgres + OpenBao dev server + witness + relay; Ctrl-C stops them all."""
    stored = _devsecrets.load(config.data_dir)
    async with AsyncExitStack() as stack:
        print("starting embedded Postgres…", file=sys.stderr)
        db = await stack.enter_async_context(embedded_postgres(config.data_dir / "postgres"))
        print("starting OpenBao dev server…", file=sys.stderr)
        bao = await stack.enter_async_context(embedded_openbao())
        await trio.to_thread.run_sync(_devsecrets.restore, bao.addr, bao.root_token, stored)
        stack.enter_context(_devsecrets.running(config.data_dir, bao.addr, bao.root_token))
        config = dataclasses.replace(
            config, database_url=db, bao_addr=bao.addr, bao_token=Secret(bao.root_token.encode())
        )
        witness: DevWitness | None = None
        if with_witness:
            witness = await stack.enter_async_context(dev_witness(config))
            config = witness.configure(config)
        async with trio.open_nursery() as nursery:
            if witness is not None:
                nursery.start_soon(witness.serve)

            async def relay_then_stop(task_status: trio.TaskStatus[Relay]) -> None:
                # The relay owns the signals (SIGINT/SIGTERM); once it has shut down, the
                # witness stops with it.
                await run_relay(config, task_status=task_status)
                nursery.cancel_scope.cancel()

            relay = await nursery.start(relay_then_stop)
            print(
                _banner(
                    relay.url,
                    relay.ops_url,
                    relay.ops_port_taken,
                    config,
                    bao.addr,
                    stored,
                    witness,
                ),
                file=sys.stderr,
                flush=True,
            )


def _banner(
    url: str,
    ops_url: str,
    ops_port_taken: int | None,
    config: RelayConfig,
    bao_addr: str,
    stored: _devsecrets.Stored,
    witness: DevWitness | None = None,
) -> str:
    ops = ops_url or "off"
    if ops_port_taken is not None:
        ops += f" (port {ops_port_taken} was taken; --ops-port chooses one)"
    lines = [
        "",
        f"  relay    {url}",
        f"  ops      {ops}",
        f"  postgres {config.data_dir / 'postgres'} (embedded)",
        # The root token stays in its 0600 file: output is often kept (`make run > log`, CI).
        f"  openbao  {bao_addr} (dev mode; its root token, for `bao kv put`, is in"
        f" {config.data_dir / _devsecrets.RUNNING_FILE})",
        *_witness_lines(witness),
        *_tool_lines(config.tools, stored),
        "",
        "Try it in another shell:",
        *(f"  {line.replace(README_RELAY_URL, url)}" for line in TRY_IT),
        *_require_lines(witness),
        "",
        f"Ctrl-C stops the relay, {'the witness, ' if witness else ''}OpenBao and Postgres.",
    ]
    return "\n".join(lines) + "\n"


def _witness_lines(witness: DevWitness | None) -> list[str]:
    if witness is None:
        return ["  witness  off (--no-witness)"]
    return [
        f"  witness  {witness.url} (state in {witness.state})",
        f"           key {witness.vkey}",
    ]


def _require_lines(witness: DevWitness | None) -> list[str]:
    if witness is None:
        return []
    return [
        "",
        "Require the dev witness's cosignature in that collab (1 of 1):",
        f"  {witness.require_command()}",
    ]


def _tool_lines(tools: Mapping[str, ToolSpec], stored: _devsecrets.Stored) -> list[str]:
    if not tools:
        return ["  tools    none (declare [tools.NAME] in a TOML file: cozy dev --config FILE)"]
    lines = [f"  tools    {len(tools)} loaded:"]
    for name, spec in sorted(tools.items()):
        hosts = ", ".join(
            host if port is None else f"{host}:{port}"
            for host, port in sorted(spec.template.allowed, key=lambda a: (a[0], a[1] or 0))
        )
        where = "every collab" if "*" in spec.collabs else ", ".join(spec.collabs)
        has = _devsecrets.has(stored, spec)
        secret = "secret kept" if has else f"no secret yet: cozy dev secret put {name}"
        lines.append(f"    {name}  → {hosts}  in {where}  ({secret})")
    return lines


def _secret_put(args: argparse.Namespace) -> int:
    """Store a tool's secret for this dev data dir (read from stdin or a prompt, never argv)."""
    config = load_config(toml_path=args.config, data_dir=args.data_dir)
    spec = config.tools.get(args.tool)
    if spec is None:
        known = ", ".join(sorted(config.tools)) or "none"
        raise ConfigError(
            f"no tool {args.tool!r} is declared (declared: {known}); pass the TOML that"
            " declares it with --config, as to `cozy dev`"
        )
    where = f"{spec.secret_mount}/{spec.secret_path} field {spec.secret_field}"
    if sys.stdin.isatty():
        value = getpass.getpass(f"secret for tool {args.tool} ({where}): ")
    else:
        value = sys.stdin.read().rstrip("\r\n")
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the secret must be at least {MIN_SECRET_BYTES} bytes; pipe it on stdin or type it"
            " at the prompt"
        )
    _devsecrets.save(config.data_dir, spec, value)
    if _devsecrets.put_now(config.data_dir, spec, value):
        print(f"stored the secret of {args.tool} ({where}); the running cozy dev has it now")
    else:
        print(
            f"stored the secret of {args.tool} ({where}); `cozy dev` puts it into OpenBao"
            " when it starts"
        )
    return 0
