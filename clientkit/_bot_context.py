"""What a bot handler gets: `Context` (the entry, its author, ways to answer) and the errors
that end a bot. Split from clientkit/bot.py, which sends for it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clientkit.errors import ClientError
from clientkit.errors import NotAMember as NotAMember  # `ctx.dm` to a non-member
from model import content as contentmod

if TYPE_CHECKING:
    from clientkit._client import Client, History
    from clientkit.bot import Bot
    from model import wire
    from model.view import Entry


class BotSetupError(ClientError):
    """The bot cannot start: the message says what to fix."""


class BotRemoved(ClientError):
    """The bot is not (or no longer) a member of its collab: a human must add it again."""


@dataclass(frozen=True)
class Author:
    """Who wrote an entry: the handle the relay's directory gives, and the account id (the
    identity the signature was checked against; handles are for people to read)."""

    handle: str
    account_id: str

    def __str__(self) -> str:
        return self.handle


@dataclass
class Context:
    """What a handler gets: the entry, who wrote it, and ways to answer."""

    bot: Bot
    entry: Entry
    author: Author
    _client: Client
    _history: History
    args: argparse.Namespace = field(default_factory=argparse.Namespace)  # a command's
    _sends: int = 0  # posts and DMs this handler made so far: the n-th is the same on a replay

    @property
    def text(self) -> str:
        """The message's text ("" for a membership change)."""
        content = self.entry.content
        return content.text if isinstance(content, contentmod.Message) else ""

    @property
    def is_dm(self) -> bool:
        """A direct message to the bot (sealed to the pair, read by no other member)."""
        return bool(self.entry.dm_to)

    async def reply(self, text: str) -> int:
        """Answer where the entry came from: a DM to its author if it was a DM (never the
        collab), the collab otherwise. Returns the answer's seq."""
        if self.is_dm:
            return await self.dm(self.author.account_id, text)
        return await self.post(text)

    async def post(self, text: str) -> int:
        """Post `text` to the collab (sealed, signed, with evidence). Returns its seq.

        If the collab key rotated while the handler ran (a member was removed), the relay
        bounces the post and it is sealed again under the new key, never stored under the old.
        """
        return await self.bot._post(self, text)

    async def dm(self, to: str, text: str) -> int:
        """A direct message to one member, by handle or account id, sealed to that member's
        key as the bot's own fold pinned it. Returns its seq. Raises `NotAMember` if `to` is
        not a member of the collab."""
        return await self.bot._dm(self, to, text)

    async def call_tool(self, tool: str, args: dict[str, str] | None = None) -> wire.ToolResult:
        """Have the relay's broker call a tool (needs the `tool:NAME` capability)."""
        return await self._client.call_tool(self.bot.collab_id, tool, args)
