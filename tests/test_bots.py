"""The bot kit and the two example bots, run for real as separate processes (SO-9).

A human creates an agent with the CLI, the example bot runs from its credential file, and the
human's messages make it answer — through a real relay, and for the tool bot through the broker
and a real OpenBao, with the secret scrubbed from what it posts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import tomllib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import hvac
import nacl.public
import nacl.signing
import pytest
import trio
import trio_websocket

from clientkit import Bot, Context
from clientkit._agent import AgentCredentials, save_credentials
from model import wire
from model.envelope import MAX_BODY_BYTES
from model.ids import new_id
from relay.broker import tools_from_config
from relay.config import Secret
from relay.embedded import free_port
from tests.broker_harness import bao
from tests.cli_harness import cli_signup, client_env, cozy, tail, until
from tests.relay_harness import relay_config, running_relay

if TYPE_CHECKING:
    from relay._server import Relay

__all__ = ["bao"]  # fixtures

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


class _Example:
    """An example bot run exactly as docs/bots.md says, its stderr kept to read its log."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = b""
        self.closed = trio.Event()  # stderr reached its end: everything it said is in

    async def collect(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk
        self.closed.set()

    async def wait_for_log(self, text: str) -> None:
        with trio.fail_after(45):
            while text.encode() not in self.stderr:
                if self.process.returncode is not None:
                    pytest.fail(f"the bot stopped: {self.stderr.decode()}")
                await trio.sleep(0.1)


async def _start_bot(nursery: trio.Nursery, script: str, *args: str | Path) -> _Example:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    example = _Example(process)
    nursery.start_soon(example.collect)
    await example.wait_for_log("connected as ")
    return example


async def _stop(example: _Example, signum: int = signal.SIGINT) -> tuple[int, list[str]]:
    """SIGINT (as Ctrl-C does) or `signum`; returns the exit code and the lines it printed
    after."""
    before = example.stderr
    example.process.send_signal(signum)
    with trio.fail_after(30):
        code = await example.process.wait()
        await example.closed.wait()
    return code, example.stderr.removeprefix(before).decode().splitlines()


async def _setup(relay_url: str, tmp_path: Path, *caps: str) -> tuple[str, dict[str, str], Path]:
    """A collab with history: said before the bot joined, and after it joined but before it
    ever ran (a new bot starts from now: neither is answered)."""
    env = client_env(tmp_path / "alice")
    await cli_signup(relay_url, tmp_path / "alice", "alice")
    collab = (await cozy("collab", "create", "ops", env=env)).stdout.decode().strip()
    await cozy("post", collab, "said before the bot joined", env=env)
    await cozy("post", collab, "!weather Oslo", env=env)
    creds = tmp_path / "bot.cozy-agent"
    cap_args = [arg for cap in caps for arg in ("--cap", cap)]
    await cozy("agent", "create", collab, "the-bot", *cap_args, "--out", str(creds), env=env)
    await cozy("post", collab, "said before the bot ran", env=env)
    return collab, env, creds


@pytest.mark.objective("SO-9")
async def test_the_echo_bot_answers_once_per_message_across_a_restart(
    relay: Relay, tmp_path: Path
) -> None:
    """On a collab with history. Old code: the example crashed on its first start with a
    NotARecipient traceback (it answered a message from before it joined), every time."""
    collab, env, creds = await _setup(relay.url, tmp_path)
    async with trio.open_nursery() as nursery:
        bot = await _start_bot(nursery, "echo_bot.py", creds)
        assert b"connected as the-bot in " in bot.stderr
        await cozy("post", collab, "hello", env=env)
        await until(collab, env, ["the-bot", "echo: hello"])
        code, said = await _stop(bot)
    assert (code, said) == (0, ["stopped: Ctrl-C"])
    # Restarted from its store, it does not answer "hello" again (the cursor was committed
    # after the handler), and it answers what came while it was down.
    await cozy("post", collab, "while you slept", env=env)
    async with trio.open_nursery() as nursery:
        bot = await _start_bot(nursery, "echo_bot.py", creds)
        lines = await until(collab, env, ["the-bot", "echo: while you slept"])
        await cozy("post", collab, "again", env=env)
        lines = await until(collab, env, ["the-bot", "echo: again"])
        await _stop(bot)
    assert b"Traceback" not in bot.stderr
    assert lines.count(["the-bot", "echo: hello"]) == 1
    assert lines.count(["the-bot", "echo: while you slept"]) == 1
    assert not [line for line in lines if "echo: said before" in line[-1]]


async def test_the_command_bot_parses_commands_and_answers_a_mistake_with_its_usage(
    relay: Relay, tmp_path: Path
) -> None:
    collab, env, creds = await _setup(relay.url, tmp_path)
    async with trio.open_nursery() as nursery:
        bot = await _start_bot(nursery, "command_bot.py", creds)
        await cozy("post", collab, "!roll 3d1 --plus 2", env=env)
        await until(collab, env, ["the-bot", "alice rolled 3d1+2: 5"])
        await cozy("post", collab, "!roll banana", env=env)
        await cozy("post", collab, "!upper quiet please", env=env)
        lines = await until(collab, env, ["the-bot", "QUIET PLEASE"])
        stopped = await _stop(bot, signal.SIGTERM)  # as a service manager stops it
    assert stopped == (0, ["stopped: SIGTERM"])
    assert b"Traceback" not in bot.stderr
    [usage] = [text for who, text in lines if who == "the-bot" and text.startswith("usage:")]
    assert usage.startswith("usage: !roll")
    assert "banana" in usage


@pytest.mark.objective("SO-9")
async def test_the_tool_bot_calls_the_example_weather_service_through_the_broker(
    database_url: str, tmp_path: Path, bao: tuple[str, str]
) -> None:
    """docs/examples: the weather service, its tools.toml, and the tool bot, as documented.
    The service wants the key; the bot never holds it, and it never reaches the room."""
    port = free_port()
    key = "demo-" + secrets.token_hex(8)
    client = hvac.Client(url=bao[0], token=bao[1])
    await trio.to_thread.run_sync(
        lambda: client.secrets.kv.v2.create_or_update_secret(
            path="tools/weather", secret={"api_key": key}, mount_point="secret"
        )
    )
    declared = tomllib.loads((EXAMPLES / "tools.toml").read_text().replace("8088", str(port)))
    config = dataclasses.replace(
        relay_config(database_url, tmp_path / "relay"),
        bao_addr=bao[0],
        bao_token=Secret(bao[1].encode()),
        tools=tools_from_config(declared["tools"]),
    )
    service = [sys.executable, str(EXAMPLES / "weather_service.py"), "--port", str(port)]
    async with trio.open_nursery() as nursery, running_relay(config) as relay:
        weather = await trio.lowlevel.open_process(
            service, env={**os.environ, "WEATHER_API_KEY": key}, stderr=subprocess.DEVNULL
        )
        try:
            caps = ("read", "post", "tool:weather")
            collab, env, creds = await _setup(relay.url, tmp_path, *caps)
            bot = await _start_bot(nursery, "tool_bot.py", creds)
            await cozy("post", collab, "!weather Paris --days 2", env=env)
            with trio.fail_after(45):
                while not (answers := [t for w, t in await tail(collab, env) if w == "the-bot"]):  # noqa: ASYNC110
                    await trio.sleep(0.3)
            await _stop(bot)
        finally:
            weather.terminate()
            await weather.wait()
    assert answers == [answers[0]]  # "!weather Oslo" from before the bot joined: not answered
    assert answers[0].startswith("Paris, 2 days: ")
    assert key not in answers[0]
    assert b"Traceback" not in bot.stderr


async def test_a_revoked_bot_stops_with_one_line_and_a_failing_exit(
    relay: Relay, tmp_path: Path
) -> None:
    """Old code: a revoked bot reconnected for ever (or died with a traceback)."""
    collab, env, creds = await _setup(relay.url, tmp_path)
    async with trio.open_nursery() as nursery:
        bot = await _start_bot(nursery, "echo_bot.py", creds)
        before = bot.stderr
        await cozy("agent", "revoke", "the-bot", "--collab", collab, env=env)
        with trio.fail_after(60):
            code = await bot.process.wait()
            await bot.closed.wait()
    said = bot.stderr.removeprefix(before).decode().splitlines()
    assert code == 1, said
    assert b"Traceback" not in bot.stderr
    # The log may first say the connection closed and the bot tried again; then one line.
    assert said[-1].startswith("the-bot stopped: "), said
    assert "revoked" in said[-1]
    assert [line for line in said if "stopped" in line] == said[-1:]


async def test_an_example_bot_says_in_one_line_why_it_cannot_start(tmp_path: Path) -> None:
    """Old code: a traceback for no arguments and for a credential file that is not there."""
    script = str(EXAMPLES / "echo_bot.py")
    unsafe = tmp_path / "open.cozy-agent"
    unsafe.write_text("{}")
    unsafe.chmod(0o644)
    for args, says, status in (
        ([], "usage: ", 1),  # sys.exit("usage: …")
        ([str(tmp_path / "missing.cozy-agent")], "cannot read", 2),
        ([str(unsafe)], "chmod 600", 2),
    ):
        with trio.fail_after(30):
            done = await trio.run_process(
                [sys.executable, script, *args], capture_stderr=True, check=False
            )
        lines = done.stderr.decode().splitlines()
        assert done.returncode == status, lines
        assert len(lines) == 1, lines
        assert says in lines[0]


@pytest.mark.objective("SO-9")
async def test_the_bot_rides_out_a_relay_restart_and_resumes_after_its_cursor(
    database_url: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(relay_config(database_url, tmp_path / "relay"), port=free_port())
    handled: list[str] = []
    resumed: list[int] = []
    async with running_relay(config) as relay:
        collab, env, creds = await _setup(relay.url, tmp_path)
    bot = Bot.from_credentials(creds, store=tmp_path / "store")

    @bot.on_message
    async def record(ctx: Context) -> None:
        handled.append(ctx.text)
        await ctx.reply(f"got {ctx.text}")

    @bot.on_resume
    async def count(b: Bot) -> None:
        resumed.append(b.connections)

    async with trio.open_nursery() as nursery:
        async with running_relay(config) as relay:
            await nursery.start(bot.run)
            await cozy("post", collab, "before the restart", env=env)
            await until(collab, env, ["the-bot", "got before the restart"])
        # The relay is down; the bot backs off and retries. Then it comes back.
        async with running_relay(config) as relay:
            assert relay.url.endswith(str(config.port))
            await cozy("post", collab, "after the restart", env=env)
            lines = await until(collab, env, ["the-bot", "got after the restart"])
            nursery.cancel_scope.cancel()
    assert handled == ["before the restart", "after the restart"]  # each exactly once
    assert resumed
    assert lines.count(["the-bot", "got before the restart"]) == 1


class _MuteRelay:
    """Says hello, accepts the token, then never answers again (a socket gone silent)."""

    def __init__(self) -> None:
        self.key = nacl.signing.SigningKey.generate()
        self.accepted = 0
        self.came_back = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(trio_websocket.serve_websocket, self._handle, "127.0.0.1", 0, None)
            )
            task_status.started(f"ws://127.0.0.1:{server.port}")

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        self.accepted += 1
        if self.accepted == 2:  # the bot gave up on the silent connection and came back
            self.came_back.set()
        welcome = wire.Welcome(
            protocol=wire.PROTOCOL,
            relay_pk=bytes(self.key.verify_key),
            max_frame_bytes=wire.MAX_FRAME_BYTES,
            max_body_bytes=MAX_BODY_BYTES,
        )
        await ws.send_message(wire.encode(welcome))
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                req = wire.decode_request(await ws.get_message())  # type: ignore[arg-type]
                if isinstance(req, wire.Authenticate):
                    await ws.send_message(
                        wire.encode(wire.Authenticated(rid=req.rid, account_id=new_id("a")))
                    )


async def test_the_watchdog_notices_a_silent_relay_and_reconnects(tmp_path: Path) -> None:
    mute = _MuteRelay()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(mute.serve)
        creds = tmp_path / "bot.cozy-agent"
        save_credentials(
            creds,
            AgentCredentials(
                relay_url=url,
                relay_pk=bytes(mute.key.verify_key).hex(),
                account_id=new_id("a"),
                handle="quiet-bot",
                collab_id=new_id("c"),
                sign_seed=bytes(nacl.signing.SigningKey.generate()),
                box_sk=bytes(nacl.public.PrivateKey.generate()),
                token="t",
                expires_at=0,
            ),
        )
        bot = Bot.from_credentials(creds, store=tmp_path / "store")
        bot.ping_every, bot.ping_timeout = 0.2, 0.3
        nursery.start_soon(bot.run)
        with trio.fail_after(15):
            await mute.came_back.wait()
        nursery.cancel_scope.cancel()
    assert bot.connections >= 1
