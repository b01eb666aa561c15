"""`Bot.run_forever`: the bot as a script a person starts in a terminal or a service manager.

It owns what a script would otherwise get wrong: Ctrl-C and SIGTERM end the bot quietly (no
ExceptionGroup traceback), and every way the bot stops is said in one line on stderr that
names what to do next, with an exit status a supervisor can act on:

    0  stopped by Ctrl-C or SIGTERM
    1  the relay ended it: token revoked or expired, bot removed, relay unreachable, too many
       connections, or another refusal
    2  it could not start: the credential file or the store
    3  an integrity alarm: the relay lied (docs/ordering.md); do not simply restart

Nothing secret is printed: messages name files, handles, ids and codes, never a token or key.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from typing import TYPE_CHECKING, NoReturn

import trio

from clientkit._agent import CredentialsError
from clientkit.bot import REVOKED_CLOSE_CODE, BotRemoved, BotSetupError, RelayUnreachable
from clientkit.errors import (
    ClientError,
    ConnectionLost,
    IntegrityAlarm,
    RelayRefused,
    TooManyConnections,
)
from model import wire
from model.excgroups import innermost

if TYPE_CHECKING:
    from clientkit.bot import Bot

SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def run_forever(bot: Bot) -> NoReturn:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    line, status = _start(bot)
    print(
        f"stopped: {line}" if status == 0 else f"{bot_name(bot)} stopped: {line}", file=sys.stderr
    )
    sys.exit(status)


def bot_name(bot: Bot) -> str:
    try:
        return bot.handle
    except CredentialsError:
        return "the bot"


def _start(bot: Bot) -> tuple[str, int]:
    try:
        bot._check_setup()  # before the loop: these are not the relay's doing
        return trio.run(_until_stopped, bot)
    except (CredentialsError, ClientError) as exc:
        return describe_stop(exc)
    except KeyboardInterrupt:  # a Ctrl-C before the signal receiver was in place
        return SIGNALS[signal.SIGINT], 0


async def _until_stopped(bot: Bot) -> tuple[str, int]:
    stopped: list[tuple[str, int]] = []
    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    stopped.append((SIGNALS[signal.Signals(signum)], 0))
                    nursery.cancel_scope.cancel()

            async def serve() -> None:
                try:
                    await bot.run()
                except (CredentialsError, ClientError) as exc:
                    stopped.append(describe_stop(exc))
                except Exception as exc:  # noqa: BLE001 — a handler's own bug: shown, then said
                    error = innermost(exc)
                    traceback.print_exception(error)
                    stopped.append((f"{type(error).__name__} in a handler (above): {error}", 1))
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(serve)
    return stopped[0] if stopped else ("the bot's run ended", 1)


def describe_stop(exc: BaseException) -> tuple[str, int]:
    """The one line saying why the bot stopped, and its exit status."""
    match exc:
        case CredentialsError() | BotSetupError():
            return str(exc), 2
        case IntegrityAlarm():
            return (
                f"integrity alarm ({type(exc).__name__}): {exc}; keep the bot's store as"
                " evidence and tell the collab's owner before restarting (docs/ordering.md)",
                3,
            )
        case TooManyConnections() | BotRemoved() | RelayUnreachable():
            return str(exc), 1
        case RelayRefused() if exc.code is wire.ErrorCode.UNAUTHENTICATED:
            return (
                "the relay refused the bot's token: it was revoked or has expired; ask the"
                " bot's owner for a new credential file (`cozy agent create`)",
                1,
            )
        case ConnectionLost() if exc.code == REVOKED_CLOSE_CODE:
            return (
                "the bot was revoked (the relay closed its connection); ask its owner for a new"
                " credential file (`cozy agent create`)",
                1,
            )
        case RelayRefused():
            return f"the relay refused the bot ({exc.code}): {exc.message}", 1
    return f"{type(exc).__name__}: {exc}", 1
