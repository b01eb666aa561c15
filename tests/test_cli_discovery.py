"""Finding your way with `cozy` as a new user does: who am I (before anyone added me), which
collabs am I in, the `--json` of every listing, and where an agent's credentials go. Real `cozy`
processes against a real relay and Postgres."""

from __future__ import annotations

import json
import stat
from typing import TYPE_CHECKING

import pytest

from tests.cli_harness import cli_signup, client_env, cozy

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay


async def _json(*args: str, env: dict[str, str]) -> object:
    return json.loads((await cozy(*args, "--json", env=env)).stdout)


async def test_a_new_account_shows_its_fingerprint_before_any_collab_and_lists_its_collabs(
    relay: Relay, tmp_path: Path
) -> None:
    alice, bob = client_env(tmp_path / "alice"), client_env(tmp_path / "bob")
    await cli_signup(relay.url, tmp_path / "alice", "alice")
    await cli_signup(relay.url, tmp_path / "bob", "bob")
    # bob, in no collab yet, reads out his fingerprint ...
    shown = await _json("account", "show", env=bob)
    assert isinstance(shown, dict)
    assert shown.keys() >= {"handle", "kind", "account_id", "fingerprint", "relay"}
    assert (shown["handle"], shown["kind"]) == ("bob", "human")
    assert shown["account_id"].startswith("a_")
    text = (await cozy("account", "show", env=bob)).stdout.decode()
    assert f"fingerprint  {shown['fingerprint']}" in text
    assert await _json("collab", "list", env=bob) == []
    none_yet = await cozy("collab", "list", env=bob)
    assert none_yet.stdout == b""
    assert b"cozy collab create" in none_yet.stderr
    # ... and it is the one alice sees when she adds him.
    collab = (await cozy("collab", "create", "ops room", env=alice)).stdout.decode().strip()
    await cozy("post", collab, "before bob", env=alice)
    added = (await cozy("collab", "add", collab, "bob", env=alice)).stdout.decode()
    assert shown["fingerprint"] in added
    # Each lists the collab from their own verified read, bob with the name set before he
    # joined (its key reached him with his addition, after the name).
    mine = await _json("collab", "list", env=alice)
    theirs = await _json("collab", "list", env=bob)
    assert isinstance(mine, list)
    assert isinstance(theirs, list)
    assert [(r["collab_id"], r["name"], r["role"], r["members"]) for r in mine] == [
        (collab, "ops room", "owner", 2)
    ]
    assert [(r["collab_id"], r["name"], r["role"], r["members"]) for r in theirs] == [
        (collab, "ops room", "member", 2)
    ]
    assert mine[0]["listed_by_relay"] is True
    assert mine[0]["head"] == theirs[0]["head"]
    verified = (await cozy("verify", collab, env=bob)).stdout.decode()
    assert f"head {theirs[0]['head']}" in verified
    table = (await cozy("collab", "list", env=bob)).stdout.decode().splitlines()
    assert table[0].split() == ["COLLAB", "NAME", "ROLE", "MEMBERS", "HEAD"]
    assert table[1].split() == [collab, "ops", "room", "member", "2", theirs[0]["head"]]


@pytest.mark.objective("SO-2")
async def test_agent_credentials_go_to_a_private_folder_in_cozy_home_and_listings_speak_json(
    relay: Relay, tmp_path: Path
) -> None:
    """`agent create` without --out writes COZY_HOME/agents/NAME.cozy-agent (0600, in a 0700
    folder), never the current directory, which is the repository when following the docs."""
    home = tmp_path / "alice"
    alice = client_env(home)
    await cli_signup(relay.url, home, "alice")
    collab = (await cozy("collab", "create", "ops", env=alice)).stdout.decode().strip()
    checkout = tmp_path / "checkout"  # where a person following the docs runs it
    checkout.mkdir()
    made = await cozy("agent", "create", collab, "helper", "--cap", "read", env=alice, cwd=checkout)
    creds = home / "agents" / "helper.cozy-agent"
    assert str(creds).encode() in made.stdout
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.parent.stat().st_mode) == 0o700
    assert not list(checkout.iterdir())
    again = await cozy("agent", "create", collab, "helper", env=alice, check=False)
    assert again.returncode == 1
    assert b"exists" in again.stderr
    # The listings, as JSON with stable field names.
    agents = await _json("account", "agents", env=alice)
    assert isinstance(agents, list)
    assert [(a["handle"], a["revoked"]) for a in agents] == [("helper", False)]
    assert agents[0].keys() == {"handle", "account_id", "created_at", "revoked"}
    members = await _json("collab", "members", collab, env=alice)
    assert isinstance(members, dict)
    assert (members["collab_id"], members["epoch"]) == (collab, 0)
    assert sorted((m["handle"], m["role"], m["kind"], m["caps"]) for m in members["members"]) == [
        ("alice", "owner", "human", []),
        ("helper", "member", "agent", ["read"]),
    ]
    await cozy("post", collab, "hello\tthere", env=alice)
    tail = (await cozy("tail", collab, "--json", env=alice)).stdout.decode().splitlines()
    events = [json.loads(line) for line in tail]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert (events[-1]["author"], events[-1]["text"], events[-1]["kind"]) == (
        "alice",
        "hello\tthere",
        "msg",
    )
    assert events[0]["summary"] == "[created the collab]"
