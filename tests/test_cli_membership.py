"""Issue 4's "done when", through the `cozy` command as people would type it.

Alice creates a collab, adds Bob and Carol, all three read; Alice DMs Bob (Carol's tail shows
only that Alice wrote Bob something, withheld); Alice removes Carol; new posts are readable by Alice and Bob
and not by Carol; the relay's projections rebuild to the same state.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from tests.cli_harness import cli_signup, client_env, cozy

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay


def _lines(out: bytes) -> list[list[str]]:
    return [line.split("\t") for line in out.decode().splitlines()]


@pytest.mark.objective("SO-7")
async def test_create_add_dm_remove_and_the_removed_member_reads_nothing_new(
    relay: Relay, tmp_path: Path, database_url: str
) -> None:
    env = {name: client_env(tmp_path / name) for name in ("alice", "bob", "carol")}
    for name in env:
        await cli_signup(relay.url, tmp_path / name, name)
    collab = (await cozy("collab", "create", "plans", env=env["alice"])).stdout.decode().strip()
    added = await cozy("collab", "add", collab, "bob", "--role", "manager", env=env["alice"])
    assert b"added bob as manager" in added.stdout
    assert b"fingerprint" in added.stdout
    await cozy("collab", "add", collab, "carol", env=env["alice"])
    await cozy("post", collab, "hello all", env=env["alice"])
    for name in env:
        tail = [line[1:] for line in _lines((await cozy("tail", collab, env=env[name])).stdout)]
        assert ["alice", "hello all"] in tail, name
        assert ["alice", "[collab named 'plans']"] in tail, name  # epoch 0, before they joined
    members = _lines((await cozy("collab", "members", collab, env=env["carol"])).stdout)
    assert sorted(m[:2] for m in members[1:]) == [
        ["alice", "owner"], ["bob", "manager"], ["carol", "member"]
    ]  # fmt: skip
    # A direct message: Bob reads it, Carol's relay withholds it and her tail says so.
    await cozy("dm", collab, "bob", "the surprise is on friday", env=env["alice"])
    bob_tail = (await cozy("tail", collab, env=env["bob"])).stdout
    assert b"(DM to bob) the surprise is on friday" in bob_tail
    carol_tail = (await cozy("tail", collab, env=env["carol"])).stdout
    assert b"friday" not in carol_tail
    assert b"withheld" in carol_tail
    # Alice removes Carol: the key rotates; Alice and Bob read on, Carol reads nothing new.
    removed = await cozy("collab", "remove", collab, "carol", env=env["alice"])
    assert b"rotated to epoch 1" in removed.stdout
    await cozy("post", collab, "carol has left", env=env["alice"])
    await cozy("post", collab, "noted", env=env["bob"])
    for name in ("alice", "bob"):
        tail = [line[1:] for line in _lines((await cozy("tail", collab, env=env[name])).stdout)]
        assert ["alice", "carol has left"] in tail
        assert ["bob", "noted"] in tail
        assert ["alice", "[removed carol; key rotated to epoch 1]"] in tail
    refused = await cozy("tail", collab, env=env["carol"], check=False)
    assert refused.returncode == 1
    assert b"not a member" in refused.stderr
    assert b"carol has left" not in refused.stdout
    posted = await cozy("post", collab, "let me back", env=env["carol"], check=False)
    assert posted.returncode == 1
    # The projections the relay keeps agree with the ledger's management events.
    ops = dict(os.environ, DATABASE_URL=database_url, COZY_DATA_DIR=str(tmp_path / "ops"))
    rebuilt = await cozy("relay", "rebuild-projections", env=ops)
    assert b"0 projection(s) differed" in rebuilt.stdout
