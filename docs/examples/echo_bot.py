"""Echo bot: answers every message in its collab. Run: python echo_bot.py CREDENTIALS STORE"""

from __future__ import annotations

import sys

import trio

from clientkit.bot import Bot, Context

bot = Bot.from_credentials(sys.argv[1], store=sys.argv[2])


@bot.on_message
async def echo(ctx: Context, text: str) -> None:
    await ctx.reply(f"echo: {text}")


@bot.on_dm
async def private(ctx: Context, text: str) -> None:
    await ctx.reply(f"(someone sent me a DM of {len(text)} characters)")


if __name__ == "__main__":
    trio.run(bot.run)
