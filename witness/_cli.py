"""`cozy witness init|serve|status`: the command-line face of the witness (docs/witness.md).

Registering the parser imports nothing heavy; the service's modules load when a command runs.
"""

from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import argparse

    from witness._logs import TrustedLogs
    from witness._state import WitnessStore

DEFAULT_LISTEN: Final = "127.0.0.1:8780"
EXIT_FORK_SEEN: Final = 3
"""`status` found a log-signed checkpoint refused as a fork (the user commands' integrity exit)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    witness = sub.add_parser(
        "witness", help="run a C2SP tlog-witness that cosigns consistent checkpoints"
    ).add_subparsers(dest="witness_action", required=True)

    p = witness.add_parser("init", help="create a witness key and its empty state directory")
    p.add_argument("--state", type=Path, required=True, help="new or empty directory (0700)")
    p.add_argument(
        "--name", required=True, help="the witness's key name, e.g. witness.example.org/w1"
    )

    p = witness.add_parser("serve", help="serve POST /add-checkpoint for the logs you name")
    p.add_argument("--state", type=Path, required=True, help="the directory `init` created")
    p.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="VKEY",
        help="accept this log's checkpoints, for the origin that is its key name (repeatable)",
    )
    p.add_argument(
        "--log-prefix",
        action="append",
        default=[],
        nargs=2,
        metavar=("PREFIX", "VKEY"),
        help="accept every origin starting with PREFIX, signed by VKEY's public key under the "
        "origin's name (a cozy relay's collabs: RELAY/collab/) (repeatable)",
    )
    p.add_argument("--config", type=Path, help="TOML file of [[log]] entries (docs/witness.md)")
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    p.add_argument("--json-logs", action="store_true", help="one JSON object per log line")

    p = witness.add_parser("status", help="print the witness's key and what it last cosigned")
    p.add_argument("--state", type=Path, required=True, help="the directory `init` created")


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(text)
    return host, int(port_text)


def run(args: argparse.Namespace) -> int:
    from witness._state import WitnessStateError

    try:
        if args.witness_action == "init":
            return _init(args)
        if args.witness_action == "status":
            return _status(args)
        return _serve(args)
    except WitnessStateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _init(args: argparse.Namespace) -> int:
    from witness._state import init_state

    vkey = init_state(args.state, args.name)
    print(vkey)
    print(
        f"witness key created in {args.state} (keep the directory: it is the witness; back it "
        "up). Give the line above to the logs you witness, then run:\n"
        f"  cozy witness serve --state {args.state} --log LOG_VKEY",
        file=sys.stderr,
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from model.note import b64encode
    from witness._state import open_state

    store = open_state(args.state)
    try:
        print(f"witness {store.verifier.vkey()}")
        records = store.records()
        evidence = store.evidence()
    finally:
        store.close()
    if not records:
        print("nothing cosigned yet")
    for r in records:
        print(f"{r.origin} size={r.size} root={b64encode(r.root)} cosigned_at={r.cosigned_at}")
    for e in evidence:
        print(
            f"FORK {e.origin} size={e.size} root={b64encode(e.root)} refused={e.status}"
            f" received_at={e.received_at} (the log signed it; kept in {args.state}/state.sqlite)"
        )
    return EXIT_FORK_SEEN if evidence else 0


def _serve(args: argparse.Namespace) -> int:
    import trio

    from witness._logs import LogConfigError, build_trusted_logs
    from witness._state import open_state

    try:
        host, port = _parse_listen(args.listen)
    except ValueError:
        print(
            f"error: --listen {args.listen!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})",
            file=sys.stderr,
        )
        return 1
    store = open_state(args.state, serving=True)
    try:
        try:
            logs = build_trusted_logs(
                logs=args.log, prefixed=[tuple(p) for p in args.log_prefix], config=args.config
            )
        except LogConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return trio.run(_serve_until_signal, store, logs, host, port)
    finally:
        store.close()


async def _serve_until_signal(store: WitnessStore, logs: TrustedLogs, host: str, port: int) -> int:
    import trio

    from httpserve import url_of
    from witness._http import WitnessServer, bound_address, open_listener

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            listener = await open_listener(host, port)
        except OSError as exc:
            why = (
                "is already in use: stop the other process or choose another --listen"
                if exc.errno == errno.EADDRINUSE
                else f"cannot be listened on ({exc.strerror or exc}): check --listen"
            )
            print(f"error: {host}:{port} {why}", file=sys.stderr)
            return 1
        bound_host, bound_port = bound_address(listener)
        print(f"witness listening on {url_of(bound_host, bound_port)}", flush=True)
        print(f"witness key {store.verifier.vkey()}", flush=True)
        for line in logs.describe():
            print(f"  accepting {line}", file=sys.stderr, flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(WitnessServer(store, logs).serve_listener, listener)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print("witness stopped", file=sys.stderr, flush=True)
    return 0
