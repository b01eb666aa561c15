"""The sequencers' crypto pool: many callers' jobs, split across threads, each answered in
order with exactly its own results."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
import trio

from relay._cryptopool import INLINE_BUDGET, MIN_SHARE, CryptoPool, _Job, _shares

if TYPE_CHECKING:
    from collections.abc import Sequence


def _square(items: Sequence[int]) -> list[int]:
    return [i * i for i in items]


async def test_concurrent_callers_get_their_own_results_in_order() -> None:
    with trio.fail_after(10):
        pool = CryptoPool(2)
        results: dict[int, list[int]] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)

            async def call(k: int, n: int) -> None:
                items = list(range(k * 1000, k * 1000 + n))
                results[k] = await pool.map(_square, items)

            async with trio.open_nursery() as callers:
                for k, n in enumerate([1, 0, 500, 33, 64, 2, 300]):
                    callers.start_soon(call, k, n)
            pool.close()
        for k, n in enumerate([1, 0, 500, 33, 64, 2, 300]):
            assert results[k] == [i * i for i in range(k * 1000, k * 1000 + n)]
        assert pool.rounds >= 1


async def test_a_large_round_runs_on_both_threads() -> None:
    with trio.fail_after(10):
        pool = CryptoPool(2)
        seen: set[int] = set()
        # Each share waits for the other to start: run one after the other (or both on one
        # thread) they would break the barrier. Without it a share quick enough to finish before
        # the next is handed out lets trio's thread cache reuse one thread, and the test flaked.
        both = threading.Barrier(2, timeout=5)

        def record(items: Sequence[int]) -> list[int]:
            seen.add(threading.get_ident())
            both.wait()
            return list(items)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            assert await pool.map(record, range(4 * MIN_SHARE)) == list(range(4 * MIN_SHARE))
            pool.close()
        assert len(seen) == 2


async def test_an_error_reaches_its_caller_only() -> None:
    with trio.fail_after(10):
        pool = CryptoPool(2)

        def boom(items: Sequence[int]) -> list[int]:
            raise ValueError("broken job")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            with pytest.raises(ValueError, match="broken job"):
                await pool.map(boom, [1, 2, 3])
            assert await pool.map(_square, [3]) == [9]  # the pool goes on
            pool.close()
        with pytest.raises(trio.ClosedResourceError):
            await pool.map(_square, [1])


def test_shares_cover_every_item_once_in_order() -> None:
    jobs = [_Job(_square, list(range(n))) for n in (5, 100, 0, 41)]
    for threads in (1, 2, 3):
        shares = _shares(jobs, threads)
        assert len(shares) <= threads
        covered = [(id(j), i) for share in shares for j, s, e in share for i in range(s, e)]
        assert covered == [(id(j), i) for j in jobs for i in range(len(j.items))]


async def test_a_small_job_runs_on_the_loop_only_while_the_pool_is_idle() -> None:
    with trio.fail_after(10):
        pool = CryptoPool(2)
        loop_thread = threading.get_ident()
        holding, release = threading.Event(), threading.Event()

        def where(items: Sequence[int]) -> list[int]:
            return [threading.get_ident() for _ in items]

        def hold(items: Sequence[int]) -> list[int]:
            holding.set()
            release.wait(5)
            return list(items)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            assert await pool.map(where, [0], small=True) == [loop_thread]
            assert await pool.map(where, [0]) != [loop_thread]  # not small: a round
            nursery.start_soon(pool.map, hold, [0])
            await trio.to_thread.run_sync(holding.wait, 5)
            got: list[int] = []
            answered = trio.Event()

            async def small_while_busy() -> None:
                got.extend(await pool.map(where, [0], small=True))
                answered.set()

            nursery.start_soon(small_while_busy)
            await trio.sleep(0.1)
            assert not got  # queued behind the held round, not run on the loop
            release.set()
            await answered.wait()
            pool.close()
        assert got != [loop_thread]
        with pytest.raises(trio.ClosedResourceError):  # closed: not even on the loop
            await pool.map(where, [0], small=True)


async def test_a_flood_of_small_jobs_reaches_the_threads_after_the_inline_budget() -> None:
    """Small jobs run on the loop never make the pool busy: a flood of them (a hundred collabs
    appending an event each) must still reach the threads instead of taking the whole loop.
    Old code: every one ran on the loop, and the pool never ran a round."""
    with trio.fail_after(10):
        pool = CryptoPool(2)
        loop_thread = threading.get_ident()

        def where(items: Sequence[int]) -> list[int]:
            return [threading.get_ident() for _ in items]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            ran = [await pool.map(where, [0], small=True) for _ in range(4 * INLINE_BUDGET)]
            pool.close()
        on_loop = sum(r == [loop_thread] for r in ran)
        assert pool.rounds >= 3, "a flood of small jobs never reached the crypto threads"
        # Between two rounds at most INLINE_BUDGET items ran on the loop.
        assert on_loop <= INLINE_BUDGET * (pool.rounds + 1)
        assert on_loop >= INLINE_BUDGET  # the first ones, on an idle pool, did run there
