"""Issue 4's "done when", through the `cozy` command as people would type it.

Alice creates a collab, adds Bob and Carol, all three read; Alice DMs Bob (Carol's tail shows
only that Alice wrote Bob something, withheld); Alice removes Carol; new posts are readable by Alice and Bob
and not by Carol; the relay's projections rebuild to the same state.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, TypeVar

import pytest
import trio

from tests.cli_harness import cli_signup, client_env, cozy

if TYPE_CHECKING:
    from collections.abc import Awaitable
    from pathlib import Path

    from relay._server import Relay


T = TypeVar("T")


def _lines(out: bytes) -> list[list[str]]:
    return [line.split("\t") for line in out.decode().splitlines()]


async def together(*commands: Awaitable[T]) -> list[T]:
    """Run independent commands at once (each its own `cozy` process, as two people in two
    shells would); their results in order."""
    results: list[T | None] = [None] * len(commands)

    async def one(i: int, command: Awaitable[T]) -> None:
        results[i] = await command

    async with trio.open_nursery() as nursery:
        for i, command in enumerate(commands):
            nursery.start_soon(one, i, command)
    return results  # type: ignore[return-value]  # every slot was filled


@pytest.mark.objective("SO-7")
async def test_create_add_dm_remove_and_the_removed_member_reads_nothing_new(
    relay: Relay, tmp_path: Path, database_url: str
) -> None:
    # Commands that do not depend on each other run at once; what one needs of another waits.
    env = {name: client_env(tmp_path / name) for name in ("alice", "bob", "carol")}
    await together(*(cli_signup(relay.url, tmp_path / name, name) for name in env))
    collab = (await cozy("collab", "create", "plans", env=env["alice"])).stdout.decode().strip()
    added = await cozy("collab", "add", collab, "bob", "--role", "manager", env=env["alice"])
    assert b"added bob as manager" in added.stdout
    assert b"fingerprint" in added.stdout
    await cozy("collab", "add", collab, "carol", env=env["alice"])
    await cozy("post", collab, "hello all", env=env["alice"])
    *tails, members_out = await together(
        *(cozy("tail", collab, env=env[name]) for name in env),
        cozy("collab", "members", collab, env=env["carol"]),
    )
    for name, out in zip(env, tails, strict=True):
        tail = [line[1:] for line in _lines(out.stdout)]
        assert ["alice", "hello all"] in tail, name
        assert ["alice", "[collab named 'plans']"] in tail, name  # epoch 0, before they joined
    members = _lines(members_out.stdout)
    assert sorted(m[:2] for m in members[1:]) == [
        ["alice", "owner"], ["bob", "manager"], ["carol", "member"]
    ]  # fmt: skip
    # A direct message: Bob reads it, Carol's relay withholds it and her tail says so.
    await cozy("dm", collab, "bob", "the surprise is on friday", env=env["alice"])
    bob, carol = await together(
        cozy("tail", collab, env=env["bob"]), cozy("tail", collab, env=env["carol"])
    )
    assert b"(DM to bob) the surprise is on friday" in bob.stdout
    assert b"friday" not in carol.stdout
    assert b"withheld" in carol.stdout
    # Alice removes Carol: the key rotates; Alice and Bob read on, Carol reads nothing new.
    removed = await cozy("collab", "remove", collab, "carol", env=env["alice"])
    assert b"rotated to epoch 1" in removed.stdout
    await together(
        cozy("post", collab, "carol has left", env=env["alice"]),
        cozy("post", collab, "noted", env=env["bob"]),
    )
    *tails, refused, posted = await together(
        *(cozy("tail", collab, env=env[name]) for name in ("alice", "bob")),
        cozy("tail", collab, env=env["carol"], check=False),
        cozy("post", collab, "let me back", env=env["carol"], check=False),
    )
    for out in tails:
        tail = [line[1:] for line in _lines(out.stdout)]
        assert ["alice", "carol has left"] in tail
        assert ["bob", "noted"] in tail
        assert ["alice", "[removed carol; key rotated to epoch 1]"] in tail
    assert refused.returncode == 1
    assert b"not a member" in refused.stderr
    assert b"carol has left" not in refused.stdout
    assert posted.returncode == 1
    # The projections the relay keeps agree with the ledger's management events.
    ops = dict(os.environ, DATABASE_URL=database_url, COZY_DATA_DIR=str(tmp_path / "ops"))
    rebuilt = await cozy("relay", "rebuild-projections", env=ops)
    assert b"0 projection(s) differed" in rebuilt.stdout
