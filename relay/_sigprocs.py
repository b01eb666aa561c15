"""The relay's signature-check worker processes (`python -m sigworker`), kept running.

Each worker is started when the crypto pool first has a batch for it and restarted when it is
lost, with a growing pause if it keeps failing. Until one is ready, and whenever one fails
mid-batch, the pool checks that batch in its threads instead: a lost worker costs time, never
an answer (relay/_cryptopool.py).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import TYPE_CHECKING, Final

import structlog
import trio

from sigworker import (
    MAX_REQUEST,
    READY,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Check,
    WorkerLost,
    decode_reply,
    encode_request,
    reply_size,
    reply_timeout,
    request_size,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

log = structlog.get_logger("cozy.crypto")

# The pause before starting a lost worker again doubles from the first to the second while it
# keeps failing, and starts over once a worker has run this long.
RESTART_PAUSE: Final = (0.5, 60.0)
STABLE_SECONDS: Final = 60.0


class _Worker:
    def __init__(self, proc: trio.Process) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        self.proc = proc
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self.lost = trio.Event()
        self._busy = False
        self._requests = 0

    async def check(self, checks: Sequence[Check]) -> list[bool]:
        if self._busy:  # the pool gives one share per worker per round; framing relies on it
            raise RuntimeError("a signature worker was given two batches at once")
        self._busy = True
        self._requests = request_id = (self._requests + 1) % 2**32
        try:
            try:
                await self._stdin.send_all(encode_request(request_id, checks))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise WorkerLost("a signature worker exited") from None
            reply = await self.receive_exactly(reply_size(len(checks)))
            try:
                return decode_reply(request_id, reply)
            except ValueError:
                raise WorkerLost("a signature worker answered out of step") from None
        except BaseException:
            # Dead, out of step, or cancelled between request and reply: either way its
            # pipes cannot be trusted to line up any more, so it is done.
            self.lost.set()
            raise
        finally:
            self._busy = False

    async def receive_exactly(self, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            try:
                chunk = await self._stdout.receive_some(n - len(got))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                raise WorkerLost("a signature worker exited")
            got += chunk
        return bytes(got)

    async def stop(self) -> None:
        """Close its input (it exits at end of input), then kill it if it lingers."""
        try:
            await self._stdin.aclose()
            with trio.move_on_after(STOP_TIMEOUT):
                await self.proc.wait()
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            await self._stdout.aclose()


class SignatureWorkers:
    """`count` worker processes, started once `want` is called and kept running by `run`."""

    def __init__(self, count: int, command: Sequence[str] | None = None) -> None:
        self.count = max(0, count)
        self._command = list(command or [sys.executable, "-m", "sigworker"])
        self._ready: list[_Worker | None] = [None] * self.count  # set by `_run_one`
        self._wanted = trio.Event()
        self.lost = 0  # ready workers lost since, for statistics
        self.answered = 0  # checks the workers answered (the rest ran in threads)

    def want(self) -> None:
        """There is work for the workers: `run` starts them now (the pool calls this on its
        first round of MIN_REMOTE checks or more, so a relay that never sees a burst never
        spawns a process)."""
        self._wanted.set()

    def _live(self, index: int) -> _Worker | None:
        """Worker `index` if it is ready and not lost (its keeper replaces a lost one)."""
        worker = self._ready[index]
        return None if worker is None or worker.lost.is_set() else worker

    def ready(self, index: int) -> bool:
        return self._live(index) is not None

    def pids(self) -> list[int]:
        """The ready workers' process ids (tests and operators look at them)."""
        return [w.proc.pid for i in range(self.count) if (w := self._live(i)) is not None]

    async def check(self, index: int, checks: Sequence[Check]) -> list[bool]:
        """Worker `index`'s verdicts on `checks`, in order. Raises `WorkerLost` when it is not
        ready or fails; the caller checks them elsewhere."""
        worker = self._live(index)
        if worker is None:
            raise WorkerLost("the signature worker is not running")
        if request_size(checks) > MAX_REQUEST:
            raise WorkerLost("too large for one request")  # the worker itself is fine
        with trio.move_on_after(reply_timeout(len(checks))) as timer:
            verdicts = await worker.check(checks)  # cancelled, it marks itself lost
        if timer.cancelled_caught:
            raise WorkerLost("a signature worker did not answer in time")
        self.answered += len(verdicts)
        return verdicts

    async def run(self) -> None:
        """Start the workers once wanted and keep them running, until cancelled: then stop
        them (closed input, then a kill) before returning."""
        if self.count == 0:
            return
        await self._wanted.wait()
        async with trio.open_nursery() as nursery:
            for index in range(self.count):
                nursery.start_soon(self._keep, index, name=f"signature-worker-{index}")

    async def _keep(self, index: int) -> None:
        pause = RESTART_PAUSE[0]
        while True:
            began = trio.current_time()
            await self._run_one(index)
            if trio.current_time() - began >= STABLE_SECONDS:
                pause = RESTART_PAUSE[0]
            await trio.sleep(pause)
            pause = min(pause * 2, RESTART_PAUSE[1])

    async def _run_one(self, index: int) -> None:
        try:
            proc = await trio.lowlevel.open_process(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        except OSError as exc:
            log.error("signature_worker_not_started", worker=index, error=str(exc))
            return
        worker = _Worker(proc)
        ready = False
        try:
            hello = b""
            with trio.move_on_after(START_TIMEOUT):
                with contextlib.suppress(WorkerLost):
                    hello = await worker.receive_exactly(len(READY))
            if hello == READY:
                ready = True
                self._ready[index] = worker
                async with trio.open_nursery() as watch:
                    # Lost mid-batch (the pool finds out), or exited while idle (found here, so
                    # it is replaced before the next round needs it).
                    watch.start_soon(_lost_on_exit, worker)
                    await worker.lost.wait()
                    watch.cancel_scope.cancel()
                self.lost += 1
        finally:
            self._ready[index] = None
            with trio.CancelScope(shield=True):
                await worker.stop()
        if ready:
            log.warning("signature_worker_lost", worker=index, returncode=proc.returncode)
        else:
            log.error("signature_worker_not_ready", worker=index, returncode=proc.returncode)


async def _lost_on_exit(worker: _Worker) -> None:
    await worker.proc.wait()
    worker.lost.set()
