"""The bot kit as a bot author meets it: on a collab with history, with DMs and commands.

Everything runs for real: the human uses the `cozy` CLI (child processes), the bot runs in this
process against a real relay, and what the bot said is read back through the human's CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from clientkit import Bot, Context, arg
from tests.cli_harness import cli_signup, client_env, cozy, tail, until

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay


async def collab_with_history(relay_url: str, tmp_path: Path) -> tuple[str, dict[str, str], Path]:
    """Alice's collab where two messages were said before the bot joined and one after it
    joined but before it first started; returns (collab, alice's env, the bot's credentials)."""
    env = client_env(tmp_path / "alice")
    await cli_signup(relay_url, tmp_path / "alice", "alice")
    collab = (await cozy("collab", "create", "ops", env=env)).stdout.decode().strip()
    await cozy("post", collab, "!weather Oslo", env=env)
    await cozy("post", collab, "before the bot joined", env=env)
    creds = tmp_path / "bot.cozy-agent"
    await cozy("agent", "create", collab, "the-bot", "--out", str(creds), env=env)
    await cozy("post", collab, "!weather Rome", env=env)
    return collab, env, creds


async def test_a_new_bot_starts_from_now_and_never_sees_what_came_before_it_joined(
    relay: Relay, tmp_path: Path
) -> None:
    """Old code: every one of the three old messages reached the handler (the two from before
    the bot joined among them); now only what is said after the bot first started does, and
    with `backlog=True` what was said after it joined, never before."""
    collab, env, creds = await collab_with_history(relay.url, tmp_path)
    fresh: list[str] = []
    backlog: list[str] = []
    bot = Bot(creds, store=tmp_path / "store")
    with_backlog = Bot(creds, store=tmp_path / "store-backlog", backlog=True)

    @bot.on_message
    async def record(ctx: Context) -> None:
        fresh.append(ctx.text)

    @with_backlog.on_message
    async def record_backlog(ctx: Context) -> None:
        backlog.append(ctx.text)
        assert ctx.author.handle == "alice"
        await ctx.reply(f"seen {ctx.text}")  # sealed for the membership the bot is part of

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(bot.run)
            await nursery.start(with_backlog.run)
            await cozy("post", collab, "!weather Paris", env=env)
            await until(collab, env, ["the-bot", "seen !weather Paris"])
            while "!weather Paris" not in fresh:  # noqa: ASYNC110
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    assert fresh == ["!weather Paris"]
    assert backlog == ["!weather Rome", "!weather Paris"]


@pytest.mark.objective("SO-1")
async def test_a_reply_to_a_dm_is_a_dm_to_its_author_that_no_other_member_reads(
    relay: Relay, tmp_path: Path
) -> None:
    """Old code: `ctx.reply` to a DM posted the answer to the whole collab (bob read it)."""
    collab, alice, creds = await collab_with_history(relay.url, tmp_path)
    bob = client_env(tmp_path / "bob")
    await cli_signup(relay.url, tmp_path / "bob", "bob")
    await cozy("collab", "add", collab, "bob", env=alice)
    bot = Bot(creds, store=tmp_path / "store")
    dms: list[tuple[str, str, bool]] = []

    @bot.on_dm
    async def answer(ctx: Context) -> None:
        dms.append((ctx.author.handle, ctx.text, ctx.is_dm))
        await ctx.reply(f"private answer to {ctx.text}")

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(bot.run)
            await cozy("dm", collab, "the-bot", "the launch code", env=alice)
            lines = await until(
                collab, alice, ["the-bot", "(DM to alice) private answer to the launch code"]
            )
            nursery.cancel_scope.cancel()
    assert dms == [("alice", "the launch code", True)]
    assert not [line for line in lines if "private answer" in line[-1] and "DM" not in line[-1]]
    seen_by_bob = "\n".join("\t".join(line) for line in await tail(collab, bob))
    assert "private answer" not in seen_by_bob
    assert "launch code" not in seen_by_bob


async def test_commands_parse_their_arguments_and_a_bad_one_gets_a_usage_line(
    relay: Relay, tmp_path: Path
) -> None:
    collab, env, creds = await collab_with_history(relay.url, tmp_path)
    bot = Bot(creds, store=tmp_path / "store", prefix="!")
    calls: list[tuple[list[str], int]] = []

    @bot.command("weather", help="the forecast for a city")
    @arg("city", nargs="+")
    @arg("--days", type=int, default=1)
    async def weather(ctx: Context) -> None:
        calls.append((ctx.args.city, ctx.args.days))
        await ctx.reply(f"{' '.join(ctx.args.city)} for {ctx.args.days} days")

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(bot.run)
            await cozy("post", collab, "!weather New York --days 3", env=env)
            await until(collab, env, ["the-bot", "New York for 3 days"])
            await cozy("post", collab, "!weather --days soon", env=env)
            with trio.fail_after(45):
                while not [line for line in await tail(collab, env) if "usage:" in line[-1]]:  # noqa: ASYNC110
                    await trio.sleep(0.3)
            await cozy("post", collab, "!weather Lima", env=env)  # still running
            lines = await until(collab, env, ["the-bot", "Lima for 1 days"])
            nursery.cancel_scope.cancel()
    assert calls == [(["New", "York"], 3), (["Lima"], 1)]  # the old "!weather Rome" is not
    [usage] = [line[1] for line in lines if line[0] == "the-bot" and "usage" in line[1]]
    assert "\n" not in usage
    assert "--days" in usage
    assert "invalid int value" in usage


def test_a_bot_author_finds_everything_in_clientkit() -> None:
    """The examples import nothing but the standard library and `clientkit` (old code: they
    needed `clientkit.bot` and `trio`; error codes came from `model.wire`, management
    builders from the private `clientkit._collab`)."""
    import ast
    import sys
    from pathlib import Path

    import clientkit

    for name in ("Bot", "Context", "Author", "arg", "ErrorCode", "RelayRefused", "NotARecipient",
                 "BotRemoved", "RelayUnreachable", "CredentialsError", "NotAMember",
                 "add_member", "remove_member", "rotate_key", "change_role", "set_caps",
                 "member_for", "Member", "Role", "MemberKind"):  # fmt: skip
        assert hasattr(clientkit, name), name
    examples = Path(__file__).resolve().parent.parent / "docs" / "examples"
    for script in examples.glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert module == "clientkit" or top in sys.stdlib_module_names, (script, module)
