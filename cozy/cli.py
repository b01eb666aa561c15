"""`cozy`: every subcommand, client and server side. Run `cozy --help`."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import NoReturn

from clientkit import cli as client_cli
from cozy import _logging
from witness import _cli as witness_cli


def _relay_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    relay = sub.add_parser("relay", help="run and maintain a relay").add_subparsers(
        dest="action", required=True
    )

    def add_config_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML config file (env vars override it)")
        p.add_argument("--data-dir", type=Path, help="where embedded Postgres and relay keys live")

    for name, help_text in (
        ("serve", "serve the relay (config from env / --config TOML)"),
        ("migrate", "apply the ledger's schema migrations"),
        ("verify-ledger", "recompute every collab's hash chain, event id and signature"),
        (
            "rebuild-projections",
            "recompute members, roles and key epochs from the management events",
        ),
        ("rotate-jwt-key", "kill switch: a new JWT signing key ends every session and agent token"),
    ):
        p = relay.add_parser(name, help=help_text)
        add_config_options(p)
        if name == "serve":
            p.add_argument("--host")
            p.add_argument("--port", type=int)
            p.add_argument("--json-logs", action="store_true")
        p.set_defaults(server_action=name)

    lockouts = relay.add_parser("lockouts", help="handles throttled after failed logins")
    which = lockouts.add_subparsers(dest="lockouts_action", required=True)
    p = which.add_parser("list", help="handles with failed logins counted, and their locks")
    add_config_options(p)
    p.set_defaults(server_action="lockouts")
    p = which.add_parser("clear", help="lift a handle's lock and forget its failed logins")
    p.add_argument("handle")
    add_config_options(p)
    p.set_defaults(server_action="lockouts")

    p = sub.add_parser(
        "dev", help="embedded Postgres + OpenBao dev server + relay, in the foreground"
    )
    p.add_argument("--port", type=int, default=8765, help="WebSocket port (0: a free one)")
    p.add_argument(
        "--ops-port",
        help="port of /healthz, /readyz, /metrics (0: a free one; off: none); default"
        " COZY_OPS_PORT, else 9465, else a free port when that one is taken",
    )
    p.add_argument("--data-dir", type=Path, default=Path(".cozy/dev"))
    p.add_argument("--config", type=Path, help="relay TOML, e.g. its [tools.NAME] tables")
    p.add_argument(
        "--no-witness",
        action="store_true",
        help="start no witness (by default one runs on a free loopback port, state in the data dir)",
    )
    p.set_defaults(server_action="dev")
    secret = p.add_subparsers(dest="dev_action").add_parser(
        "secret", help="tool secrets kept for the dev OpenBao"
    )
    put = secret.add_subparsers(dest="secret_action", required=True).add_parser(
        "put",
        help="keep a tool's secret (read from stdin or a prompt); cozy dev puts it into OpenBao"
        " at every start",
    )
    put.add_argument("tool", help="the tool's name, as declared in [tools.NAME]")
    # SUPPRESS: `cozy dev --data-dir D secret put T` keeps D (the sub-parser's default would win).
    put.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS)
    put.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="the TOML that declares the tool"
    )

    p = sub.add_parser("bench", help="benchmarks that print JSON")
    p.add_argument(
        "which",
        choices=["all", "append", "fanout", "latency", "subscribers", "catchup", "client"],
        help="one scenario, or all of them (see docs/performance.md)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    p.add_argument(
        "--events",
        type=int,
        help="events per append scenario (default 20000); with `client`, the collab's length"
        " (default 10000)",
    )
    p.add_argument("--idle-subscribers", type=int, help="idle subscribers to open (default 5000)")
    p.add_argument("--catchup-events", type=int, help="events to replay (default 100000)")
    p.add_argument(
        "--compare",
        type=Path,
        metavar="BASE",
        help="also print each figure's change against a saved run (`cozy bench … > BASE`)",
    )
    p.add_argument("--loadgen-procs", type=int, help="subscriber processes (default 2)")
    p.add_argument("--database-url", help="use this Postgres instead of an embedded one")
    p.add_argument(
        "--client-batch",
        type=int,
        help="appends per WebSocket message from the load generator (default 32; 1 = one each)",
    )
    p.set_defaults(server_action="bench")


def _release_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`cozy release keygen|build|verify` (SO-8); implemented in cozy/_release/."""
    release = sub.add_parser(
        "release", help="build and verify signed releases (RELEASE.json)"
    ).add_subparsers(dest="release_action", required=True)

    p = release.add_parser("keygen", help="create an Ed25519 release signing key (0600 file)")
    p.add_argument(
        "--out", type=Path, required=True, help="where to write the seed (not overwritten)"
    )
    p.add_argument("--trust-file", type=Path, help="also record its public key in this trust file")

    p = release.add_parser(
        "build",
        help="build sdist + wheel from HEAD (clean tree, fresh pdm.lock) and sign RELEASE.json",
    )
    p.add_argument("--out", type=Path, default=Path("dist"), help="artifact directory (dist/)")
    p.add_argument(
        "--manifest", type=Path, default=Path("RELEASE.json"), help="where to write RELEASE.json"
    )
    p.add_argument(
        "--key",
        type=Path,
        help="signing key file (default $COZY_RELEASE_KEY_FILE, else a development key "
        "created under .cozy/release/)",
    )
    p.add_argument("--valid-days", type=int, default=90, help="days until RELEASE.json expires")
    p.add_argument(
        "--pdm", type=Path, help="pdm for `pdm lock --check` (default $COZY_PDM, .tools/pdm, PATH)"
    )

    p = release.add_parser(
        "verify", help="check RELEASE.json's signature, expiry, version, artifacts and lock hash"
    )
    p.add_argument("manifest", type=Path, help="RELEASE.json; artifacts are looked up beside it")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--pubkey", help="the release public key (hex) you trust, pinned")
    trust.add_argument(
        "--trust-file",
        type=Path,
        help="JSON file of trusted keys (default: $COZY_HOME/release-trusted.json if present, the "
        "developer trust file `build` writes; production verifiers pin a key explicitly)",
    )
    p.add_argument(
        "--lock",
        type=Path,
        default=Path("pdm.lock"),
        help="the pdm.lock of the source you install or deploy with; it must be the lock the "
        "release was built from (default ./pdm.lock)",
    )
    p.add_argument(
        "--state",
        type=Path,
        help="records the highest version verified, to refuse downgrades "
        "(default $COZY_HOME/release-state.json, COZY_HOME defaulting to ~/.cozy)",
    )


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line that names the help to read, like every other error (the
    usage summary argparse prints first is in that help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="cozy", description="CozyLabs end-to-end-encrypted collaboration relay"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    client_cli.register(sub)
    _relay_commands(sub)
    _release_commands(sub)
    witness_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "run"):
        # No structlog set-up: the client kit never logs through it (see cozy/_logging.py).
        return client_cli.run_command(args.run, args)
    if hasattr(args, "witness_action"):
        _logging.configure(json=getattr(args, "json_logs", False))
        return witness_cli.run(args)
    if hasattr(args, "release_action"):
        from cozy import _release

        return _release.run(args)
    _logging.configure(json=getattr(args, "json_logs", False))
    # Server-side modules load only here: the relay's config pulls in hvac, requests and PyJWT
    # (about 0.2 s), which every client command (`cozy post`, `cozy tail`, …) would pay for.
    from cozy import _server_commands
    from relay.config import ConfigError
    from relay.embedded import EmbeddedServiceError

    try:
        return _server_commands.run(args)
    except (ConfigError, EmbeddedServiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # A listener that cannot bind reaches here wrapped in Trio's nursery groups; anything
        # else in the group is a real failure and keeps its traceback.
        taken, rest = group.split(_address_in_use)
        if taken is None or rest is not None:
            raise
        print(
            "error: an address the relay listens on is already in use (the WebSocket port,"
            " --port / COZY_LISTEN_PORT, or the ops port, --ops-port / COZY_OPS_PORT): stop the other"
            " process or choose another port",
            file=sys.stderr,
        )
        return 1


def _address_in_use(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


if __name__ == "__main__":
    sys.exit(main())
