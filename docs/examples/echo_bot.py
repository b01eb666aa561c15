"""Echo bot: answers every message in its collab, and every DM with a DM.

Run: python docs/examples/echo_bot.py $COZY_HOME/agents/echo-bot.cozy-agent   (see docs/bots.md)
"""

from __future__ import annotations

import sys

from clientkit import Bot, Context

if len(sys.argv) != 2:
    sys.exit("usage: python echo_bot.py CREDENTIAL_FILE  (the file `cozy agent create` wrote)")
bot = Bot(sys.argv[1])  # keeps its cursor in a store beside the file (echo-bot.state)


@bot.on_message
async def echo(ctx: Context) -> None:
    await ctx.reply(f"echo: {ctx.text}")


@bot.on_dm
async def private(ctx: Context) -> None:
    await ctx.reply(f"echo, just between us: {ctx.text}")  # a DM back to its author


if __name__ == "__main__":
    bot.run_forever()
