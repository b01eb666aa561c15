"""The client's signature-check worker processes (`python -m sigworker`; ADR-0023).

A catch-up checks one signature per event, and the reader's fold runs Python for each event on
the main thread. Worker threads checking the signatures take the GIL back after every one of
them, so reading was bound by GIL hand-offs rather than by either core (docs/performance.md,
"The client side"). Each check here runs in a process with an interpreter of its own, the same
worker the relay uses (sigworker/): only public data crosses its pipe (members' public keys,
signed bytes, signatures), never a collab key or a plaintext. Decryption stays in the reader's
process, on the fold's thread.

Blocking, for the reader's worker threads (clientkit/_verifiers.py): each thread takes an idle
worker, or starts one, writes one request and waits for its reply. At most `count` processes
run, started on first use (a reader that never takes in a large batch never spawns one) and
ended when the client process exits (their input closes). A worker that fails, hangs past its
deadline or answers out of step is killed, and its share is checked in the calling thread, so a
lost worker costs time, never a verdict; after a worker fails to start, workers are not tried
again for `RETRY_SECONDS`.

`COZY_VERIFY_WORKERS` sets how many (default: one per core, at least two); `0` checks in the
threads only.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import select
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Final

from clientkit.errors import BadSetting
from sigworker import (
    MAX_REQUEST,
    READY,
    START_TIMEOUT,
    STOP_TIMEOUT,
    WorkerLost,
    check_signatures,
    decode_reply,
    encode_request,
    reply_size,
    reply_timeout,
    request_size,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sigworker import Check

WORKERS_ENV: Final = "COZY_VERIFY_WORKERS"
# After a worker fails to start, none is started again for this long.
RETRY_SECONDS: Final = 60.0


def worker_count() -> int:
    """`COZY_VERIFY_WORKERS`, or one per core (at least two). Raises `BadSetting` on a value
    that is not a whole number from 0 to 64."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if not raw:
        return max(2, os.cpu_count() or 2)
    if not raw.isdigit() or int(raw) > 64:
        raise BadSetting(
            f"{WORKERS_ENV} must be a whole number from 0 to 64 (0: check signatures in threads"
            f" only), got {raw!r}; fix or unset it"
        )
    return int(raw)


class _Worker:
    def __init__(self, command: Sequence[str]) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 — our own interpreter and module
            list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self._stdin: IO[bytes] = self.proc.stdin
        self._stdout = self.proc.stdout.fileno()
        # A worker that stopped reading must not block a request's write for ever either.
        os.set_blocking(self._stdin.fileno(), False)
        self._requests = 0
        self.ready = False  # it answered READY

    def check(self, checks: Sequence[Check]) -> list[bool]:
        if not self.ready:
            if self._read(len(READY), time.monotonic() + START_TIMEOUT) != READY:
                raise WorkerLost("the signature worker did not start")
            self.ready = True
        self._requests = request_id = (self._requests + 1) % 2**32
        deadline = time.monotonic() + reply_timeout(len(checks))
        self._write(encode_request(request_id, checks), deadline)
        try:
            return decode_reply(request_id, self._read(reply_size(len(checks)), deadline))
        except ValueError:
            raise WorkerLost("the signature worker answered out of step") from None

    def _write(self, data: bytes, deadline: float) -> None:
        fd = self._stdin.fileno()
        view = memoryview(data)
        while view:
            if not _wait(fd, select.POLLOUT, deadline):
                raise WorkerLost("the signature worker did not take its request in time")
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue
            except OSError:
                raise WorkerLost("the signature worker exited") from None

    def _read(self, n: int, deadline: float) -> bytes:
        got = bytearray()
        while len(got) < n:
            if not _wait(self._stdout, select.POLLIN, deadline):
                raise WorkerLost("the signature worker did not answer in time")
            chunk = os.read(self._stdout, n - len(got))
            if not chunk:
                raise WorkerLost("the signature worker exited")
            got += chunk
        return bytes(got)

    def stop(self, *, kill: bool = False) -> None:
        """Close its input (it exits at end of input); kill it if asked or if it lingers."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _wait(fd: int, event: int, deadline: float) -> bool:
    """Whether `fd` is ready for `event` (or closed at the other end) before `deadline`.
    `poll`, not `select`: a reader in a program with over a thousand open files (a bot
    beside its own sockets) gets pipe descriptors `select` cannot take."""
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(1, math.ceil(left * 1000))))


class SignatureCheckers:
    """Up to `count` worker processes, shared by every reader in this process."""

    def __init__(self, count: int, command: Sequence[str] | None = None) -> None:
        self.count = max(0, count)
        self._command = list(command or [sys.executable, "-m", "sigworker"])
        self._idle: list[_Worker] = []
        self._running = 0  # started and not stopped, idle or busy
        self._lock = threading.Lock()
        self._retry_at = 0.0  # while in the future, no worker is started (one failed to)
        self._closed = False
        self.answered = 0  # checks the workers answered (the rest ran in the calling thread)
        self.lost = 0  # workers killed after failing a request

    def check(self, checks: Sequence[Check]) -> list[bool]:
        """Whether each (public key, message, signature) holds, in order: in a worker process
        when one can take it, else in the calling thread. Blocking."""
        worker = self._take() if checks and request_size(checks) <= MAX_REQUEST else None
        if worker is None:
            return check_signatures(checks)
        try:
            verdicts = worker.check(checks)
        except WorkerLost:
            self._lose(worker)
            return check_signatures(checks)
        except BaseException:
            self._lose(worker)
            raise
        with self._lock:
            self.answered += len(verdicts)
            closed = self._closed
            if not closed:
                self._idle.append(worker)
            else:
                self._running -= 1
        if closed:
            worker.stop()  # it was busy when the pool closed
        return verdicts

    def pids(self) -> list[int]:
        """The idle workers' process ids (tests look at them)."""
        with self._lock:
            return [w.proc.pid for w in self._idle]

    def close(self) -> None:
        """Stop the idle workers (a busy one is stopped by the request that holds it)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._running -= len(idle)
            self._closed = True  # no new worker, and a busy one stops when its request ends
        for worker in idle:
            worker.stop()

    def _take(self) -> _Worker | None:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self._closed or self._running >= self.count or time.monotonic() < self._retry_at:
                return None
            self._running += 1
        try:
            return _Worker(self._command)
        except OSError:
            with self._lock:
                self._running -= 1
                self._retry_at = time.monotonic() + RETRY_SECONDS
            return None

    def _lose(self, worker: _Worker) -> None:
        worker.stop(kill=True)
        with self._lock:
            self._running -= 1
            self.lost += 1
            if not worker.ready:
                self._retry_at = time.monotonic() + RETRY_SECONDS


_checkers: SignatureCheckers | None = None
_checkers_lock = threading.Lock()


def checkers() -> SignatureCheckers:
    """The process's workers, made on first use and stopped when the process exits."""
    global _checkers  # one set per process, like the threads that drive them
    with _checkers_lock:
        if _checkers is None:
            _checkers = SignatureCheckers(worker_count())
            atexit.register(_checkers.close)
        return _checkers
