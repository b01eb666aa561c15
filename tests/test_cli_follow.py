"""`cozy tail --follow` under a relay that restarts: it reconnects on its own and resumes right
after the last event it verified, so every event is printed exactly once."""

from __future__ import annotations

import dataclasses
import subprocess
from functools import partial
from typing import TYPE_CHECKING

import trio

from relay.embedded import free_port
from tests.cli_harness import COZY, cli_signup, client_env, cozy
from tests.relay_harness import relay_config, running_relay

if TYPE_CHECKING:
    from pathlib import Path


class _Lines:
    """The lines a child process writes to one of its pipes, as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.lines: list[str] = []

    async def until(self, text: str) -> list[str]:
        """Read until a line ends with `text`; return every line so far."""
        with trio.fail_after(90):
            while not any(line.endswith(text) for line in self.lines):
                chunk = await self._stream.receive_some()
                assert chunk, f"the pipe closed before {text!r}; got {self.lines}"
                self._buffer += chunk
                *done, self._buffer = self._buffer.split(b"\n")
                self.lines += [line.decode() for line in done]
        return self.lines


async def test_tail_follow_rides_out_a_relay_restart_and_prints_each_event_once(
    database_url: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(relay_config(database_url, tmp_path / "relay"), port=free_port())
    env = client_env(tmp_path / "alice")
    async with running_relay(config) as relay:
        await cli_signup(relay.url, tmp_path / "alice", "alice")
        collab = (await cozy("collab", "create", "ops", env=env)).stdout.decode().strip()
        await cozy("post", collab, "before the restart", env=env)
    async with trio.open_nursery() as nursery:
        async with running_relay(config):
            tail: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    [*COZY, "tail", collab, "--follow"],
                    env=env,
                    stdin=b"",
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            assert tail.stdout is not None
            assert tail.stderr is not None
            out = _Lines(tail.stdout)
            await out.until("\talice\tbefore the restart")
        # The relay is gone: the tail says so and keeps trying, it does not exit.
        err = _Lines(tail.stderr)
        await err.until("…")
        assert tail.returncode is None, err.lines
        async with running_relay(config):
            await cozy("post", collab, "after the restart", env=env)
            lines = await out.until("\talice\tafter the restart")
            await cozy("post", collab, "and one more", env=env)
            lines = await out.until("\talice\tand one more")
            tail.terminate()
    texts = [line.split("\t")[2] for line in lines]
    assert texts == [
        "[created the collab]",
        "[collab named 'ops']",
        "before the restart",
        "after the restart",
        "and one more",
    ]
    assert [int(line.split("\t")[0]) for line in lines] == [1, 2, 3, 4, 5]
    assert "Traceback" not in "\n".join(err.lines)
    assert "reconnecting" in err.lines[0]
