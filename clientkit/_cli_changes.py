"""Signed membership changes from the CLI (`_manage`): `Session.manage`, with the relay's
refusals of the change itself turned into a message for the user. Posts go straight through
`Session.post`; both resend, never remake, what a lost connection left unacked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clientkit._cli_session import CliError
from clientkit.errors import RelayRefused
from model import wire

if TYPE_CHECKING:
    from collections.abc import Callable

    from clientkit._session import Session
    from model.membership import Operation
    from model.view import CollabView


async def _manage(
    session: Session, collab_id: str, change: Callable[[CollabView], Operation]
) -> tuple[wire.Appended, CollabView]:
    """`Session.manage` against a checked view; if the connection is lost before the ack, the
    same signed proof is sent again on a new connection (a change is never made twice: a
    stored one comes back as a duplicate)."""
    try:
        return await session.manage(collab_id, change)
    except RelayRefused as exc:
        if exc.code in (wire.ErrorCode.UNAUTHORIZED, wire.ErrorCode.INVALID_EVENT):
            raise CliError(f"the change was refused: {exc.message}") from None
        raise
