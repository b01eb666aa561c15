"""Withholding the newest events from every member (issue 16, "Done when"; docs/ordering.md).

Real relay, real `cozy witness serve` processes it submits to, the real client kit; lies come
from `clientkit.testing.LyingRelay` holding the relay's own key. The two halves:

- members: in a collab with a witness policy, freshness is measured from the witnesses' dates;
  the relay re-submits an unchanged head so honest heads stay fresh, and a witness that saw a
  larger tree refuses to date the old one again, so a follower shown a frozen head reports
  `StaleView` within its bound (on the relay's own dates it never would);
- the author: the only one who knows of an acked event. A post in a witnessed collab is not
  reported published until a head the quorum cosigned includes it, and a read that ends before
  one of this device's receipts is an alarm, signed checkpoint or not.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest
import trio

from clientkit import (
    ClientError,
    ForkDetected,
    IntegrityAlarm,
    PostUnconfirmed,
    QuorumNotMet,
    StaleView,
    WithholdingDetected,
)
from clientkit import _quorum as quorum
from clientkit.errors import WitnessConflict
from clientkit.testing import Lie, LyingRelay, Misbehaviour
from model import content as contentmod
from model.checkpoints import CheckpointSigner
from model.note import NoteVerifier
from model.tlog import AddCheckpointRequest
from relay import _witnessing as witnessing_module
from tests import test_witness_quorum as quorum_tests
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import User, post, session, sign_up
from tests.test_overload import wait_until
from tests.test_session import as_session
from tests.test_witness import WitnessProcess
from tests.test_witness_quorum import cosigned, set_policy
from witness.submit import submit_checkpoint

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from clientkit import Client
    from model.view import CollabView
    from relay._server import Relay

# Heartbeats every 300 ms; the relay refreshes a read collab's cosignatures every 100 ms.
FAST = {"checkpoint_interval_ms": 300, "witness_interval_ms": 100}


def witnessed_relay(
    database_url: str, tmp_path: Path, **overrides: Any
) -> AbstractAsyncContextManager[tuple[Relay, list[WitnessProcess]]]:
    """The witness-quorum tests' relay and two witnesses, with fast heartbeats."""
    return quorum_tests.witnessed_relay(database_url, tmp_path, **{**FAST, **overrides})


async def witnessed_collab(relay: Relay, witnesses: list[WitnessProcess]) -> tuple[User, int]:
    """Alice's collab under a 2-of-2 policy, with a post; the size both witnesses cosigned."""
    alice = await sign_up(relay.url, "alice")
    await set_policy(relay.url, alice, 2, tuple(w.vkey for w in witnesses))
    async with session(relay.url, alice) as client:
        await post(client, alice, alice.collab_id, "before")
    return alice, await cosigned(relay, alice.collab_id, 2)


async def _stale_after_a_post_the_witnesses_saw(
    relay: Relay, alice: User, size: int, lying: LyingRelay
) -> tuple[Client, int]:
    """Follow alice's collab through `lying` (a 3 s bound) up to `size`, post past it directly,
    wait until both witnesses cosigned the larger tree, then expect `StaleView` within the
    bound and nothing shown past `size`. Returns the follower's client and the head it kept."""
    cid = alice.collab_id
    async with lying.running() as url, session(url, alice) as client:
        client.stale_after = 3.0
        async with client.history(cid, alice.box_key, follow=True) as events:
            with trio.fail_after(60):
                async for _ in events:  # catch up to the head the relay will lie from
                    if events.view.head.seq >= size:
                        break
            shown = events.view.head.seq
            with trio.fail_after(60):
                async with session(relay.url, alice) as other:
                    await post(other, alice, cid, "hidden from the follower")
                grown = await cosigned(relay, cid, 2)  # the witnesses saw the new event
                assert grown > shown
                started = time.time()
                with pytest.raises(StaleView) as caught:
                    async for _ in events:
                        pass
    assert caught.value.age >= 3.0
    assert time.time() - started < 60
    assert events.view.head.seq == shown  # nothing after it was shown
    return client, shown


@pytest.mark.objective("SO-4")
async def test_a_relay_withholding_the_tail_from_every_member_is_a_stale_view_for_each(
    database_url: str, tmp_path: Path
) -> None:
    """The relay keeps showing a follower the head it had, re-signed with fresh dates and the
    witness cosignatures it came with, while new events are stored and shown to the witnesses.
    (Before: the follower measured freshness by the relay's own date and never noticed.)"""
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice, size = await witnessed_collab(relay, witnesses)
        cid = alice.collab_id
        signer = CheckpointSigner(relay.config.relay_name, bytes(relay.relay_key))
        freeze = LyingRelay(relay.url, plan=lambda _n: Misbehaviour(Lie.FREEZE, 1), signer=signer)
        client, frozen = await _stale_after_a_post_the_witnesses_saw(relay, alice, size, freeze)
        # Why the relay cannot do better: each witness cosigned the larger tree and refuses to
        # date the frozen one again.
        held = client.checkpoints.held(relay.relay_pk, cid)
        assert held is not None
        assert held.size == frozen
        again = signer.sign(cid, held.size, held.root, int(time.time()))
        for w in witnesses:
            with pytest.raises(WitnessConflict):
                await submit_checkpoint(
                    w.url,
                    AddCheckpointRequest(held.size, (), again),
                    witness=NoteVerifier.from_vkey(w.vkey),
                )


@pytest.mark.objective("SO-4")
async def test_heads_the_witnesses_cosigned_of_a_history_the_follower_was_not_shown_keep_it_stale(
    database_url: str, tmp_path: Path
) -> None:
    """The relay hides a new event from one follower but not from its witnesses, and passes on
    its real heartbeats: heads of the history that holds the event, dated and cosigned by both
    witnesses. Such a head says nothing about how fresh the follower's own view is. (Before: it
    was taken, with a valid consistency proof from the held head, and renewed the follower's
    freshness, so the follower went on without the event and without a report.)"""
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice, size = await witnessed_collab(relay, witnesses)
        cid = alice.collab_id
        hide = LyingRelay(relay.url, plan=lambda _n: Misbehaviour(Lie.HIDE_LIVE, 1))
        client, shown = await _stale_after_a_post_the_witnesses_saw(relay, alice, size, hide)
        # The relay did send it the cosigned larger head (the device holds it as its top).
        top = client.checkpoints.top(relay.relay_pk, cid)
        assert top is not None
        assert top.size > shown


def _slow_witnesses(monkeypatch: pytest.MonkeyPatch, relay: Relay) -> list[int]:
    """Every witnessing round takes at least 0.4 s (longer than a heartbeat waits for the
    current tree's cosignatures), so while posts keep coming no heartbeat's own head is
    cosigned, however fast this machine is. Returns a list that counts the heartbeats that
    carried a `witnessed` head."""
    real_submit = witnessing_module.submit_checkpoint

    async def slow_submit(*args: Any, **kwargs: Any) -> Any:
        await trio.sleep(0.4)
        return await real_submit(*args, **kwargs)

    monkeypatch.setattr(witnessing_module, "submit_checkpoint", slow_submit)
    carried: list[int] = []
    real_witnessed = relay.trees._witnessed

    def counted(*args: Any) -> tuple[bytes, list[bytes]]:
        out = real_witnessed(*args)
        if out[0]:
            carried.append(1)
        return out

    monkeypatch.setattr(relay.trees, "_witnessed", counted)
    return carried


async def _follow_while_busy(
    relay: Relay, alice: User, url: str, seconds: float
) -> tuple[list[ClientError], int, int]:
    """Follow alice's collab through `url` (a 3 s bound) while another connection posts back to
    back for `seconds`. Returns the `StaleView`s reported (and the alarm that ended the read,
    last), the events posted and the follower's head."""
    cid, reported, posted = alice.collab_id, list[ClientError](), 0
    async with session(url, alice) as client, session(relay.url, alice) as writer:
        client.stale_after = 3.0
        view = await writer.read(cid, alice.box_key)
        epoch, key = view.current_key()

        async def write() -> None:
            nonlocal posted
            # Once the follower has caught up: a read that ends while the tree outruns the
            # witnesses is refused (`QuorumNotMet`, docs/ordering.md), which is not this test.
            await wait_until(lambda: events.caught_up)
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                posted += 1
                now = int(time.time() * 1000)  # one device per event: each stream's first
                await writer.post(
                    signing_key=alice.signing_key,
                    collab_key=key,
                    epoch=epoch,
                    collab_id=cid,
                    content=contentmod.Message(f"busy {posted}"),
                    ts=now,
                    evidence=view.evidence(f"busy-{posted}", now),
                )

        async with client.history(cid, alice.box_key, follow=True) as events:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                with trio.move_on_after(seconds + 2):
                    while True:
                        try:
                            async for _ in events:
                                pass
                        except StaleView as exc:
                            reported.append(exc)
                        except IntegrityAlarm as exc:
                            reported.append(exc)
                            break
                nursery.cancel_scope.cancel()
        return reported, posted, events.view.head.seq


@pytest.mark.objective("SO-4")
async def test_a_collab_busier_than_its_witnesses_keeps_its_followers_fresh(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Posts back to back for 10 s while each witnessing round takes 0.4 s: the tree outruns
    the rounds, so no heartbeat's own head is cosigned. The heartbeat carries the newest head
    they did cosign and the proof that its head extends it; the follower's tree ties them to its
    history. (Before: the follower reported a stale view although nothing was withheld; seen
    with real-speed witnesses too, at ~430 events/s.)"""
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice, _ = await witnessed_collab(relay, witnesses)
        carried = _slow_witnesses(monkeypatch, relay)
        reported, posted, head = await _follow_while_busy(relay, alice, relay.url, 10.0)
    assert len(carried) >= 5, "the witnesses kept up: the test did not test the busy case"
    assert head >= posted
    assert reported == []


@pytest.mark.objective("SO-4")
async def test_a_witnessed_head_the_heartbeat_does_not_extend_is_a_fork(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay bends the proof that a busy heartbeat's head extends the head its witnesses
    cosigned: it would show them one history and this follower another."""
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice, _ = await witnessed_collab(relay, witnesses)
        _slow_witnesses(monkeypatch, relay)
        bend = LyingRelay(relay.url, plan=lambda _n: Misbehaviour(Lie.BEND_WITNESSED, 1))
        async with bend.running() as url:
            reported, _, _ = await _follow_while_busy(relay, alice, url, 10.0)
    assert reported, "the bent proof was never sent or never noticed"
    assert isinstance(reported[-1], ForkDetected)
    assert "witnesses cosigned" in str(reported[-1])


@pytest.mark.objective("SO-4")
async def test_a_witnessed_head_the_witnesses_did_not_cosign_renews_nothing(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay (its own key) replaces a busy heartbeat's `witnessed` head by the same tree
    dated now by itself alone, so the proof still holds: the date is the witnesses' to give,
    and the follower reports a stale view instead of taking the relay's."""
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice, _ = await witnessed_collab(relay, witnesses)
        carried = _slow_witnesses(monkeypatch, relay)
        signer = CheckpointSigner(relay.config.relay_name, bytes(relay.relay_key))
        alone = LyingRelay(
            relay.url, plan=lambda _n: Misbehaviour(Lie.UNWITNESSED, 1), signer=signer
        )
        async with alone.running() as url:
            reported, _, _ = await _follow_while_busy(relay, alice, url, 10.0)
    assert len(carried) >= 5, "the witnesses kept up: no witnessed head to replace"
    assert reported, "a witnessed head without the witnesses' lines kept the follower fresh"
    assert all(isinstance(r, StaleView) for r in reported), reported


@pytest.mark.objective("SO-4")
async def test_honest_heartbeats_reconnects_and_a_witness_restart_keep_a_witnessed_view_fresh(
    database_url: str, tmp_path: Path
) -> None:
    """Nothing is posted for longer than the bound, a witness restarts and the follower
    resubscribes: the relay keeps its cosignatures fresh and nothing is reported. (Before: the
    relay submitted only heads that grew, so an idle witnessed collab's cosignatures aged.)"""
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice, _ = await witnessed_collab(relay, witnesses)
        cid = alice.collab_id
        async with session(relay.url, alice) as client:
            client.stale_after = 6.0
            view: CollabView | None = None
            for leg in range(2):
                async with client.history(cid, alice.box_key, follow=True, view=view) as events:
                    with trio.move_on_after(8.0):  # idle: only heartbeats arrive
                        async for _ in events:
                            pass
                    if leg == 0:  # a witness restarts on the same address and state
                        witnesses[0] = await witnesses[0].restarted()
                        async with session(relay.url, alice) as other:
                            await post(other, alice, cid, "after the restart")
                    view = events.view
            held = client.checkpoints.held(relay.relay_pk, cid)
            assert held is not None
            assert view is not None
            policy = view.membership.witnesses if view.membership else None
            assert policy is not None
            assert time.time() - quorum.witnessed_at(relay.relay_pk, held, policy) < 6.0
            assert held.size == view.head.seq


@pytest.mark.objective("SO-4")
async def test_an_acked_post_no_witness_quorum_confirms_is_not_reported_published(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay stores and acks the post but its witnesses never see it (here: they are
    down), so no other member could ever learn of it. `Session.post` says so instead of
    returning. (Before: the post returned as published.)"""
    monkeypatch.setattr(quorum, "QUORUM_GRACE", 1.0)
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice, size = await witnessed_collab(relay, witnesses)
        cid = alice.collab_id
        async with session(relay.url, alice) as client:
            me = as_session(client, alice, tmp_path / "alice")
            assert (await me.post(cid, "confirmed")).seq == size + 1  # returns once cosigned
            for w in witnesses:
                await w.stop()
            with trio.fail_after(60), pytest.raises(PostUnconfirmed) as caught:
                await me.post(cid, "acked, then shown to nobody")
        assert isinstance(caught.value, QuorumNotMet)
        assert caught.value.seq == size + 2
        assert f"stored your event at seq {size + 2}" in str(caught.value)
        assert "do not post it again" in str(caught.value)
        assert "\n" not in str(caught.value)


@pytest.mark.objective("SO-4")
async def test_a_caught_up_behind_the_devices_own_receipt_is_withholding_even_unsigned(
    relay: Relay, tmp_path: Path
) -> None:
    """The device holds the relay's ack for its event at seq n; the relay then says the
    history ends at n - 1 and drops the optional checkpoint (or backdates it to the ack's
    second), so no signed pair contradicts. (Before: accepted without complaint.)"""
    alice = await sign_up(relay.url, "alice")
    cid = alice.collab_id
    async with session(relay.url, alice) as client:
        me = as_session(client, alice, tmp_path / "alice")
        await me.post(cid, "one")
        acked = (await me.post(cid, "two")).seq  # acked; this device has not read it since
    truncate = Misbehaviour(Lie.TRUNCATE, acked)  # serves 1..acked-1, caught_up unsigned
    async with (
        LyingRelay(relay.url, plan=lambda _n: truncate).running() as url,
        session(url, alice) as client,
    ):
        me = as_session(client, alice, tmp_path / "alice")
        with pytest.raises(WithholdingDetected, match=f"seq {acked}"):
            await me.read(cid)
    async with session(relay.url, alice) as client:  # the honest relay: nothing alarms
        me = as_session(client, alice, tmp_path / "alice")
        assert (await me.read(cid)).head.seq == acked


@pytest.mark.objective("SO-4")
async def test_heads_without_a_checkpoint_in_a_witnessed_collab_are_refused_not_taken(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A downgrade: the relay drops the checkpoint from `caught_up` in a collab with a witness
    policy. Unconfirmed, so refused like a head without the quorum (not an alarm)."""
    monkeypatch.setattr(quorum, "QUORUM_GRACE", 1.0)
    async with witnessed_relay(database_url, tmp_path) as (relay, witnesses):
        alice, _ = await witnessed_collab(relay, witnesses)
        truncate = Misbehaviour(Lie.TRUNCATE, 99)  # all of it, but caught_up without checkpoint
        async with (
            LyingRelay(relay.url, plan=lambda _n: truncate).running() as url,
            session(url, alice) as client,
        ):
            with pytest.raises(QuorumNotMet, match="no signed checkpoint"):
                await client.read(alice.collab_id, alice.box_key)
        async with session(relay.url, alice) as client:  # the honest relay afterwards: taken
            view = await client.read(alice.collab_id, alice.box_key)
            held = client.checkpoints.held(relay.relay_pk, alice.collab_id)
            assert held is not None
            assert held.size == view.head.seq


@pytest.mark.objective("SO-4")
async def test_cozy_post_says_in_one_line_when_no_witness_quorum_confirms_the_post(
    database_url: str, tmp_path: Path
) -> None:
    """`cozy post` in a witnessed collab whose witnesses never see the new head: exit status
    not 0 and one line naming the seq and saying not to post again. (Before: exit 0.)"""
    async with witnessed_relay(database_url, tmp_path) as (_relay, witnesses):
        env = client_env(tmp_path / "alice")
        await cli_signup(_relay.url, tmp_path / "alice", "alice")
        collab = (await cozy("collab", "create", "demo", env=env)).stdout.decode().strip()
        await cozy("collab", "witnesses", collab, *(w.vkey for w in witnesses), env=env)
        await cozy("post", collab, "confirmed", env=env)
        for w in witnesses:
            await w.stop()
        out = await cozy("post", collab, "shown to nobody", env=env, check=False)
    err = out.stderr.decode().strip()
    assert out.returncode != 0, err
    assert len(err.splitlines()) == 1, err
    assert "stored your event at seq" in err
    assert "do not post it again" in err
