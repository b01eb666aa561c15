"""The bot kit and the two example bots, run for real as separate processes (SO-9).

A human creates an agent with the CLI, the example bot runs from its credential file, and the
human's messages make it answer — through a real relay, and for the tool bot through the broker
and a real OpenBao, with the secret scrubbed from what it posts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import pytest
import trio
import trio_websocket

from clientkit._agent import AgentCredentials, save_credentials
from clientkit.bot import Bot, Context
from model import wire
from model.envelope import MAX_BODY_BYTES
from model.ids import new_id
from relay.embedded import free_port
from tests.broker_harness import CANARY, bao, broker_relay, elsewhere, upstream, upstream_server
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import relay_config, running_relay

if TYPE_CHECKING:
    from relay._server import Relay

__all__ = ["bao", "broker_relay", "elsewhere", "upstream", "upstream_server"]  # fixtures

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


async def _tail(collab: str, env: dict[str, str]) -> list[list[str]]:
    out = (await cozy("tail", collab, env=env)).stdout.decode()
    return [line.split("\t")[1:] for line in out.splitlines()]


async def _until(collab: str, env: dict[str, str], line: list[str]) -> list[list[str]]:
    with trio.fail_after(45):
        while True:
            lines = await _tail(collab, env)
            if line in lines:
                return lines
            await trio.sleep(0.3)


async def _start_bot(nursery: trio.Nursery, script: str, creds: Path, store: Path) -> trio.Process:
    return await nursery.start(
        partial(
            trio.run_process,
            [sys.executable, str(EXAMPLES / script), str(creds), str(store)],
            stdout=subprocess.DEVNULL,
            check=False,
        )
    )


async def _setup(relay_url: str, tmp_path: Path, *caps: str) -> tuple[str, dict[str, str], Path]:
    env = client_env(tmp_path / "alice")
    await cli_signup(relay_url, tmp_path / "alice", "alice")
    collab = (await cozy("collab", "create", "ops", env=env)).stdout.decode().strip()
    creds = tmp_path / "bot.cozy-agent"
    cap_args = [arg for cap in caps for arg in ("--cap", cap)]
    await cozy("agent", "create", collab, "the-bot", *cap_args, "--out", str(creds), env=env)
    return collab, env, creds


@pytest.mark.objective("SO-9")
async def test_the_echo_bot_answers_once_per_message_across_a_restart(
    relay: Relay, tmp_path: Path
) -> None:
    collab, env, creds = await _setup(relay.url, tmp_path)
    store = tmp_path / "bot-store"
    async with trio.open_nursery() as nursery:
        bot = await _start_bot(nursery, "echo_bot.py", creds, store)
        await cozy("post", collab, "hello", env=env)
        await _until(collab, env, ["the-bot", "echo: hello"])
        bot.terminate()
    # Restarted from its store, it does not answer "hello" again (the cursor was committed
    # after the handler), and it answers what came while it was down.
    await cozy("post", collab, "while you slept", env=env)
    async with trio.open_nursery() as nursery:
        bot = await _start_bot(nursery, "echo_bot.py", creds, store)
        lines = await _until(collab, env, ["the-bot", "echo: while you slept"])
        await cozy("post", collab, "again", env=env)
        lines = await _until(collab, env, ["the-bot", "echo: again"])
        bot.terminate()
    assert lines.count(["the-bot", "echo: hello"]) == 1
    assert lines.count(["the-bot", "echo: while you slept"]) == 1


@pytest.mark.objective("SO-9")
async def test_the_tool_bot_calls_a_tool_whose_secret_stays_in_openbao(
    broker_relay: Relay, tmp_path: Path
) -> None:
    collab, env, creds = await _setup(broker_relay.url, tmp_path, "read", "post", "tool:weather")
    async with trio.open_nursery() as nursery:
        bot = await _start_bot(nursery, "tool_bot.py", creds, tmp_path / "bot-store")
        await cozy("post", collab, "!weather paris", env=env)
        with trio.fail_after(45):
            while True:
                answers = [line for line in await _tail(collab, env) if line[:1] == ["the-bot"]]
                if answers:
                    break
                await trio.sleep(0.3)
        bot.terminate()
    [(_, answer)] = answers
    assert answer.startswith("weather for paris (HTTP 200)")
    assert "city=paris" in answer  # the upstream's answer reached the room…
    assert "[REDACTED]" in answer  # …with the key it echoed scrubbed
    assert CANARY not in answer


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
    async def record(ctx: Context, text: str) -> None:
        handled.append(text)
        await ctx.reply(f"got {text}")

    @bot.on_resume
    async def count(b: Bot) -> None:
        resumed.append(b.connections)

    async with trio.open_nursery() as nursery:
        async with running_relay(config) as relay:
            await nursery.start(bot.run)
            await cozy("post", collab, "before the restart", env=env)
            await _until(collab, env, ["the-bot", "got before the restart"])
        # The relay is down; the bot backs off and retries. Then it comes back.
        async with running_relay(config) as relay:
            assert relay.url.endswith(str(config.port))
            await cozy("post", collab, "after the restart", env=env)
            lines = await _until(collab, env, ["the-bot", "got after the restart"])
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
