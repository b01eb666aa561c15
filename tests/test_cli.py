"""The `cozy` command as a person uses it: real processes against a real relay and Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
import trio

from relay.embedded import free_port
from tests.cli_harness import COZY, client_env, cozy

if TYPE_CHECKING:
    from relay._server import Relay


async def test_signup_create_post_three_and_tail_shows_them_in_order(
    relay: Relay, tmp_path: Path
) -> None:
    env = client_env(tmp_path / "alice")
    signup = await cozy("account", "signup", "--relay", relay.url, "--handle", "alice", env=env)
    assert b"signed up as alice" in signup.stdout
    collab = (await cozy("collab", "create", "demo", env=env)).stdout.decode().strip()
    assert collab.startswith("c_")
    for text in ("first", "second", "third"):
        await cozy("post", collab, text, env=env)
    tail = (await cozy("tail", collab, env=env)).stdout.decode().splitlines()
    assert [line.split("\t")[1:] for line in tail] == [
        ["alice", "[created the collab]"],
        ["alice", "[collab named 'demo']"],
        ["alice", "first"],
        ["alice", "second"],
        ["alice", "third"],
    ]
    assert [int(line.split("\t")[0]) for line in tail] == [1, 2, 3, 4, 5]
    later = (await cozy("tail", collab, "--from", "4", env=env)).stdout.decode().splitlines()
    assert later == tail[3:]
    # Files in COZY_HOME are private to the user.
    for name in ("keystore.bin", "profile.json", "state.db"):
        assert (tmp_path / "alice" / name).stat().st_mode & 0o077 == 0


async def test_wrong_passphrase_and_same_password_and_passphrase_are_refused(
    relay: Relay, tmp_path: Path
) -> None:
    same = client_env(tmp_path / "same", COZY_PASSPHRASE="a long login password")
    refused = await cozy(
        "account", "signup", "--relay", relay.url, "--handle", "same", env=same, check=False
    )
    assert refused.returncode == 1
    assert b"must differ" in refused.stderr
    assert not (tmp_path / "same" / "keystore.bin").exists()
    env = client_env(tmp_path / "bob")
    await cozy("account", "signup", "--relay", relay.url, "--handle", "bob", env=env)
    wrong = client_env(tmp_path / "bob", COZY_PASSPHRASE="not the passphrase at all")
    result = await cozy("collab", "create", "x", env=wrong, check=False)
    assert result.returncode == 1
    assert b"wrong passphrase" in result.stderr


@pytest.mark.objective("SO-3")
async def test_tail_raises_an_integrity_alarm_on_a_tampered_ledger_and_verify_ledger_names_it(
    relay: Relay, tmp_path: Path, database_url: str
) -> None:
    env = client_env(tmp_path / "carol")
    await cozy("account", "signup", "--relay", relay.url, "--handle", "carol", env=env)
    collab = (await cozy("collab", "create", "audit", env=env)).stdout.decode().strip()
    await cozy("post", collab, "original words", env=env)
    server_env = dict(os.environ, DATABASE_URL=database_url, COZY_DATA_DIR=str(tmp_path / "ops"))
    assert (await cozy("relay", "verify-ledger", env=server_env)).returncode == 0
    # A database thief (superuser: disables the append-only trigger) flips one ciphertext byte.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER events_no_update")
        conn.execute(
            "UPDATE events SET body = overlay(body placing '\\xff'::bytea from length(body) - 3)"
            " WHERE collab_id = %s AND seq = 3",
            (collab,),
        )
    tail = await cozy("tail", collab, env=env, check=False)
    assert tail.returncode == 3
    assert b"INTEGRITY ALARM" in tail.stderr
    assert b"original words" not in tail.stdout
    report = await cozy("relay", "verify-ledger", env=server_env, check=False)
    assert report.returncode == 2
    assert f"{collab} seq 3".encode() in report.stdout


async def test_cozy_dev_serves_and_ctrl_c_stops_relay_postgres_and_openbao(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    proc = subprocess.Popen(  # noqa: ASYNC220 — a long-lived child we signal ourselves
        [*COZY, "dev", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    assert proc.stdout is not None
    output = b""
    url = ""
    try:
        with trio.fail_after(90):
            while "relay    ws://" not in output.decode(errors="replace"):
                chunk = await trio.to_thread.run_sync(proc.stdout.readline)
                if not chunk:
                    pytest.fail(f"cozy dev exited early:\n{output.decode(errors='replace')}")
                output += chunk
        url = next(w for w in output.decode().split() if w.startswith("ws://"))
        # This stack's own children (OpenBao, Postgres), not any other on the machine.
        started = descendants(proc.pid)
        assert started, "cozy dev started no child processes"
        env = client_env(tmp_path / "dave")
        await cozy("account", "signup", "--relay", url, "--handle", "dave", env=env)
        collab = (await cozy("collab", "create", "devtest", env=env)).stdout.decode().strip()
        await cozy("post", collab, "hello from dev", env=env)
        assert b"hello from dev" in (await cozy("tail", collab, env=env)).stdout
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(60):
            output += await trio.to_thread.run_sync(proc.stdout.read)
            await trio.to_thread.run_sync(proc.wait)
        proc.stdout.close()
    assert proc.returncode == 0, output.decode(errors="replace")
    assert b"Try it in another shell" in output, output.decode(errors="replace")
    leftovers = subprocess.run(  # noqa: ASYNC221 — pgrep is instant
        ["pgrep", "-f", str(data_dir)], capture_output=True, check=False
    )
    assert leftovers.stdout == b"", "postgres kept running after cozy dev stopped"
    still_running = alive(started)
    assert not still_running, f"cozy dev left its children running: {started}"


async def test_relay_serve_stops_cleanly_on_sigterm(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, DATABASE_URL=database_url, COZY_LISTEN_PORT=str(port))
    with subprocess.Popen(  # noqa: ASYNC220 — a long-lived child we signal ourselves
        [*COZY, "relay", "serve", "--data-dir", str(tmp_path / "relay")],
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        with trio.fail_after(30):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    assert proc.poll() is None, "relay exited before listening"
                    await trio.sleep(0.1)
                else:
                    await stream.aclose()
                    break
        proc.send_signal(signal.SIGTERM)
        _, err = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=30))
    assert proc.returncode == 0, err.decode()
    assert b"signal_received" in err
    assert b"relay_stopped" in err


@pytest.mark.parametrize("which", ["COZY_LISTEN_PORT", "COZY_OPS_PORT"])
async def test_relay_serve_on_a_taken_port_says_so_in_one_line(
    database_url: str, tmp_path: Path, which: str
) -> None:
    with trio.socket.socket() as holder:
        await holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"COZY_LISTEN_PORT": str(free_port()), "COZY_OPS_PORT": "0", which: str(taken)}
        env = dict(os.environ, DATABASE_URL=database_url, **ports)
        with trio.fail_after(60):
            result = await trio.run_process(
                [*COZY, "relay", "serve", "--data-dir", str(tmp_path / "relay")],
                env=env,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 1
    assert b"error: an address the relay listens on is already in use" in result.stderr
    assert b"Traceback" not in result.stderr


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (PID reuse within one test is ignored)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]
