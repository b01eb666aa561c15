"""Durability under faults (SPEC §9): acknowledged means durable, seq stays 1..N, resume is exact.

Each scenario runs the relay as its own process on a Postgres the test owns, with several
authors pipelining appends and one member following the collab live, then breaks something for
real: SIGKILL of the relay, a crash-stop of Postgres, the relay's database connections killed
mid-commit, the relay frozen with SIGSTOP. After each fault the ledger is read directly: every
acked event is stored at the seq its ack named, seq is contiguous with no id twice; then the
authors resend everything they hold no ack for and each event resolves exactly once (those that
had landed get their stored seq back); the follower has seen 1..N exactly once; verify-ledger
passes.
"""

from __future__ import annotations

import random
import signal
from typing import TYPE_CHECKING

import psycopg
import trio
import trio_websocket

from clientkit import ConnectionLost, RelayRefused, _collab
from model import wire
from tests.fault_harness import (
    RELAY_APP_NAME,
    Author,
    CuttingProxy,
    Follower,
    OwnedPostgres,
    RelayProcess,
    check_acked_are_stored,
    check_exactly_once,
    fault_stack,
    retry_unacked,
    team,
    team_with_follower,
    under_load,
    verify_ledger,
    wait_for_follower,
)
from tests.relay_harness import session

if TYPE_CHECKING:
    from pathlib import Path

AUTHORS = 4


async def test_acked_events_survive_kill_9_of_the_relay_three_times(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with fault_stack(tmp_path) as (pg, relay), trio.open_nursery() as nursery:
            db = pg.database_url()
            authors, follower = await team_with_follower(relay.url, AUTHORS, nursery)
            for _round in range(3):
                async with under_load(relay.url, authors):
                    await authors[0].acks.grow(200)
                    await trio.sleep(random.uniform(0.0, 0.3))
                    await relay.kill9()
                where = await check_acked_are_stored(db, authors)
                await relay.start()
                await retry_unacked(relay.url, authors, where)
                where = await check_exactly_once(db, authors, preamble=AUTHORS)
            await wait_for_follower(follower, len(where))
            assert follower.connections >= 4  # it really resumed after each kill
            await trio.to_thread.run_sync(verify_ledger, db)
            nursery.cancel_scope.cancel()


async def test_acked_events_survive_a_postgres_crash_stop_and_the_relay_recovers(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with fault_stack(tmp_path) as (pg, relay), trio.open_nursery() as nursery:
            authors, follower = await team_with_follower(relay.url, AUTHORS, nursery)
            async with under_load(relay.url, authors):
                await authors[0].acks.grow(200)
                await trio.to_thread.run_sync(pg.stop_immediate)
                down_at = trio.current_time()
                await trio.sleep(2)
                # Postgres takes connections before `pg_ctl start -w` returns (it polls), so
                # the window where nothing can commit ends when the start begins.
                starting_at = trio.current_time()
                await trio.to_thread.run_sync(pg.start)
                with trio.fail_after(30):  # the relay's pool reconnects by itself
                    await authors[0].acks.grow(200)
            # While Postgres was down nothing could commit, so nothing may have been acked
            # (after a grace for acks of commits that finished just before the stop).
            assert _acks_between(authors, down_at + 0.5, starting_at) == 0
            refusals = {code for a in authors for code in a.refusals}
            assert refusals == {"overloaded"}  # refused with a typed error, told to retry
            await _check_after_fault(relay.url, pg.database_url(), authors, follower)
            nursery.cancel_scope.cancel()


async def test_rotations_under_a_postgres_crash_stop_each_apply_exactly_once(
    tmp_path: Path,
) -> None:
    """The owner rotates the collab key in a loop while Postgres is crash-stopped and
    restarted, then while the relay is killed with SIGKILL three times (some kills land between
    a rotation's commit and its ack). A rotation whose outcome was lost is resent as the same
    signed proof (never made afresh), so every acked rotation applied once and no other did:
    the epoch equals the acked rotations, and the owner's client verifies the whole history
    without an alarm."""
    with trio.fail_after(150):
        async with fault_stack(tmp_path) as (pg, relay):
            owner, _ = await team(relay.url, 2)
            acked = 0
            progress = trio.Condition()
            stop = trio.Event()

            async def rotate_until_stopped() -> None:
                nonlocal acked
                pending = None
                while not stop.is_set():
                    try:
                        async with session(relay.url, owner) as client:
                            while not stop.is_set():
                                await client.manage(
                                    owner.signing_key,
                                    owner.box_key,
                                    owner.collab_id,
                                    _collab.rotate,
                                    resend=pending,
                                )
                                pending = None
                                async with progress:
                                    acked += 1
                                    progress.notify_all()
                    except ConnectionLost as exc:
                        pending = exc.unacked or pending
                    except (OSError, trio_websocket.HandshakeError):
                        pass  # the relay is down: try again shortly
                    except RelayRefused as exc:  # refused: known not stored, made afresh
                        assert exc.code is wire.ErrorCode.OVERLOADED, exc
                        pending = None
                    await trio.sleep(0.1)

            async def rotations(at_least: int) -> None:
                async with progress:
                    while acked < at_least:
                        await progress.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(rotate_until_stopped)
                await rotations(3)
                await trio.to_thread.run_sync(pg.stop_immediate)
                await trio.sleep(2)
                await trio.to_thread.run_sync(pg.start)
                with trio.fail_after(60):  # the relay's pool reconnects by itself
                    await rotations(acked + 3)
                for _round in range(3):
                    await trio.sleep(random.uniform(0.0, 0.2))
                    await relay.kill9()
                    await relay.start()
                    with trio.fail_after(60):
                        await rotations(acked + 2)
                stop.set()
            async with session(relay.url, owner) as client:
                view = await client.read(owner.collab_id, owner.box_key)  # verifies everything
            assert view.membership is not None
            assert view.membership.epoch == acked, "a rotation applied twice, or one was lost"
            await trio.to_thread.run_sync(verify_ledger, pg.database_url())


async def test_killing_the_relays_database_connections_mid_commit_loses_no_acked_event(
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with fault_stack(tmp_path) as (pg, relay), trio.open_nursery() as nursery:
            authors, follower = await team_with_follower(relay.url, AUTHORS, nursery)
            killed = 0
            with psycopg.connect(pg.database_url(), autocommit=True) as admin:
                async with under_load(relay.url, authors):
                    await authors[0].acks.grow(100)
                    for _ in range(15):
                        killed += await trio.to_thread.run_sync(_terminate_relay_backends, admin)
                        await trio.sleep(random.uniform(0.05, 0.25))
                    with trio.fail_after(20):  # and it goes on appending afterwards
                        await authors[0].acks.grow(100)
            assert killed >= 15  # the faults were real: the relay's sessions were terminated
            assert {code for a in authors for code in a.refusals} <= {"overloaded"}
            await _check_after_fault(relay.url, pg.database_url(), authors, follower)
            nursery.cancel_scope.cancel()


def _terminate_relay_backends(admin: psycopg.Connection[tuple[object, ...]]) -> int:
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (RELAY_APP_NAME,),
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


async def test_a_lost_commit_reply_is_settled_never_guessed(tmp_path: Path) -> None:
    """The relay's database connections go through a proxy that cuts them at COMMIT: after
    forwarding it (committed, reply lost: the batch must still be acked, so no refusal at all)
    and instead of forwarding it (rolled back: it must be refused, never acked)."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            pg = await trio.to_thread.run_sync(OwnedPostgres, tmp_path / "pg")
            try:
                proxy = CuttingProxy(pg.url)
                await nursery.start(proxy.serve)
                relay = RelayProcess(proxy.url(application_name=RELAY_APP_NAME), tmp_path / "r")
                await relay.start()
                try:
                    await _cut_commits(relay, proxy, pg.database_url())
                finally:
                    await relay.stop()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(pg.close)
            nursery.cancel_scope.cancel()


async def _cut_commits(relay: RelayProcess, proxy: CuttingProxy, db: str) -> None:
    async with trio.open_nursery() as nursery:
        authors, follower = await team_with_follower(relay.url, AUTHORS, nursery)
        async with under_load(relay.url, authors):
            await authors[0].acks.grow(100)
            for _ in range(6):
                proxy.arm("after_commit")
                await proxy.wait_cut()
                await trio.sleep(random.uniform(0.05, 0.2))
            await authors[0].acks.grow(100)
        # Every lost reply was settled as committed and acked: nothing was refused.
        assert not any(a.refusals for a in authors)
        where = await check_acked_are_stored(db, authors)
        assert not await retry_unacked(relay.url, authors, where)  # nothing left unacked
        async with under_load(relay.url, authors):
            await authors[0].acks.grow(100)
            for _ in range(6):
                proxy.arm("instead_of_commit")
                await proxy.wait_cut()
                await trio.sleep(random.uniform(0.05, 0.2))
            await authors[0].acks.grow(100)
        assert proxy.cuts == 12
        # Each rolled-back batch was refused (typed, retryable) and none of it acked.
        assert {code for a in authors for code in a.refusals} == {"overloaded"}
        await _check_after_fault(relay.url, db, authors, follower)
        nursery.cancel_scope.cancel()


async def test_a_relay_frozen_with_sigstop_resumes_where_it_was(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with fault_stack(tmp_path) as (pg, relay), trio.open_nursery() as nursery:
            authors, follower = await team_with_follower(relay.url, AUTHORS, nursery)
            async with under_load(relay.url, authors):
                await authors[0].acks.grow(200)
                relay.send_signal(signal.SIGSTOP)
                stopped_at = trio.current_time()
                await trio.sleep(3)  # clients wait: their appends are in flight, unanswered
                relay.send_signal(signal.SIGCONT)
                continued_at = trio.current_time()
                with trio.fail_after(20):
                    await authors[0].acks.grow(200)
            assert _acks_between(authors, stopped_at + 0.5, continued_at) == 0  # really frozen
            assert not any(a.refusals for a in authors)  # a pause alone refuses nothing
            await _check_after_fault(relay.url, pg.database_url(), authors, follower)
            nursery.cancel_scope.cancel()


def _acks_between(authors: list[Author], start: float, end: float) -> int:
    return sum(1 for a in authors for t in a.ack_times if start <= t <= end)


async def _check_after_fault(
    relay_url: str, db: str, authors: list[Author], follower: Follower
) -> None:
    """Acked events are stored; every unacked one resolves exactly once on retry; the
    follower saw 1..N once each; verify-ledger passes."""
    where = await check_acked_are_stored(db, authors)
    await retry_unacked(relay_url, authors, where)
    where = await check_exactly_once(db, authors, preamble=AUTHORS)
    await wait_for_follower(follower, len(where))
    await trio.to_thread.run_sync(verify_ledger, db)
