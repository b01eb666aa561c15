"""`cozy bench all --quick` runs end to end and reports every figure with its references, and
`--compare BASE.json` reports each figure's change against a saved run.

A shape test, not a timed one: it asserts what the run did (every subscriber got every event,
the catch-up replayed the whole collab) and that each figure carries same-run references as
ratios, never how fast anything was. The comparison is fed saved documents, so only one bench
ever runs.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import pytest
import trio

from cozy import bench
from cozy.bench._compare import CompareError, check_comparable, comparison, load_base, render
from cozy.bench._scenarios import Sizes
from cozy.cli import build_parser

if TYPE_CHECKING:
    from pathlib import Path

BENCH = [sys.executable, "-m", "cozy.cli", "bench"]

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
    "client.verify",
    "client.verify_rate",
    "client.tail",
    "client.tail_again",
    "client.bot_restart_reply",
    "client.bot_catchup",
}


def saved_run(figures: dict[str, float], sizes: dict[str, Any]) -> dict[str, Any]:
    """A document as `cozy bench` saves it, with these figure values (each with one reference
    of value 1.0, so each ratio is the value)."""
    return {
        "benchmark": "cozy bench",
        "sizes": json.loads(json.dumps(sizes)),
        "figures": {
            name: {
                "value": value,
                "unit": "x",
                "better": "lower"
                if name.startswith(("latency.", "subscribers.bytes"))
                else "higher",
                "refs": {"per_event_commit": {"value": 1.0, "unit": "x", "ratio": value}},
            }
            for name, value in figures.items()
        },
    }


async def test_bench_all_quick_reports_every_figure_with_its_references(tmp_path: Path) -> None:
    # Before (--compare): there was no way to see a run's change against an earlier one.
    base_path = tmp_path / "base.json"
    base = saved_run(dict.fromkeys(EXPECTED_FIGURES, 10.0), vars(Sizes.quick()))
    base_path.write_text(json.dumps(base))
    # The bench's own embedded Postgres: the test database runs with fsync off, which the
    # relay rightly refuses.
    with trio.fail_after(240):  # six scenarios, the client kit's among them
        done = await trio.run_process(
            [*BENCH, "all", "--quick", "--compare", str(base_path)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout)
    summary = done.stderr.decode()

    assert result["scenarios_run"] == [
        "append",
        "fanout",
        "latency",
        "subscribers",
        "catchup",
        "client",
    ]
    figures = result["figures"]
    assert set(figures) == EXPECTED_FIGURES
    for name, fig in figures.items():
        assert isinstance(fig["value"], int | float), name
        assert fig["better"] in ("higher", "lower"), name
        assert fig["refs"], f"{name} has no references"
        for ref_name, ref in fig["refs"].items():
            assert ref["value"] > 0, (name, ref_name)
            assert ref["ratio"] == round(fig["value"] / ref["value"], 3), (name, ref_name)
        if name.startswith("client."):  # the client kit's own figures: no JetStream analogue
            assert set(fig["refs"]) == {"verify_ceiling"}, name
        else:
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
    client = raw["client"]
    assert client["head_seq"] == client["events"] + 14  # + genesis, name, two additions, 10 new
    assert client["bot_reconnects"] == 0
    for name, run in raw["append"].items():
        assert run["events"] > 0, name
    assert result["database"]["fsync"] == "on"
    js = result["references"]["jetstream"]
    assert js["sync_interval"] == "always"
    assert js["catchup"]["events"] == result["sizes"]["catchup_events"]

    # --compare: every figure against BASE, in the JSON and one line each in the summary.
    compared = result["comparison"]
    assert set(compared["figures"]) == EXPECTED_FIGURES
    assert compared["only_here"] == compared["only_in_base"] == []
    for name, c in compared["figures"].items():
        value = figures[name]["value"]
        assert c["base"] == 10.0
        assert c["value"] == value
        assert c["change_pct"] == round((value - 10.0) / 10.0 * 100, 1), name
        higher = figures[name]["better"] == "higher"
        assert c["better"] is (None if value == 10.0 else (value > 10.0) is higher), name
        for ref, r in c["ratios"].items():  # the references both runs have
            assert r == {"base": 10.0, "ratio": figures[name]["refs"][ref]["ratio"]}, name
    table = summary.split("compared with BASE", 1)[1]
    for name in EXPECTED_FIGURES:
        assert f"\n{name} " in table, name

    # The saved stdout of this run is itself a BASE: compared with itself, nothing changed.
    saved = tmp_path / "run.json"
    saved.write_bytes(done.stdout)
    same = comparison(result, load_base(saved))
    assert {c["change_pct"] for c in same["figures"].values()} <= {0.0, None}
    assert {c["better"] for c in same["figures"].values()} == {None}
    assert "same" in render(same)


def test_a_saved_run_with_figures_only_one_side_has_lists_them() -> None:
    ours = saved_run({"append.1_collab_512B": 200.0, "latency.p50": 4.0}, {})
    theirs = saved_run({"append.1_collab_512B": 100.0, "catchup.events_per_s": 9.0}, {})
    compared = comparison(ours, theirs)
    assert compared["figures"]["append.1_collab_512B"]["change_pct"] == 100.0
    assert compared["figures"]["append.1_collab_512B"]["better"] is True
    assert compared["only_here"] == ["latency.p50"]
    assert compared["only_in_base"] == ["catchup.events_per_s"]
    text = render(compared)
    assert "+100.0% better" in text
    assert "latency.p50                  not in BASE" in text
    assert "catchup.events_per_s         in BASE only" in text


BAD_BASES = {
    "missing": (None, "no such file; save a run first with `cozy bench all >"),
    "not JSON": (b"cozy bench: append: running\n{", "is not JSON: save the stdout of"),
    "not a bench run": (b'{"figures": {}}', "is not a `cozy bench` run"),
    "other sizes": (
        json.dumps(saved_run({"latency.p50": 1.0}, vars(Sizes()))).encode(),
        "was run with other sizes (",
    ),
    "unreadable": (b"\xff\xfe not utf-8", "cannot read it"),
}


@pytest.mark.parametrize("what", list(BAD_BASES))
def test_a_bad_base_is_one_line_and_exit_2_before_anything_runs(
    tmp_path: Path, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    content, says = BAD_BASES[what]
    base = tmp_path / "base.json"
    if content is not None:
        base.write_bytes(content)
    with pytest.raises(CompareError):  # the typed error behind the line
        check_comparable(load_base(base), vars(Sizes.quick()), base)
    # `cozy bench`'s own entry, in this process: a bench that started anyway would run for a
    # minute or more and print progress.
    args = build_parser().parse_args(["bench", "all", "--quick", "--compare", str(base)])
    assert bench.main(args) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(f"error: --compare {base}")
    assert says in err
    assert out == ""


async def test_cozy_bench_with_a_missing_base_says_how_to_save_one(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    with trio.fail_after(60):
        done = await trio.run_process(
            [*BENCH, "all", "--quick", "--compare", str(base)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        f"error: --compare {base}: no such file; save a run first with `cozy bench all > {base}`"
    ]
    assert done.stdout == b""
