"""Running the real `cozy` command as a person would: a child process per command."""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

import pytest
import trio

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

COZY = [sys.executable, "-m", "cozy.cli"]
# A recovery code as `cozy account signup` prints it.
CODE_RE = re.compile(rb"(?:[0-9A-Z]{4}-){8}[0-9A-Z]{2}")


def client_env(home: Path, *, password: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a non-interactive CLI user living in `home`."""
    env = dict(os.environ)
    env.update(
        COZY_HOME=str(home),
        COZY_PASSWORD="a long login password",
        COZY_PASSPHRASE="a different, longer encryption passphrase",
        COZY_KDF_PROFILE="insecure-test",  # documented test-only Argon2id profile
    )
    if not password:
        del env["COZY_PASSWORD"]
    env.update(extra)
    return env


async def cozy(
    *args: str, env: dict[str, str], check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run one `cozy` command (in `cwd`, default this process's); with `check`, fail the test
    on a non-zero exit."""
    with trio.fail_after(60):
        result = await trio.run_process(
            [*COZY, *args],
            env=env,
            cwd=cwd,
            stdin=b"",  # never a TTY: nothing may prompt
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if check and result.returncode != 0:
        pytest.fail(f"cozy {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
    return result


async def cli_signup(relay_url: str, home: Path, handle: str) -> str:
    """Sign up through the CLI; return the recovery code it printed (exactly once)."""
    out = (
        await cozy(
            "account", "signup", "--relay", relay_url, "--handle", handle, env=client_env(home)
        )
    ).stdout
    codes = CODE_RE.findall(out)
    assert len(codes) == 1, out.decode()
    return codes[0].decode()


async def tail(collab: str, env: dict[str, str]) -> list[list[str]]:
    """`cozy tail` as (author, text) pairs."""
    out = (await cozy("tail", collab, env=env)).stdout.decode()
    return [line.split("\t")[1:] for line in out.splitlines()]


async def until(collab: str, env: dict[str, str], line: list[str]) -> list[list[str]]:
    """`cozy tail` again until it shows `line` (author, text); all it showed then."""
    with trio.fail_after(45):
        while True:
            lines = await tail(collab, env)
            if line in lines:
                return lines
            await trio.sleep(0.3)
