"""Command bot: `!roll 2d6 --plus 1` and `!upper some words`; a mistake gets a usage line.

Run: python docs/examples/command_bot.py $COZY_HOME/agents/dice-bot.cozy-agent   (see docs/bots.md)
"""

from __future__ import annotations

import argparse
import random
import re
import sys

from clientkit import Bot, Context, arg

if len(sys.argv) != 2:
    sys.exit("usage: python command_bot.py CREDENTIAL_FILE  (the file `cozy agent create` wrote)")
bot = Bot(sys.argv[1], prefix="!")


def dice(text: str) -> tuple[int, int]:
    """`2d6` as (2, 6); argparse turns the ValueError into the usage line's reason."""
    found = re.fullmatch(r"([1-9][0-9]?)d([1-9][0-9]{0,2})", text)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not like 2d6")
    return int(found[1]), int(found[2])


@bot.command("roll", help="roll dice, e.g. !roll 2d6 --plus 1")
@arg("dice", type=dice)
@arg("--plus", type=int, default=0)
async def roll(ctx: Context) -> None:
    count, sides = ctx.args.dice
    total = sum(random.randint(1, sides) for _ in range(count)) + ctx.args.plus  # noqa: S311
    plus = f"+{ctx.args.plus}" if ctx.args.plus else ""
    await ctx.reply(f"{ctx.author} rolled {count}d{sides}{plus}: {total}")


@bot.command("upper", help="shout the words back")
@arg("words", nargs="+")
async def upper(ctx: Context) -> None:
    await ctx.reply(" ".join(ctx.args.words).upper())


if __name__ == "__main__":
    bot.run_forever()
