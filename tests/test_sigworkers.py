"""Signature checks in worker processes (sigworker/, relay/_sigprocs.py).

Checked in a thread, each signature hands the relay's GIL back and forth with the loop; a
worker process has an interpreter of its own. What these tests hold the workers to: a forged
signature is refused whichever process checks it, each verdict lands on its own event, and a
worker that dies, never starts or garbles its replies costs the relay a round in its threads,
never an answer.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import msgspec
import nacl.signing
import pytest
import trio

from clientkit import RelayRefused
from model import _crypto as model_crypto
from model import wire
from model.envelope import event_id
from relay import _sigprocs
from relay._cryptopool import MIN_REMOTE, CryptoPool
from relay._sigprocs import SignatureWorkers
from sigworker import (
    REPLY_TIMEOUT,
    Check,
    WorkerLost,
    check_signatures,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    request_size,
)
from tests.relay_harness import session, sign_up
from tests.test_ops import metrics
from tests.test_overload import wait_until
from tests.test_relay_e2e import ledger_rows

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from relay._server import Relay

_KEY = nacl.signing.SigningKey(b"k" * 32)
_OTHER = nacl.signing.SigningKey(b"o" * 32)


def _good(i: int) -> Check:
    message = f"message {i}".encode() * 20
    return bytes(_KEY.verify_key), message, _KEY.sign(message).signature


def _forgeries() -> list[Check]:
    """The cheap forgeries: another key's signature, a changed message, truncated, empty."""
    pk, message, sig = _good(0)
    return [
        (pk, message, _OTHER.sign(message).signature),
        (pk, message + b"!", sig),
        (pk, message, sig[:63]),
        (pk, message, b""),
        (b"", message, sig),
        (bytes(_OTHER.verify_key), message, sig),
    ]


def _mixed(n: int, forged_at: Sequence[int]) -> tuple[list[Check], list[bool]]:
    checks = [_good(i) for i in range(n)]
    forgeries = _forgeries()
    for k, at in enumerate(forged_at):
        checks[at] = forgeries[k % len(forgeries)]
    return checks, [i not in forged_at for i in range(n)]


def _dead(pid: int) -> bool:
    """Exited (a zombie until its parent reaps it) or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@asynccontextmanager
async def _ready_pool(count: int) -> AsyncIterator[tuple[CryptoPool, SignatureWorkers]]:
    """A running pool whose `count` workers are ready; closed (workers stopped) on exit."""
    workers = SignatureWorkers(count)
    pool = CryptoPool(2, workers)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            workers.want()
            await wait_until(lambda: len(workers.pids()) == count)
            yield pool, workers
            pool.close()


def test_requests_round_trip_and_a_malformed_one_is_refused() -> None:
    checks = [_good(1), *_forgeries()]
    payload = encode_request(7, checks)[4:]
    assert len(payload) == request_size(checks)
    assert decode_request(payload) == (7, checks)
    verdicts = [True, False, True]
    assert decode_reply(7, encode_reply(7, verdicts)) == verdicts
    for stale in (encode_reply(6, verdicts), b"\x07\x00\x00\x00\x01\x02\x00"):
        with pytest.raises(ValueError, match="does not answer"):
            decode_reply(7, stale)
    with pytest.raises(ValueError, match="truncated"):
        decode_request(payload[:-1])
    with pytest.raises(ValueError, match="longer"):
        decode_request(payload + b"x")
    assert check_signatures(checks) == [True] + [False] * len(_forgeries())


@pytest.mark.objective("SO-3")
async def test_a_worker_process_refuses_each_cheap_forgery() -> None:
    workers = SignatureWorkers(1)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run)
            with pytest.raises(WorkerLost):  # not wanted yet: nothing was started
                await workers.check(0, [_good(0)])
            workers.want()
            await wait_until(lambda: workers.ready(0))
            # Ctrl-C reaches a terminal's whole process group: the relay stops its workers
            # itself once drained, so they must outlive it.
            os.kill(workers.pids()[0], signal.SIGINT)
            checks = [_good(0), *_forgeries(), _good(1)]
            verdicts = await workers.check(0, checks)
            nursery.cancel_scope.cancel()
    assert verdicts == [True] + [False] * len(_forgeries()) + [True]
    assert workers.answered == len(checks)


async def test_a_pools_rounds_give_each_job_its_own_verdicts_from_both_workers() -> None:
    """Shares cut across jobs: a verdict off by one place would pass a forgery."""
    jobs = [_mixed(n, forged) for n, forged in [(70, [0, 69]), (33, [16]), (130, [64, 65, 129])]]
    got: dict[int, list[bool]] = {}
    async with _ready_pool(2) as (pool, workers):

        async def call(k: int) -> None:
            got[k] = await pool.check_signatures(jobs[k][0])

        async with trio.open_nursery() as callers:
            for k in range(len(jobs)):
                callers.start_soon(call, k)
    assert [got[k] for k in range(len(jobs))] == [want for _, want in jobs]
    assert workers.answered == sum(len(c) for c, _ in jobs), "some checks skipped the workers"


async def test_a_round_of_few_checks_stays_in_the_threads() -> None:
    """A worker's wakeup costs as much as a thread's: below MIN_REMOTE checks in a round, the
    GIL hand-offs it would save are too few to pay for it (docs/performance.md)."""
    checks, want = _mixed(MIN_REMOTE, [1, MIN_REMOTE - 1])
    async with _ready_pool(1) as (pool, workers):
        assert await pool.check_signatures(checks[: MIN_REMOTE - 1]) == want[: MIN_REMOTE - 1]
        assert workers.answered == 0
        assert await pool.check_signatures(checks) == want
        assert workers.answered == MIN_REMOTE


async def test_workers_start_only_once_a_round_is_large_enough_for_them() -> None:
    """A relay whose rounds all stay in the threads (a trickle of appends) spawns no process:
    two idle interpreters are ~32 MB for nothing. Old code: any signature check handed to the
    pool started the workers, so `cozy dev` had two after a few sequential posts."""
    workers = SignatureWorkers(1)
    pool = CryptoPool(2, workers)
    checks, want = _mixed(MIN_REMOTE, [0])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            for _ in range(5):
                assert await pool.check_signatures(checks[:8]) == want[:8]
            await trio.sleep(0.5)
            assert workers.pids() == []
            assert await pool.check_signatures(checks) == want  # in threads: none ready yet
            await wait_until(lambda: len(workers.pids()) == 1)
            assert await pool.check_signatures(checks) == want
            assert workers.answered == MIN_REMOTE
            pool.close()


async def test_a_round_too_large_for_one_request_goes_to_the_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker exits on a request over MAX_REQUEST, so none is sent: the threads check
    that round and the worker stays, ready for the next."""
    checks, want = _mixed(100, [0, 99])
    async with _ready_pool(1) as (pool, workers):
        monkeypatch.setattr(_sigprocs, "MAX_REQUEST", request_size(checks) - 1)
        assert await pool.check_signatures(checks) == want
        assert (workers.answered, workers.lost, workers.ready(0)) == (0, 0, True)
        assert await pool.check_signatures(checks[:-1]) == want[:-1]
        assert workers.answered == len(checks) - 1


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
async def test_a_lost_worker_costs_a_round_in_threads_then_is_started_again(
    how: signal.Signals,
) -> None:
    """Killed, or hung (SIGSTOP: a debugger, a starved or wedged process; it delays the round
    by at most REPLY_TIMEOUT), the worker is replaced and the threads check its batch."""
    checks, want = _mixed(100, [0, 50, 99])
    async with _ready_pool(1) as (pool, workers):
        (pid,) = workers.pids()
        os.kill(pid, how)
        if how == signal.SIGKILL:
            await wait_until(lambda: _dead(pid))
        began = trio.current_time()
        assert await pool.check_signatures(checks) == want
        assert trio.current_time() - began < REPLY_TIMEOUT[0] + 100 * REPLY_TIMEOUT[1] + 2
        assert (workers.answered, workers.lost) == (0, 1)
        await wait_until(lambda: _dead(pid))  # killed, even stopped
        await wait_until(lambda: workers.ready(0))
        assert workers.pids() != [pid]
        assert await pool.check_signatures(checks) == want
        assert workers.answered == len(checks)
    with pytest.raises(ProcessLookupError):  # stopped and reaped with the pool
        os.kill(pid, 0)


_GARBLER = """
import sys
sys.stdout.buffer.write(b"R"); sys.stdout.buffer.flush()
head = sys.stdin.buffer.read(4)
sys.stdin.buffer.read(int.from_bytes(head, "little"))
sys.stdout.buffer.write(b"\\x07" * 4096); sys.stdout.buffer.flush()
sys.stdin.buffer.read()
"""
# Well-formed replies, all "holds", but each for the request before: a worker out of step.
_OUT_OF_STEP = """
import sys
sys.stdout.buffer.write(b"R"); sys.stdout.buffer.flush()
while head := sys.stdin.buffer.read(4):
    payload = sys.stdin.buffer.read(int.from_bytes(head, "little"))
    rid, count = int.from_bytes(payload[:4], "little"), int.from_bytes(payload[4:8], "little")
    sys.stdout.buffer.write((rid - 1).to_bytes(4, "little") + b"\\x01" * count)
    sys.stdout.buffer.flush()
"""


# Workers that never give a usable answer (also tests/test_client_sigworkers.py).
BROKEN_WORKERS = [
    pytest.param([sys.executable, "-c", _GARBLER], id="garbled-replies"),
    pytest.param([sys.executable, "-c", _OUT_OF_STEP], id="out-of-step-replies"),
    pytest.param([sys.executable, "-c", "import sys; sys.exit(3)"], id="exits-at-start"),
    pytest.param(["/nonexistent/cozy-signature-worker"], id="cannot-start"),
]


@pytest.mark.parametrize("command", BROKEN_WORKERS)
async def test_a_broken_worker_never_costs_an_answer(command: list[str]) -> None:
    workers = SignatureWorkers(1, command)
    pool = CryptoPool(2, workers)
    checks, want = _mixed(64, [0, 31, 63])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            for _ in range(3):
                assert await pool.check_signatures(checks) == want
                await trio.sleep(0.2)
            pool.close()
    assert workers.answered == 0


async def test_closing_the_pool_stops_its_workers() -> None:
    async with _ready_pool(2) as (_, workers):
        pids = workers.pids()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.objective("SO-6")
async def test_a_flood_of_forgeries_costs_one_check_each_and_none_on_the_loop(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cheapest abuse of verification: a member sends bursts of badly signed appends. Each
    forgery's signature is checked once, by a worker (or a crypto thread); the verify stage
    then answers `bad_signature` on that verdict instead of checking it again on the loop,
    which would have doubled the cost of each forgery and put it on the relay's loop.
    Old code: `verify_event` checked every signature the pool refused once more."""
    checked_on_loop = 0
    verify = model_crypto.verify

    def counting(public_key: bytes, message: bytes, signature: bytes) -> bool:
        nonlocal checked_on_loop
        if threading.current_thread() is threading.main_thread():
            checked_on_loop += 1
        return verify(public_key, message, signature)

    alice = await sign_up(relay.url, "alice")
    monkeypatch.setattr(model_crypto, "verify", counting)
    forged = [
        msgspec.structs.replace(alice.event(f"forged {i}"), sig=_OTHER.sign(b"x").signature)
        for i in range(3 * MIN_REMOTE)
    ]
    async with session(relay.url, alice) as client:
        for burst in (forged[:1], forged[1:4], forged[4:]):  # on the loop, then to the pool
            with pytest.raises(RelayRefused) as refused:
                await client.append_many(burst)
            assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
    assert checked_on_loop == 0


@pytest.mark.objective("SO-3")
async def test_forged_events_in_a_burst_are_refused_by_the_relays_workers(
    relay: Relay, database_url: str
) -> None:
    """A burst of appends is checked in the relay's worker processes; forgeries hidden in it
    (another account's signature, a wrong key) are refused one by one and the rest stored.
    Then both workers are killed between two bursts: every append of the next one still gets
    its answer."""
    workers = relay._sequencers._crypto._workers
    assert workers is not None
    alice = await sign_up(relay.url, "alice")
    mallory = await sign_up(relay.url, "mallory")
    async with session(relay.url, alice) as client:
        await client.append_many([alice.event(f"warm {i}") for i in range(64)])
        await wait_until(lambda: workers.ready(0) and workers.ready(1))
        answered = workers.answered
        burst = [alice.event(f"burst {i}") for i in range(64)]
        forged = {5: mallory.event("x").sig, 40: _OTHER.sign(burst[40].body).signature}
        for at, sig in forged.items():
            burst[at] = msgspec.structs.replace(burst[at], sig=sig)
        with pytest.raises(RelayRefused) as refused:
            await client.append_many(burst)
        assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
        assert workers.answered - answered >= len(burst), "the burst skipped the workers"
        stored = {
            eid
            for _, eid in await trio.to_thread.run_sync(ledger_rows, database_url, alice.collab_id)
        }
        for i, ev in enumerate(burst):
            assert (event_id(ev) in stored) is (i not in forged), f"event {i}"

        for pid in workers.pids():
            os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: workers.lost == 2)  # found dead while idle, not at the next round
        after = [alice.event(f"after the kill {i}") for i in range(64)]
        acks = await client.append_many(after)
        assert [a.seq for a in acks] == list(range(acks[0].seq, acks[0].seq + len(after)))
    # What an operator sees: the checks the workers made, the two lost, both back.
    scraped = await metrics(relay.ops_url)
    assert scraped["cozy_signature_checks_in_workers_total"] >= len(burst)
    assert scraped["cozy_signature_workers_lost_total"] == 2
    await wait_until(lambda: workers.ready(0) and workers.ready(1))
    assert (await metrics(relay.ops_url))["cozy_signature_workers_ready"] == 2
    stored = {
        eid for _, eid in await trio.to_thread.run_sync(ledger_rows, database_url, alice.collab_id)
    }
    assert {event_id(ev) for ev in after} <= stored
