"""Backoff and exception-group unwrapping, each written once (clientkit/_retry.py and
model/excgroups.py), and the source tree keeping it that way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import trio

from clientkit._retry import backoff_delay
from clientkit.errors import IntegrityAlarm, TamperDetected
from model.excgroups import first_error, innermost, leaves

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "localfs", "ledger", "fanout", "relay", "clientkit", "cozy")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(0, 0.05), (1, 0.1), (3, 0.4), (5, 1.6), (6, 2.0), (10_000, 2.0)]
)
def test_backoff_doubles_from_start_up_to_the_cap_with_jitter_below_it(
    attempt: int, ceiling: float
) -> None:
    delays = [backoff_delay(attempt, start=0.05, cap=2.0) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 100  # jittered: clients shed together do not return together


def _nested() -> BaseExceptionGroup[BaseException]:
    alarm = TamperDetected("bad", collab_id="c", seq=1)
    return BaseExceptionGroup(
        "outer",
        [
            trio.Cancelled._create(),
            BaseExceptionGroup("inner", [ConnectionError("gone"), alarm]),
            KeyboardInterrupt(),
        ],
    )


def test_leaves_lists_every_non_group_exception_in_order() -> None:
    assert [type(e) for e in leaves(_nested())] == [
        trio.Cancelled,
        ConnectionError,
        TamperDetected,
        KeyboardInterrupt,
    ]
    plain = ValueError("x")
    assert leaves(plain) == [plain]


def test_innermost_unwraps_only_groups_of_one() -> None:
    error = ValueError("x")
    assert innermost(ExceptionGroup("a", [ExceptionGroup("b", [error])])) is error
    several = ExceptionGroup("a", [error, KeyError("k")])
    assert innermost(ExceptionGroup("outer", [several])) is several


def test_first_error_prefers_the_named_kind_then_exceptions_and_skips_cancellations() -> None:
    group = _nested()
    assert isinstance(first_error(group, prefer=(IntegrityAlarm,)), TamperDetected)
    assert isinstance(first_error(group, skip=(trio.Cancelled,)), ConnectionError)
    assert isinstance(first_error(group), ConnectionError)
    only_cancelled = BaseExceptionGroup("c", [trio.Cancelled._create()])
    assert first_error(only_cancelled, skip=(trio.Cancelled,)) is None


def test_no_module_walks_exception_groups_or_draws_jitter_of_its_own() -> None:
    """Every `isinstance(x, BaseExceptionGroup)` walk lives in model/excgroups.py and every
    jitter draw in clientkit/_retry.py, so the next caller reuses them."""
    found: list[str] = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and "ExceptionGroup" in ast.unparse(node.args[1])
                and rel != "model/excgroups.py"
            ):
                found.append(f"{rel}:{node.lineno} walks an exception group")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "random"
                and rel != "clientkit/_retry.py"
            ):
                found.append(f"{rel}:{node.lineno} draws random.{node.attr}")
    assert found == []
