"""Every mistake a person makes with `cozy` that the README and docs mention (and the ones people
made trying them): each answered with ONE line that says what to do next, a non-zero exit, and
never a traceback. Each is a real `cozy` child process, as a person runs it.

The cases of one test run concurrently (a few at a time) and every failing case is reported,
not only the first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest
import trio

from clientkit._cli_errors import report
from clientkit._cli_session import CliError
from clientkit._home import Profile
from relay.embedded import free_port
from tests.cli_harness import COZY, cli_signup, client_env, cozy

if TYPE_CHECKING:
    from relay._server import Relay

# What may surround the one error line: progress steps ("[1/4] connecting…", "sealing your
# keystore (Argon2id)…") and the test-only KDF warning every test account triggers.
_NOISE = ("warning: COZY_KDF_PROFILE=insecure-test", "using the ledger of `cozy dev`")


@dataclass
class Mistake:
    """One thing a person gets wrong, and a phrase the answer must hold."""

    what: str
    argv: list[str]
    env: dict[str, str]
    says: str
    cwd: Path | None = None
    exit_code: int | None = None  # when a specific one is documented
    problems: list[str] = field(default_factory=list)


async def _run(m: Mistake, limiter: trio.CapacityLimiter) -> None:
    async with limiter:
        with trio.fail_after(120):
            result = await trio.run_process(
                [*COZY, *m.argv],
                env=m.env,
                cwd=m.cwd,
                stdin=b"",  # never a TTY: nothing may prompt
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    err = result.stderr.decode(errors="replace")
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and not line.endswith("…") and not line.startswith(_NOISE)
    ]
    if result.returncode == 0:
        m.problems.append("exited 0")
    if m.exit_code is not None and result.returncode != m.exit_code:
        m.problems.append(f"exited {result.returncode}, not {m.exit_code}")
    if "Traceback" in err or b"Traceback" in result.stdout:
        m.problems.append("printed a traceback")
    if len(lines) != 1:
        m.problems.append(f"said {len(lines)} lines, not one")
    if m.says not in err:
        m.problems.append(f"did not say {m.says!r}")
    if m.problems:
        m.problems.append(f"stderr was:\n{err}")


async def _check_all(mistakes: list[Mistake]) -> None:
    limiter = trio.CapacityLimiter(3)
    async with trio.open_nursery() as nursery:
        for m in mistakes:
            nursery.start_soon(_run, m, limiter)
    failed = [
        f"{m.what} (cozy {' '.join(m.argv)}): {'; '.join(m.problems)}"
        for m in mistakes
        if m.problems
    ]
    assert not failed, "\n\n".join(failed)


def _home_copy(src: Path, dst: Path, **profile_changes: str) -> Path:
    shutil.copytree(src, dst)
    if profile_changes:
        path = dst / "profile.json"
        profile = msgspec.json.decode(path.read_bytes(), type=Profile)
        path.write_bytes(msgspec.json.encode(msgspec.structs.replace(profile, **profile_changes)))
    return dst


async def test_mistakes_made_without_a_relay_are_one_line_each(
    tmp_path: Path, empty_database_url: str
) -> None:
    env = client_env(tmp_path / "nobody")
    closed = f"127.0.0.1:{free_port()}"
    # A home whose profile is fine and whose keystore is not.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    profile = Profile(relay_url=f"ws://{closed}", handle="dora", account_id="a_x", relay_pk="00")
    (damaged / "profile.json").write_bytes(msgspec.json.encode(profile))
    (damaged / "keystore.bin").write_bytes(b"not a keystore")
    mangled = tmp_path / "mangled"
    mangled.mkdir()
    (mangled / "profile.json").write_bytes(b"{not json")
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01 not a proof")
    elsewhere = tmp_path / "not-a-checkout"
    elsewhere.mkdir()
    server = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "COZY_DATA_DIR")}
    signup = ["account", "signup", "--handle", "dora", "--relay"]
    await _check_all(
        [
            Mistake("no command at all", [], env, "cozy --help", exit_code=2),
            Mistake("a command that does not exist", ["bogus"], env, "invalid choice", exit_code=2),
            Mistake("missing arguments", ["post"], env, "cozy post --help", exit_code=2),
            Mistake(
                "a role that does not exist",
                ["collab", "add", "c_x", "bob", "--role", "king"],
                env,
                "invalid choice",
                exit_code=2,
            ),
            Mistake(
                "--from that is not a number",
                ["tail", "c_x", "--from", "x"],
                env,
                "invalid int value",
                exit_code=2,
            ),
            Mistake("a relay URL without ws://", [*signup, closed], env, f"use ws://{closed}"),
            Mistake(
                "an http:// relay URL", [*signup, f"http://{closed}"], env, f"use ws://{closed}"
            ),
            Mistake(
                "an https:// relay URL", [*signup, f"https://{closed}"], env, f"use wss://{closed}"
            ),
            Mistake(
                "restore with a relay URL without ws://",
                ["account", "restore", "--relay", closed, "--handle", "dora"],
                env,
                f"use ws://{closed}",
            ),
            Mistake(
                "a relay that is not running",
                [*signup, f"ws://{closed}"],
                env,
                "cannot reach the relay",
            ),
            Mistake(
                "a command before signing up", ["post", "c_x", "hi"], env, "cozy account signup"
            ),
            Mistake(
                "a damaged profile.json",
                ["post", "c_x", "hi"],
                client_env(mangled),
                "cozy account restore",
            ),
            Mistake(
                "a damaged keystore.bin",
                ["post", "c_x", "hi"],
                client_env(damaged),
                "cozy account restore",
            ),
            Mistake(
                "account show with a damaged keystore",
                ["account", "show"],
                client_env(damaged),
                "is damaged",
            ),
            Mistake(
                "evidence check of a missing file",
                ["evidence", "check", str(tmp_path / "no")],
                env,
                "No such file",
            ),
            Mistake(
                "evidence check of a file that is not a proof",
                ["evidence", "check", str(garbage)],
                env,
                str(garbage),
            ),
            Mistake(
                "verify-ledger outside a checkout, with no ledger anywhere",
                ["relay", "verify-ledger"],
                server,
                "--data-dir",
                cwd=elsewhere,
            ),
            Mistake(
                "verify-ledger on an empty, never-migrated database",
                ["relay", "verify-ledger"],
                dict(server, DATABASE_URL=empty_database_url),
                "never migrated",
                cwd=elsewhere,
            ),
            Mistake(
                "a bad relay setting",
                ["relay", "verify-ledger"],
                dict(server, DATABASE_URL=empty_database_url, COZY_SESSION_TTL="5"),
                "COZY_SESSION_TTL",
                cwd=elsewhere,
            ),
        ]
    )
    # Refusing created no database (the relay's config still keeps a JWT key in its data dir).
    assert not list(elsewhere.rglob("postgres"))


async def test_mistakes_made_against_a_relay_are_one_line_each(
    relay: Relay, tmp_path: Path, database_url: str
) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    async with trio.open_nursery() as nursery:  # two people signing up at once
        nursery.start_soon(cli_signup, relay.url, alice_home, "alice")
        nursery.start_soon(cli_signup, relay.url, bob_home, "bob")
    alice = client_env(alice_home)
    collab = (await cozy("collab", "create", "ops", env=alice)).stdout.decode().strip()
    await cozy("post", collab, "hello", env=alice)
    taken = tmp_path / "taken.cozy-agent"
    taken.write_bytes(b"")
    hostport = relay.url.removeprefix("ws://")
    moved = _home_copy(alice_home, tmp_path / "moved", relay_url=f"ws://127.0.0.1:{free_port()}")
    impostor = _home_copy(alice_home, tmp_path / "impostor", relay_pk="11" * 32)
    broken_state = _home_copy(alice_home, tmp_path / "broken-state")
    (broken_state / "state.db").write_bytes(b"this is not an SQLite database, not at all")
    for suffix in ("-wal", "-shm"):
        (broken_state / f"state.db{suffix}").unlink(missing_ok=True)
    new = client_env(tmp_path / "new")
    server = dict(alice, DATABASE_URL=database_url, COZY_DATA_DIR=str(tmp_path / "ops"))
    passphrase = alice["COZY_PASSPHRASE"]
    await _check_all(
        [
            Mistake(
                "wss:// for a relay that speaks plain WebSocket",
                ["account", "signup", "--relay", f"wss://{hostport}", "--handle", "dora"],
                new,
                f"does not speak TLS; use ws://{hostport}",
            ),
            Mistake(
                "a handle someone has",
                ["account", "signup", "--relay", relay.url, "--handle", "alice"],
                new,
                "pick another",
            ),
            Mistake(
                "a weak passphrase",
                ["account", "signup", "--relay", relay.url, "--handle", "dora"],
                dict(new, COZY_PASSPHRASE="short"),
                "passphrase",
            ),
            Mistake(
                "the login password as passphrase",
                ["account", "signup", "--relay", relay.url, "--handle", "dora"],
                dict(new, COZY_PASSPHRASE=new["COZY_PASSWORD"]),
                "must differ",
            ),
            Mistake(
                "restore a handle that does not exist",
                ["account", "restore", "--relay", relay.url, "--handle", "nobody-here"],
                new,
                "check the handle",
            ),
            Mistake(
                "restore into a home that has an account",
                ["account", "restore", "--relay", relay.url, "--handle", "alice"],
                alice,
                "empty COZY_HOME",
            ),
            Mistake(
                "recover with a mistyped recovery code",
                ["account", "recover"],
                dict(alice, COZY_RECOVERY_CODE="ABCD-EFGH"),
                "recovery code",
            ),
            Mistake(
                "a wrong login password",
                ["account", "login"],
                client_env(bob_home, COZY_PASSWORD="not the password at all"),
                "check the handle and the login password",
            ),
            Mistake(
                "a wrong passphrase",
                ["post", collab, "hi"],
                dict(alice, COZY_PASSPHRASE="not the passphrase, not at all"),
                "cozy account recover",
            ),
            Mistake(
                "the passphrase as the new login password",
                ["account", "password"],
                dict(alice, COZY_NEW_PASSWORD=passphrase),
                "different secret",
            ),
            Mistake(
                "no passphrase and no terminal to ask for it",
                ["post", "c_x", "hi"],
                dict(alice, COZY_PASSPHRASE=""),
                "set COZY_PASSPHRASE",
            ),
            Mistake("sessions without --end-all", ["account", "sessions"], alice, "--end-all"),
            Mistake(
                "a collab that does not exist",
                ["post", "c_nosuchcollab", "hi"],
                alice,
                "cozy collab list",
            ),
            Mistake(
                "something that is not a collab id",
                ["tail", "not-an-id"],
                alice,
                "cozy collab list",
            ),
            Mistake(
                "add a handle nobody has",
                ["collab", "add", collab, "nobody-here"],
                alice,
                "no account is called",
            ),
            Mistake(
                "a DM to someone outside the collab",
                ["dm", collab, "bob", "hi"],
                alice,
                "not a member",
            ),
            Mistake(
                "grant a capability that does not exist",
                ["collab", "grant", collab, "alice", "fly"],
                alice,
                "tool:NAME",
            ),
            Mistake(
                "remove yourself",
                ["collab", "remove", collab, "alice"],
                alice,
                "nothing was stored",
            ),
            Mistake(
                "demote the last owner",
                ["collab", "role", collab, "alice", "member"],
                alice,
                "nothing was stored",
            ),
            Mistake(
                "fetch a ref nobody attached",
                ["fetch", collab, "nosuchref", str(tmp_path / "out")],
                alice,
                "nosuchref",
            ),
            Mistake(
                "attach a file that is not there",
                ["attach", collab, str(tmp_path / "no")],
                alice,
                "not a readable file",
            ),
            Mistake(
                "compare with a head that is not one",
                ["verify", collab, "--against", "1:zz"],
                alice,
                "SEQ:HEX",
            ),
            Mistake(
                "an agent credential file that exists",
                ["agent", "create", collab, "helper", "--out", str(taken)],
                alice,
                "choose another --out",
            ),
            Mistake(
                "an agent name that is a path",
                ["agent", "create", collab, "../helper"],
                alice,
                "agent's name",
            ),
            Mistake(
                "revoke an agent you never made",
                ["agent", "revoke", "nobot"],
                alice,
                "cozy account agents",
            ),
            Mistake(
                "a relay that moved or stopped",
                ["post", collab, "hi"],
                client_env(moved),
                "is it running",
            ),
            Mistake(
                "a relay with another key than the one pinned",
                ["post", collab, "hi"],
                client_env(impostor),
                "--repin",
            ),
            Mistake(
                "a damaged state.db", ["post", collab, "hi"], client_env(broken_state), "state.db"
            ),
            Mistake(
                "lift a lock nobody has",
                ["relay", "lockouts", "clear", "nobody-here"],
                server,
                "nothing to clear",
                exit_code=1,
            ),
        ]
    )
    # None of it changed what alice can see.
    tail = (await cozy("tail", collab, env=alice)).stdout.decode().splitlines()
    assert [line.split("\t")[2] for line in tail][-1] == "hello"


def test_an_unexpected_error_is_one_line_without_its_text_unless_debugging(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug has no known cause to explain: it is named by its type only (its text could hold
    anything, a token included), wrapped in task groups or not; COZY_DEBUG=1 lets it through
    for its traceback. Known errors inside a task group are reported as themselves."""
    monkeypatch.delenv("COZY_DEBUG", raising=False)
    bug = KeyError("token=s3cr3t-value")
    assert report(ExceptionGroup("tasks", [ExceptionGroup("inner", [bug])])) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()]
    assert "KeyError" in err
    assert "COZY_DEBUG=1" in err
    assert "s3cr3t" not in err
    assert report(ExceptionGroup("tasks", [CliError("a known\nmistake\x1b[2J")])) == 1
    assert capsys.readouterr().err == "error: a known mistake [2J\n"
    monkeypatch.setenv("COZY_DEBUG", "1")
    with pytest.raises(ExceptionGroup):
        report(ExceptionGroup("tasks", [bug]))


def test_the_repository_ignores_local_secrets_and_state(tmp_path: Path) -> None:
    """Following the docs in the checkout leaves credential files, bot stores and env files
    there; none of them may be one `git add .` from being published."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    names = [
        "echo-bot.cozy-agent",
        "echo-bot.state/state.db",
        "docs/deploy/.env",
        "echo-bot-state/state.db",
        ".cozy/x",
    ]
    result = _git(repo, "check-ignore", "--no-index", *names)
    assert result.splitlines() == names
    assert _git(repo, "check-ignore", "--no-index", "docs/deploy/.env.example", ok=1) == ""


def _git(repo: Path, *args: str, ok: int = 0) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        check=False,
        env=dict(os.environ, GIT_CONFIG_NOSYSTEM="1"),
    )
    assert done.returncode == ok, done.stderr.decode()
    return done.stdout.decode()
