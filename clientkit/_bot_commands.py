"""Bot commands: `!weather Paris --days 3` parsed by argparse into `ctx.args`.

A command is declared with `@bot.command(NAME)` and its arguments with `@arg(...)` (the same
arguments as `argparse.ArgumentParser.add_argument`), stacked like click's decorators. What the
person typed is split like a shell line (quotes group words). A bad invocation never reaches the
handler and never stops the bot: it is answered with one line, the command's usage and what was
wrong, where the command came from (a DM gets its answer as a DM).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from clientkit.bot import Context

    Handler = Callable[[Context], Awaitable[None]]

# `@arg` runs before `@bot.command` (decorators apply bottom-up): the arguments wait here,
# keyed by the handler, until its command takes them.
_declared: dict[Callable[..., object], list[tuple[tuple[str, ...], dict[str, Any]]]] = {}


def arg(*names: str, **options: Any) -> Callable[[Handler], Handler]:
    """Declare one argument of a command: `@arg("city", nargs="+")`, `@arg("--days", type=int,
    default=1)`. Put it below `@bot.command(...)`; arguments are added top to bottom."""

    def declare(fn: Handler) -> Handler:
        _declared.setdefault(fn, []).insert(0, (names, options))
        return fn

    return declare


class UsageError(Exception):
    """A command was invoked wrongly; the message is the one-line answer to its author."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting: a bot has no terminal to exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{_one_line(self.format_usage())} ({message})")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(_one_line(message or self.format_usage()))


@dataclass
class Command:
    name: str
    handler: Handler
    help: str = ""
    parser: argparse.ArgumentParser = field(init=False)

    def build(self, prefix: str) -> None:
        self.parser = _Parser(prog=f"{prefix}{self.name}", add_help=False, exit_on_error=False)
        for names, options in _declared.pop(self.handler, []):
            self.parser.add_argument(*names, **options)

    def parse(self, rest: str) -> argparse.Namespace:
        """The arguments in `rest` (what followed the command's name). Raises `UsageError`
        with the line to answer (also for `--help` and an unbalanced quote)."""
        try:
            words = shlex.split(rest)
        except ValueError as exc:
            raise UsageError(f"{self.parser.prog}: {exc} (quote words with spaces)") from None
        if words in (["--help"], ["-h"]):
            about = f" — {self.help}" if self.help else ""
            raise UsageError(_one_line(self.parser.format_usage()) + about)
        try:
            return self.parser.parse_args(words)
        except argparse.ArgumentError as exc:
            raise UsageError(f"{_one_line(self.parser.format_usage())} ({exc})") from None


def split_command(text: str, prefix: str) -> tuple[str, str] | None:
    """(name, the rest) when `text` starts with `prefix` and a word; None otherwise."""
    if not prefix or not text.startswith(prefix):
        return None
    body = text.removeprefix(prefix)
    if not body or body[0].isspace():
        return None
    name, *rest = body.split(maxsplit=1)
    return name, rest[0] if rest else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())
