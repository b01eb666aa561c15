"""Where the latency scenario's time goes: the relay's stage stamps joined with both ends.

The relay of the latency scenario runs with stage times on (relay/_stages.py): it stamps each
append along its path and each write of a live message to a subscriber's socket, on
CLOCK_MONOTONIC. The publisher knows when each event was due (t0 + i/rate) and each subscriber
when each delivery came off its socket, on the same clock. Joined, they cut every delivery's
latency into consecutive stages that add up to it:

- `ingress`: due → the relay queued it to its collab's inbox (publisher lateness, the
  publisher's socket, the relay's reader and routing);
- `inbox`: → the verify stage took it; `verify`: → its batch's signatures were checked;
- `commit_wait`: → the writer's thread began the transaction holding it; in two parts,
  `write_queue` (→ the collab's write stage handed its run to the writer: waiting for the
  collab's previous batch to be written) and `group_wait` (→ the transaction began: the
  writer's group gathering, the group before it, the thread hop);
- `commit`: the transaction (INSERT/COPY + COMMIT);
- `wakeup`: commit → the sequencer on the Trio loop handed it to fan-out;
- `fanout`: → the relay wrote it to this subscriber's socket (per delivery);
- `socket`: → this subscriber read it (kernel, and the subscriber process's own scheduling).

Per-event stages are counted once per event, the last two once per delivery. The stages add
up to the delivery's latency (`write_queue` and `group_wait` are the two parts of
`commit_wait`, shown under it).
"""

from __future__ import annotations

import array
import json
import urllib.request
from typing import TYPE_CHECKING, Any, Final

from cozy.bench._common import BenchError, percentiles

if TYPE_CHECKING:
    from pathlib import Path

EVENT_STAGES: Final = (
    "ingress",
    "inbox",
    "verify",
    "commit_wait",
    "write_queue",
    "group_wait",
    "commit",
    "wakeup",
)
DELIVERY_STAGES: Final = ("fanout", "socket")


def fetch(ops_url: str) -> dict[str, Any]:
    """The relay's stamps (`GET /debug/stages`), taken and cleared there. Blocking."""
    try:
        with urllib.request.urlopen(f"{ops_url}/debug/stages", timeout=30) as answer:  # noqa: S310 — our own loopback listener
            doc: dict[str, Any] = json.loads(answer.read())
    except OSError as exc:
        raise BenchError(f"could not read the relay's stage times at {ops_url}: {exc}") from None
    return doc


def breakdown(
    doc: dict[str, Any], work: Path, *, t0: float, rate: float, base_seq: int, collab_id: str
) -> dict[str, Any]:
    """Percentiles (ms) per stage, and how many events and deliveries were matched."""
    stamps: dict[int, list[float]] = {
        seq: s for c, seq, s in doc["events"] if c == collab_id and len(s) == 7
    }
    per: dict[str, list[float]] = {name: [] for name in (*EVENT_STAGES, *DELIVERY_STAGES)}
    for seq, (received, taken, verified, writing, started, committed, published) in sorted(
        stamps.items()
    ):
        due = t0 + (seq - base_seq) / rate
        for name, d in zip(
            EVENT_STAGES,
            (
                received - due,
                taken - received,
                verified - taken,
                started - verified,
                writing - verified,
                started - writing,
                committed - started,
                published - committed,
            ),
            strict=True,
        ):
            per[name].append(d)
    receipts: dict[tuple[int, int], float] = {}
    for path in sorted(work.glob("recv-*.bin")):
        triples = array.array("d")
        triples.frombytes(path.read_bytes())
        for i in range(0, len(triples), 3):
            receipts[(int(triples[i]), int(triples[i + 1]))] = triples[i + 2]
    matched = 0
    for port, last_seq, events, written in doc["deliveries"]:
        for seq in range(last_seq - events + 1, last_seq + 1):
            s = stamps.get(seq)
            got = receipts.get((port, seq))
            if s is None or got is None:
                continue
            matched += 1
            per["fanout"].append(written - s[6])
            per["socket"].append(got - written)
    if not stamps:
        raise BenchError("the relay recorded no stage times for the latency collab")
    return {
        "events_timed": len(stamps),
        "deliveries_timed": matched,
        "events_dropped": doc.get("events_dropped", 0),
        "deliveries_dropped": doc.get("deliveries_dropped", 0),
        "stages": {name: percentiles(values) for name, values in per.items()},
    }


def table(stages: dict[str, dict[str, float]]) -> str:
    """The breakdown as lines for the human summary."""
    lines = [f"  {'stage':<12} {'p50 ms':>9} {'p99 ms':>9} {'p99.9 ms':>9} {'max ms':>9}"]
    for name, p in stages.items():
        label = f"  {name}" if name in ("write_queue", "group_wait") else name
        lines.append(
            f"  {label:<12} {p['p50_ms']:>9.3f} {p['p99_ms']:>9.3f}"
            f" {p['p999_ms']:>9.3f} {p['max_ms']:>9.3f}"
        )
    return "\n".join(lines)
