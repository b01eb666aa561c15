"""Tool-calling bot: `!weather CITY` calls the operator's `weather` tool through the relay's
broker (the API key stays in OpenBao) and posts the answer.

Run: python tool_bot.py CREDENTIALS STORE   (the agent needs --cap read --cap post
--cap tool:weather)
"""

from __future__ import annotations

import sys

import trio

from clientkit import RelayRefused
from clientkit.bot import Bot, Context

bot = Bot.from_credentials(sys.argv[1], store=sys.argv[2])


@bot.on_message
async def weather(ctx: Context, text: str) -> None:
    if not text.startswith("!weather "):
        return
    city = text.removeprefix("!weather ").strip()
    try:
        result = await ctx.call_tool("weather", {"city": city})
    except RelayRefused as exc:
        await ctx.reply(f"the weather tool failed: {exc.message}")
        return
    await ctx.reply(f"weather for {city} (HTTP {result.status}): {result.body[:500]}")


if __name__ == "__main__":
    trio.run(bot.run)
