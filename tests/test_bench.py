"""`cozy bench all --quick` runs end to end and reports every figure with its references.

A shape test, not a timed one: it asserts what the run did (every subscriber got every event,
the catch-up replayed the whole collab) and that each figure carries same-run references as
ratios, never how fast anything was.
"""

from __future__ import annotations

import json
import sys

import trio

RATE_REFS = {"per_event_commit", "verify_ceiling"}
EXPECTED_FIGURES = {
    "append.1_collab_512B",
    "append.100_collabs_512B",
    "append.1_collab_4KiB",
    "append.100_collabs_4KiB",
    "fanout.1_subscribers",
    "fanout.10_subscribers",
    "latency.p50",
    "latency.p99",
    "latency.p999",
    "subscribers.held",
    "subscribers.bytes_each",
    "catchup.events_per_s",
}


async def test_bench_all_quick_reports_every_figure_with_its_references() -> None:
    # The bench's own embedded Postgres: the test database runs with fsync off, which the
    # relay rightly refuses.
    with trio.fail_after(150):
        done = await trio.run_process(
            [sys.executable, "-m", "cozy.cli", "bench", "all", "--quick"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout)
    summary = done.stderr.decode()

    assert result["scenarios_run"] == ["append", "fanout", "latency", "subscribers", "catchup"]
    figures = result["figures"]
    assert set(figures) == EXPECTED_FIGURES
    for name, fig in figures.items():
        assert isinstance(fig["value"], int | float), name
        assert fig["better"] in ("higher", "lower"), name
        assert fig["refs"], f"{name} has no references"
        for ref_name, ref in fig["refs"].items():
            assert ref["value"] > 0, (name, ref_name)
            assert ref["ratio"] == round(fig["value"] / ref["value"], 3), (name, ref_name)
        if not name.startswith("subscribers."):
            assert set(fig["refs"]) >= RATE_REFS, name
        assert any(r.startswith("jetstream") for r in fig["refs"]), name
        assert name in summary  # and each one is in the human summary

    # What the run did, counted at the subscribers.
    raw = result["scenarios"]
    for run in raw["fanout"].values():
        assert run["deliveries"] == run["expected_deliveries"], run
        assert run["dropped_subscribers"] == 0, run
    assert raw["latency"]["deliveries"] == raw["latency"]["expected_deliveries"]
    idle = raw["subscribers"]
    assert idle["ready"] == idle["held"] == result["sizes"]["idle_subscribers"]
    assert raw["catchup"]["events"] == result["sizes"]["catchup_events"] + 1  # + genesis
    for name, run in raw["append"].items():
        assert run["events"] > 0, name
    assert result["database"]["fsync"] == "on"
    js = result["references"]["jetstream"]
    assert js["sync_interval"] == "always"
    assert js["catchup"]["events"] == result["sizes"]["catchup_events"]
