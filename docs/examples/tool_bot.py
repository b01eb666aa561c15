"""Tool bot: `!weather Paris --days 3` calls the operator's `weather` tool through the relay's
broker (the API key stays in OpenBao; the bot never holds it) and posts the answer.

Run: python docs/examples/tool_bot.py $COZY_HOME/agents/weather-bot.cozy-agent
(see docs/bots.md: the agent needs --cap tool:weather, and the relay the tool from
docs/examples/tools.toml)
"""

from __future__ import annotations

import sys

from clientkit import Bot, Context, RelayRefused, arg

if len(sys.argv) != 2:
    sys.exit("usage: python tool_bot.py CREDENTIAL_FILE  (the file `cozy agent create` wrote)")
bot = Bot(sys.argv[1])


@bot.command("weather", help="the forecast for a city, e.g. !weather Paris --days 3")
@arg("city", nargs="+")
@arg("--days", type=int, default=1, choices=range(1, 8), metavar="1-7")
async def weather(ctx: Context) -> None:
    city = " ".join(ctx.args.city)
    try:
        result = await ctx.call_tool("weather", {"city": city, "days": str(ctx.args.days)})
    except RelayRefused as exc:  # not granted, not declared, upstream unreachable…
        await ctx.reply(f"the weather tool failed: {exc.message}")
        return
    if result.status != 200:
        await ctx.reply(f"the weather service answered HTTP {result.status}")
        return
    await ctx.reply(result.body[:500])


if __name__ == "__main__":
    bot.run_forever()
