"""The client's signature-check worker processes (clientkit/_sigprocs.py; ADR-0023).

A reader's catch-up sends its batches' signature checks to `python -m sigworker` processes.
What these tests hold them to: each verdict is the one the reader's own thread would give
(forgeries refused, in place), a worker that dies, never starts, garbles its replies or hangs
costs a share checked in the calling thread, never a verdict, and the workers end with the
client process. The relay side of the same workers is tests/test_sigworkers.py.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import sigworker
from clientkit import BadSetting, _sigprocs
from clientkit._sigprocs import SignatureCheckers, worker_count
from sigworker import check_signatures
from tests.test_sigworkers import BROKEN_WORKERS, _dead, _mixed

# Answers READY, then never answers a request: a worker stopped or wedged.
_HANGS = """
import sys, time
sys.stdout.buffer.write(b"R"); sys.stdout.buffer.flush()
time.sleep(600)
"""


def test_verdicts_are_the_threads_own_whichever_worker_gives_them() -> None:
    """Two workers answering shares of one batch at once, forgeries among them: each verdict
    lands on its own check, as `check_signatures` in the calling thread gives it."""
    checkers = SignatureCheckers(2)
    try:
        shares = [_mixed(300, [0, 7, 299]), _mixed(256, [128]), _mixed(64, [])]
        with ThreadPoolExecutor(2) as threads:
            for _ in range(3):
                got = list(threads.map(checkers.check, [checks for checks, _ in shares]))
                assert got == [want for _, want in shares]
        assert checkers.answered == 3 * sum(len(checks) for checks, _ in shares)
        assert len(checkers.pids()) == 2
        assert checkers.lost == 0
    finally:
        checkers.close()


@pytest.mark.parametrize("command", BROKEN_WORKERS)
def test_a_broken_worker_never_costs_a_verdict(command: list[str]) -> None:
    checkers = SignatureCheckers(1, command)
    checks, want = _mixed(64, [0, 31, 63])
    try:
        for _ in range(3):
            assert checkers.check(checks) == want
        assert checkers.answered == 0
        assert checkers.pids() == []
    finally:
        checkers.close()


@pytest.mark.parametrize("count", [40, 400], ids=["reply-never-comes", "request-never-read"])
def test_a_hung_worker_is_killed_and_its_share_checked_in_the_thread(
    monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """A worker that stops answering, or stops reading: 400 checks are more than a pipe holds,
    so the request's write would block. Old code (the prototype, then a blocking write): the
    reader waited on the worker for ever."""
    monkeypatch.setattr(sigworker, "REPLY_TIMEOUT", (0.5, 0.0))
    checkers = SignatureCheckers(1, [sys.executable, "-c", _HANGS])
    checks, want = _mixed(count, [3])
    try:
        began = time.monotonic()
        assert checkers.check(checks) == want
        assert time.monotonic() - began < 5
        assert checkers.lost == 1
        assert checkers.pids() == []
    finally:
        checkers.close()


def test_a_share_too_large_for_one_request_is_checked_in_the_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker exits on a request over MAX_REQUEST, so none is sent (and none is started for
    it): the calling thread checks the share. Old code (no size check here): the request went
    to a worker, which answered under its own, larger limit."""
    checkers = SignatureCheckers(1)
    checks, want = _mixed(100, [0, 99])
    monkeypatch.setattr(_sigprocs, "MAX_REQUEST", sigworker.request_size(checks) - 1)
    try:
        assert checkers.check(checks) == want
        assert (checkers.answered, checkers.pids(), checkers.lost) == (0, [], 0)
        assert checkers.check(checks[:-1]) == want[:-1]  # under the limit: a worker answers
        assert checkers.answered == len(checks) - 1
    finally:
        checkers.close()


def test_a_reader_with_over_a_thousand_open_files_still_uses_its_workers() -> None:
    """A bot beside its own sockets can hold more than FD_SETSIZE (1024) descriptors, so its
    workers' pipes get numbers `select` refuses. Old code (`select.select`): ValueError out of
    the reader's history."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    checkers = SignatureCheckers(1)
    try:
        checks, want = _mixed(64, [2])
        assert checkers.check(checks) == want
        assert checkers.answered == len(checks)
    finally:
        checkers.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_worker_busy_when_the_pool_closes_is_stopped_after_its_request() -> None:
    """Old code: `close` stopped the idle workers only, and a busy one went back to the idle
    list when its request ended, left running until the process exited."""
    checkers = SignatureCheckers(2)
    checks, want = _mixed(2000, [1999])
    with ThreadPoolExecutor(1) as thread:
        busy = thread.submit(checkers.check, checks)
        deadline = time.monotonic() + 10
        while checkers.pids() == [] and checkers._running == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        checkers.close()
        assert busy.result() == want
    assert checkers.pids() == []
    assert checkers._running == 0
    assert checkers.check(checks[:64]) == want[:64]  # closed: checked in the calling thread
    assert checkers.answered == len(checks)  # the busy worker's answer was used


def test_the_workers_end_with_the_client_process() -> None:
    """A reader's workers are its children: when the client process ends (normally here; a
    killed one closes their input all the same) they end too, not left behind."""
    script = """
import sys
from clientkit._sigprocs import checkers
from tests.test_sigworkers import _mixed
checks, want = _mixed(64, [5])
assert checkers().check(checks) == want
print(*checkers().pids())
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "COZY_VERIFY_WORKERS": "2"},
    )
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1  # one share, one worker
    deadline = time.monotonic() + 10
    while not all(_dead(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_dead(pid) for pid in pids)


def test_the_worker_setting_is_checked_and_zero_means_threads_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COZY_VERIFY_WORKERS", "lots")
    with pytest.raises(BadSetting, match="COZY_VERIFY_WORKERS must be a whole number"):
        worker_count()
    monkeypatch.setenv("COZY_VERIFY_WORKERS", "65")
    with pytest.raises(BadSetting):
        worker_count()
    monkeypatch.setenv("COZY_VERIFY_WORKERS", "0")
    checkers = SignatureCheckers(worker_count())
    checks, want = _mixed(64, [9])
    assert checkers.check(checks) == want == check_signatures(checks)
    assert (checkers.answered, checkers.pids()) == (0, [])
