"""A fault in one collab stays in that collab (issue 14, "Failure is contained", bug 1).

A real relay in this process, real clients over WebSockets. Each test breaks one collab — an
exception injected into one stage of its sequencer, a management write whose COMMIT is cut, a
commit held in doubt — and shows that the relay stays up, another collab's appends and live
delivery go on, and the broken collab works again on its next append. These are reliability
tests (availability), not proofs of a security objective, so they carry no objective mark.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from clientkit import RelayOverloaded, _collab
from ledger import Ledger
from model import wire
from model.envelope import event_id
from model.membership import Member, MemberKind, Role
from relay import _sequencer, _verifying
from relay._checkpoints import CollabTrees
from relay._writer import LedgerWriter
from tests.fault_harness import CuttingProxy
from tests.relay_harness import relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from clientkit import Client
    from model.envelope import SignedEvent
    from relay._server import Relay
    from tests.relay_harness import User


async def _next_event(frames: trio.MemoryReceiveChannel[wire.Reply]) -> wire.Event:
    async for frame in frames:
        if isinstance(frame, wire.Event):
            return frame
    raise AssertionError("the subscription ended")


async def _caught_up(frames: trio.MemoryReceiveChannel[wire.Reply]) -> None:
    async for frame in frames:
        if isinstance(frame, wire.CaughtUp):
            return
    raise AssertionError("the subscription ended")


async def _bystander_works(
    client: Client, user: User, frames: trio.MemoryReceiveChannel[wire.Reply], text: str
) -> None:
    """Another collab: an append is acked and delivered live to its open subscription."""
    event = user.event(text)
    ack = await client.append(event, retry_for=0)
    pushed = await _next_event(frames)
    assert (pushed.seq, pushed.event) == (ack.seq, event)


def _inject(monkeypatch: pytest.MonkeyPatch, stage: str, victim: str) -> list[str]:
    """Make `stage` raise once, for the `victim` collab only. Returns the list of hits."""
    hits: list[str] = []

    def boom() -> None:
        hits.append(stage)
        raise RuntimeError(f"injected fault in the {stage} stage")

    if stage == "verify":
        verify = _verifying.verdicts

        def fake_verify(batch: Sequence[_sequencer.Submission], held: Sequence[bool]) -> list[Any]:
            if not hits and batch[0].body.collab_id == victim:
                boom()
            return verify(batch, held)

        monkeypatch.setattr(_verifying, "verdicts", fake_verify)
    elif stage == "write":
        write = LedgerWriter.write

        async def fake_write(self: LedgerWriter, request: Any, *rest: Any) -> Any:
            if not hits and request.collab_id == victim:
                boom()
            return await write(self, request, *rest)

        monkeypatch.setattr(LedgerWriter, "write", fake_write)
    elif stage == "ack":
        receipts = CollabTrees.group_receipts

        def fake_receipts(self: CollabTrees, jobs: Any) -> Any:
            if not hits and any(group.collab_id == victim for group, _ in jobs):
                boom()
            return receipts(self, jobs)

        monkeypatch.setattr(CollabTrees, "group_receipts", fake_receipts)
    elif stage == "writer-thread":
        append = Ledger.append_batches

        def fake_append(self: Ledger, requests: Any) -> Any:
            if not hits and any(r.collab_id == victim for r in requests):
                boom()
            return append(self, requests)

        monkeypatch.setattr(Ledger, "append_batches", fake_append)
    else:
        raise AssertionError(stage)
    return hits


@pytest.mark.parametrize("stage", ["verify", "write", "ack", "writer-thread"])
async def test_an_exception_in_one_sequencer_stage_stays_in_its_collab(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Old code: the exception left the actor's nursery, then the sequencers nursery, and the
    relay ended for every collab (the client saw its connection drop; the test the relay's
    RuntimeError). Now the faulted collab's author gets a retryable `overloaded`, the other
    collab goes on (append + live delivery), and the faulted collab's next append works."""
    alice, bob = await sign_up(relay.url), await sign_up(relay.url)
    with trio.fail_after(60):
        async with (
            session(relay.url, alice) as a,
            session(relay.url, bob) as b,
            b.subscribe(bob.collab_id) as bob_frames,
        ):
            await _caught_up(bob_frames)
            await a.append(alice.event("before"), retry_for=0)  # alice's actor is running
            await _bystander_works(b, bob, bob_frames, "before")

            hits = _inject(monkeypatch, stage, alice.collab_id)
            first, second = alice.event("one"), alice.event("two")
            with pytest.raises(RelayOverloaded) as refused:
                await a.append_many([first, second], retry_for=0)
            assert hits == [stage]
            assert refused.value.pending == 2  # both answered, with a retryable error

            await _bystander_works(b, bob, bob_frames, "after")
            acks = await a.append_many([first, second], retry_for=0)  # the same signed bytes
            assert [x.event_id for x in acks] == [event_id(first), event_id(second)]
            assert acks[1].seq == acks[0].seq + 1
            if stage == "ack":  # committed before the ack failed: the retry finds them stored
                assert all(x.duplicate for x in acks)
            else:  # the fault came before the commit: nothing was stored, the retry stores
                assert not any(x.duplicate for x in acks)
            await a.append(alice.event("later"), retry_for=0)
            await _bystander_works(b, bob, bob_frames, "later")
    stats = relay.statistics()
    assert stats.sequencer_failures == (0 if stage == "writer-thread" else 1)


async def _proxy(database_url: str, nursery: trio.Nursery) -> CuttingProxy:
    """A loopback proxy to the test's database that can cut or hold a COMMIT."""
    proxy = CuttingProxy(database_url)
    await nursery.start(proxy.serve)
    return proxy


async def test_a_failed_management_write_fails_the_rest_of_its_batch_not_the_relay(
    database_url: str, tmp_path: Path
) -> None:
    """Bug 1. A management change and a content event arrive in one batch (one `Batch` frame)
    and the change's COMMIT never reaches Postgres (the connection is cut instead). Old code
    (310d841): the sequencer went on with `head = None`, the content event hit
    `assert self._head is not None`, and the AssertionError ended the relay. Now the content
    event is refused with `overloaded` after the change (in order), the relay stays up for
    the other collab, and resending both stores both."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            proxy = await _proxy(database_url, nursery)
            config = relay_config(proxy.url(), tmp_path / "relay")
            async with running_relay(config) as relay:
                alice, bob, carol = [await sign_up(relay.url) for _ in range(3)]
                async with (
                    session(relay.url, alice) as a,
                    session(relay.url, carol) as c,
                    c.subscribe(carol.collab_id) as carol_frames,
                ):
                    await _caught_up(carol_frames)
                    info = await a.lookup(bob.handle)
                    bob_member = Member(
                        info.account_id, Role.MEMBER, MemberKind.HUMAN, info.sign_pk, info.box_pk
                    )
                    view = await a.read(alice.collab_id, alice.box_key)
                    change = _collab.proposal(
                        view, alice.signing_key, _collab.add(view, bob_member), 1_700_000_000_000
                    )
                    content = alice.event("right behind the change")

                    proxy.arm("instead_of_commit")  # the change's transaction is the next one
                    with pytest.raises(RelayOverloaded) as refused:
                        await a.append_many([change, content], retry_for=0)
                    assert proxy.cuts == 1
                    assert refused.value.pending == 2  # the change and the content behind it

                    await _bystander_works(c, carol, carol_frames, "unaffected")
                    acks = await a.append_many([change, content], retry_for=0)
                    assert [x.seq for x in acks] == [view.head.seq + 1, view.head.seq + 2]
                    assert not any(x.duplicate for x in acks)
                    after = await a.read(alice.collab_id, alice.box_key)
                    assert after.membership is not None
                    assert info.account_id in after.membership.members
            nursery.cancel_scope.cancel()


async def test_a_commit_in_doubt_on_one_collab_does_not_stall_another(
    database_url: str, tmp_path: Path
) -> None:
    """Writer liveness. Alice's group commit is held in doubt (the proxy holds its COMMIT and
    the writer thread waits for a reply). Old code: the single writer thread was blocked, so
    Bob's append in another collab waited until Alice's commit resolved (here: the test gave
    up after 30 s with Alice's commit still held). Now the writer stops waiting after
    `writer_stall_ms` and writes Bob's group beside it; Alice's append is acked once her
    commit goes through."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            proxy = await _proxy(database_url, nursery)
            config = relay_config(proxy.url(), tmp_path / "relay")
            async with running_relay(config) as relay:
                alice, bob = await sign_up(relay.url), await sign_up(relay.url)
                async with (
                    session(relay.url, alice) as a,
                    session(relay.url, bob) as b,
                    b.subscribe(bob.collab_id) as bob_frames,
                ):
                    await _caught_up(bob_frames)
                    await _bystander_works(b, bob, bob_frames, "warm")
                    alice_acks: list[wire.Appended] = []
                    alice_done = trio.Event()

                    async def alice_appends(event: SignedEvent) -> None:
                        alice_acks.append(await a.append(event, retry_for=0))
                        alice_done.set()

                    proxy.arm("hold_commit")
                    held = alice.event("held in doubt")
                    nursery.start_soon(alice_appends, held)
                    await proxy.wait_cut()  # Alice's COMMIT is held: its outcome is unknown
                    try:
                        with trio.move_on_after(30) as waited:
                            await _bystander_works(b, bob, bob_frames, "while alice is in doubt")
                        assert not waited.cancelled_caught, (
                            "another collab's append waited for a commit in doubt"
                        )
                        assert not alice_acks  # still held: Bob did not wait for it
                    finally:
                        proxy.release()
                    await alice_done.wait()
                    assert alice_acks[0].event_id == event_id(held)
                    assert not alice_acks[0].duplicate
                    await _bystander_works(b, bob, bob_frames, "after")
                assert relay.statistics().writer_stalled_groups >= 1
            nursery.cancel_scope.cancel()
