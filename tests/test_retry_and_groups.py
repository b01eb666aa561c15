"""Backoff and exception-group unwrapping, each written once (clientkit/_retry.py and
model/excgroups.py); tests/test_house.py keeps every caller on them."""

from __future__ import annotations

import pytest
import trio

from clientkit._retry import backoff_delay
from clientkit.errors import IntegrityAlarm, TamperDetected
from model.excgroups import first_error, innermost, leaves


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
