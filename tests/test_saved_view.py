"""The fold a device keeps (state.db `views`) speeds reads up without trusting anyone new.

A read resumes from the sealed snapshot of this device's own verified fold, bound to the head
it saved (clientkit/_session.py `resume_view`). What an attacker can try against that
shortcut, and what each attempt gets:

- a relay rolled back behind the snapshot's head: `ForkDetected` (it ends before what this
  device verified);
- a relay serving another history than the one the snapshot was made on: an alarm at the
  first event that does not extend the kept head;
- a snapshot row altered in state.db (a flipped byte, a row moved to another head, one sealed
  by someone else's key): not opened — the device reads from the genesis instead, and gets the
  same verified view.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import nacl.public
import pytest
import trio

from clientkit import ForkDetected, IntegrityAlarm, connect
from clientkit._session import Identity, Keys, Session
from clientkit._state import ClientState
from clientkit.testing import Lie, LyingRelay, Misbehaviour
from model.membership import MemberKind
from tests.collab_sim import Sim
from tests.evil_relay import EvilRelay
from tests.helpers import Person
from tests.relay_harness import session as connection
from tests.test_session import as_session
from tests.test_session import pair as pair  # the fixture

if TYPE_CHECKING:
    from pathlib import Path

    from clientkit import Client
    from model.chain import Head
    from relay._server import Relay
    from tests.relay_harness import User

pytestmark = pytest.mark.usefixtures("database_url")


def _rows(db: Path) -> list[tuple[str, int, bytes, bytes]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT collab_id, seq, chain, sealed FROM views").fetchall()
    finally:
        conn.close()


def _write(db: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(sql, args)
    finally:
        conn.close()


async def _posted_and_read(relay: Relay, alice: User, home: Path, posts: int) -> Head:
    async with connection(relay.url, alice) as client:
        me = as_session(client, alice, home)
        for i in range(posts):
            await me.post(alice.collab_id, f"post {i}")
        return (await me.read(alice.collab_id)).head


@pytest.mark.objective("SO-4")
async def test_a_relay_rolled_back_behind_the_kept_view_is_caught(
    relay: Relay, pair: tuple[User, User], tmp_path: Path
) -> None:
    alice, _ = pair
    cid, home = alice.collab_id, tmp_path / "alice"
    head = await _posted_and_read(relay, alice, home, 3)
    with trio.fail_after(60):
        async with (
            LyingRelay(
                relay.url, plan=lambda _n: Misbehaviour(Lie.TRUNCATE, head.seq)
            ).running() as url,
            connect(url) as client,
        ):
            await client.authenticate(alice.token)
            me = as_session(client, alice, home)
            kept = me.resume_view(cid)
            assert kept is not None
            assert kept.head == head  # the read resumes at the kept head
            with pytest.raises(ForkDetected, match="rolled back"):
                await me.read(cid)
    assert ClientState(home / "state.db").head(cid) == head  # nothing older was saved


@pytest.mark.objective("SO-4")
async def test_a_relay_serving_another_history_than_the_kept_views_is_caught(
    tmp_path: Path,
) -> None:
    """The device verified history A and kept its fold at A's head; the relay now serves B,
    which forks from A before that head and is longer. The read resumes after the kept head,
    and the first event of B there does not extend it."""
    alice = Person()
    sim = Sim(alice)
    sim.post(alice, "one")
    fork_point = (list(sim.events), sim.head, sim.state, dict(sim.keys))
    sim.post(alice, "two, as A")
    sim.post(alice, "three, as A")
    history_a = list(sim.events)
    sim.events, sim.head, sim.state, sim.keys = (
        list(fork_point[0]), fork_point[1], fork_point[2], fork_point[3]
    )  # fmt: skip
    for text in ("two, as B", "three, as B", "four, as B"):
        sim.post(alice, text)
    evil = EvilRelay(sim.collab_id, history_a)
    home = tmp_path / "alice"
    async with trio.open_nursery() as nursery:
        url = await nursery.start(evil.serve)
        async with connect(url) as client:
            await client.authenticate(alice.id)
            me = _sim_session(client, alice, home)
            kept = (await me.read(sim.collab_id)).head
            assert kept.seq == len(history_a)
            evil.events = list(sim.events)  # B, from now on
            assert me.resume_view(sim.collab_id) is not None
            with pytest.raises(IntegrityAlarm):
                await me.read(sim.collab_id)
        nursery.cancel_scope.cancel()
    assert ClientState(home / "state.db").head(sim.collab_id) == kept


def _sim_session(client: Client, person: Person, home: Path) -> Session:
    return Session(
        client,
        Identity(person.id, "alice", MemberKind.HUMAN),
        Keys(person.key, person.box),
        ClientState(home / "state.db"),
        device="laptop",
    )


@pytest.mark.objective("SO-4")
@pytest.mark.parametrize("tamper", ["flip", "moved", "foreign"])
async def test_a_tampered_kept_view_is_not_opened_and_the_read_starts_at_the_genesis(
    relay: Relay, pair: tuple[User, User], tmp_path: Path, tamper: str
) -> None:
    alice, bob = pair
    cid, home = alice.collab_id, tmp_path / "alice"
    head = await _posted_and_read(relay, alice, home, 2)
    db = home / "state.db"
    [(_, seq, chain, sealed)] = _rows(db)
    assert (seq, bytes(chain)) == (head.seq, head.chain)
    if tamper == "flip":  # a damaged or edited row
        broken = bytearray(sealed)
        broken[len(broken) // 2] ^= 1
        _write(db, "UPDATE views SET sealed = ?", bytes(broken))
    elif tamper == "moved":  # the row relabelled as the fold at the seq before (on the path)
        async with connection(relay.url, alice) as client:
            earlier = (await as_session(client, alice, tmp_path / "other").read(cid)).chain_at(
                head.seq - 1
            )
        _write(db, "UPDATE views SET seq = seq - 1, chain = ?", earlier)
    else:  # another account's own sealed view of the same collab put in its place
        async with connection(relay.url, bob) as client:
            bobs = as_session(client, bob, tmp_path / "bob")
            await bobs.read(cid)
        [(_, _, _, theirs)] = _rows(tmp_path / "bob" / "state.db")
        _write(db, "UPDATE views SET sealed = ?", bytes(theirs))
    async with connection(relay.url, alice) as client:
        me = as_session(client, alice, home)
        assert me.resume_view(cid) is None
        view = await me.read(cid)  # from the genesis, verified, the same head
    assert view.head == head
    assert view.is_member
    # A view sealed under another box key of the same account does not open either.
    stranger = as_session(client, alice, home)
    stranger.keys = type(stranger.keys)(alice.signing_key, nacl.public.PrivateKey.generate())
    assert stranger.resume_view(cid) is None
