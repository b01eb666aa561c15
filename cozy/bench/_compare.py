"""`cozy bench … --compare BASE.json`: each figure's change against a saved run.

A saved run is the JSON document `cozy bench` prints on stdout (`cozy bench all > base.json`).
Absolute numbers move with whatever else the machine is doing, so beside the change of each
value the comparison shows the change of its ratio to each same-run reference (a relay 10%
slower on a machine 10% slower keeps its ratios): that is the number to read when the two runs
did not share a quiet machine (docs/performance.md).

BASE is read before anything runs, so a wrong path costs no benchmark. Only runs of the same
sizes compare (a quick run against a full one measures other things); a BASE that cannot be
read, is not a `cozy bench` document, or was run with other sizes is a `CompareError`, whose
message is one line that says what to do.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from cozy.bench._common import BenchError

if TYPE_CHECKING:
    from pathlib import Path

BENCHMARK: Final = "cozy bench"


class CompareError(BenchError):
    """The BASE document of `--compare` cannot be compared with this run. One line."""


def load_base(path: Path) -> dict[str, Any]:
    """The saved run at `path`. Raises `CompareError` (missing, unreadable, not a bench run)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompareError(
            f"--compare {path}: no such file; save a run first with `cozy bench all > {path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CompareError(f"--compare {path}: cannot read it ({why})") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise CompareError(
            f"--compare {path} is not JSON: save the stdout of `cozy bench` alone (its summary"
            " goes to stderr), e.g. `cozy bench all > base.json`"
        ) from None
    if not (
        isinstance(doc, dict)
        and doc.get("benchmark") == BENCHMARK
        and isinstance(doc.get("figures"), dict)
        and isinstance(doc.get("sizes"), dict)
        and all(_is_figure(f) for f in doc["figures"].values())
    ):
        raise CompareError(
            f"--compare {path} is not a `cozy bench` run (no benchmark, sizes and figures): give"
            " a file saved from `cozy bench … > FILE`"
        )
    return doc


def _is_figure(fig: object) -> bool:
    return (
        isinstance(fig, dict)
        and isinstance(fig.get("value"), int | float)
        and isinstance(fig.get("refs"), dict)
        and all(isinstance(r, dict) for r in fig["refs"].values())
    )


def check_comparable(base: dict[str, Any], sizes: dict[str, Any], path: Path) -> None:
    """Refuse a BASE run with other sizes than this run's, before this run starts."""
    ours = json.loads(json.dumps(sizes))  # tuples as the saved document has them: lists
    theirs = base["sizes"]
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        name = differ[0]
        raise CompareError(
            f"--compare {path} was run with other sizes ({name}: {theirs.get(name)} there,"
            f" {ours.get(name)} here): rerun with the same flags (--quick, --events, …) as BASE"
        )


def comparison(result: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Per figure of this run that BASE has too: both values, the change in percent, whether it
    is better, and each common reference's ratio in both runs. Figures only one run has are
    listed under `only_here` / `only_in_base`."""
    ours, theirs = result["figures"], base["figures"]
    figures: dict[str, Any] = {}
    for name, fig in ours.items():
        old = theirs.get(name)
        if old is None:
            continue
        figures[name] = {
            "value": fig["value"],
            "base": old["value"],
            "change_pct": _change(fig["value"], old["value"]),
            "better": _better(fig, old),
            "ratios": {
                ref: {"ratio": r["ratio"], "base": old["refs"][ref].get("ratio")}
                for ref, r in fig["refs"].items()
                if ref in old["refs"]
            },
        }
    return {
        "figures": figures,
        "only_here": sorted(set(ours) - set(theirs)),
        "only_in_base": sorted(set(theirs) - set(ours)),
    }


def _change(new: float, old: float) -> float | None:
    return None if not old else round((new - old) / old * 100, 1)


def _better(new: dict[str, Any], old: dict[str, Any]) -> bool | None:
    if new["value"] == old["value"]:
        return None
    higher = bool(new["value"] > old["value"])
    return higher is (new.get("better", "higher") == "higher")


def render(compared: dict[str, Any]) -> str:
    """One line per figure: base → now, the change, and each reference ratio base → now."""
    lines = ["compared with BASE (value, then each same-run reference ratio):"]
    for name, c in compared["figures"].items():
        change = "n/a" if c["change_pct"] is None else f"{c['change_pct']:+.1f}%"
        verdict = {True: "better", False: "worse", None: "same"}[c["better"]]
        ratios = ", ".join(f"{ref} {r['base']}x→{r['ratio']}x" for ref, r in c["ratios"].items())
        lines.append(
            f"{name:<28} {c['base']:>12,.1f} → {c['value']:>12,.1f}  {change:>8} {verdict:<6}"
            f" ({ratios})"
        )
    for name in compared["only_here"]:
        lines.append(f"{name:<28} not in BASE")
    for name in compared["only_in_base"]:
        lines.append(f"{name:<28} in BASE only (not run now)")
    return "\n".join(lines)
