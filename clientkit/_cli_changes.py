"""Signed changes to a collab from the CLI: posts in this device's author stream (`_post`,
`_sealer`) and membership proofs (`_manage`), each sent again with the same signed bytes on a
new connection when the old one was lost before the ack (`_after_lost_ack`)."""

from __future__ import annotations

import hashlib
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from clientkit._cli_session import CliError, Unlocked, _connected, _read
from clientkit._outbox import AuthorStream, Sent
from clientkit.errors import ConnectionLost, RelayRefused
from model import content as contentmod
from model import wire
from model.envelope import seal_event
from model.epochs import NotARecipient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from clientkit._client import Client
    from model.envelope import SignedEvent
    from model.membership import Operation
    from model.view import CollabView


async def _post(
    client: Client,
    me: Unlocked,
    collab_id: str,
    seal: tuple[Callable[[CollabView, contentmod.Evidence], SignedEvent], bytes],
) -> Sent:
    """Post in this device's author stream (clientkit/_outbox.py): an event signed by an earlier
    run whose ack was never recorded is sent again first (the same bytes), and if it was made
    for this same content it is the answer (exactly once: a rerun after an interruption does
    not post twice). The new event is kept before it is sent, sealed against a freshly
    verified view; if the key rotated meanwhile, the relay bounces it and it is sealed again
    under the new key (`Client.seal_and_append`).

    If the connection is lost before the ack, the event may be stored: it is sent again on a
    new connection, the same signed bytes kept in the stream, never sealed anew while it may
    be stored (`_after_lost_ack`)."""
    sealer, intent = seal
    view = await _read(client, me, collab_id)
    stream = AuthorStream(me.home.state, collab_id, me.profile.device)
    try:
        return await stream.send(client, me.box_key, sealer, intent=intent, view=view)
    except ConnectionLost as exc:
        if exc.unacked is None:
            raise
        async with _after_lost_ack(me) as again:
            view = await _read(again, me, collab_id)
            return await stream.send(again, me.box_key, sealer, intent=intent, view=view)


@asynccontextmanager
async def _after_lost_ack(me: Unlocked) -> AsyncIterator[Client]:
    """A new connection for resending an event whose ack the lost one never delivered."""
    print(
        "the connection to the relay was lost before it confirmed; sending the same event"
        " again (if it was stored, the relay says so and nothing is stored twice)…",
        file=sys.stderr,
    )
    async with _connected(me) as client:
        yield client


def _sealer(
    me: Unlocked, collab_id: str, content: contentmod.Content, refs: tuple[str, ...] = ()
) -> tuple[Callable[[CollabView, contentmod.Evidence], SignedEvent], bytes]:
    """The sealing of `content` with its evidence, and the intent that names it (a rerun of
    the same command with the same content is the same intent)."""

    def seal(view: CollabView, evidence: contentmod.Evidence) -> SignedEvent:
        try:
            epoch, key = view.current_key()
        except NotARecipient:
            raise CliError(f"you are not a member of {collab_id} any more") from None
        return seal_event(
            signing_key=me.signing_key,
            collab_key=key,
            collab_id=collab_id,
            actor_id=view.account_id,
            kind=contentmod.kind_of(content),
            ts=evidence.clock,
            content=contentmod.encode_content(content, evidence),
            refs=refs,
            epoch=epoch,
        )

    intent = hashlib.sha256(
        b"\0".join(
            [
                b"post",
                collab_id.encode(),
                contentmod.encode_content(content),
                *map(str.encode, refs),
            ]
        )
    ).digest()
    return seal, intent


async def _manage(
    client: Client, me: Unlocked, collab_id: str, change: Callable[[CollabView], Operation]
) -> tuple[wire.Appended, CollabView]:
    """`Client.manage`; if the connection is lost before the ack, the same signed proof is sent
    again on a new connection (a change is never made twice: a stored one comes back as a
    duplicate)."""

    async def manage_on(
        c: Client, resend: SignedEvent | None = None
    ) -> tuple[wire.Appended, CollabView]:
        return await c.manage(
            me.signing_key,
            me.box_key,
            collab_id,
            change,
            past_box_keys=me.past_box_keys,
            own_sign_pks=me.own_sign_pks,
            resend=resend,
        )

    try:
        try:
            return await manage_on(client)
        except ConnectionLost as exc:
            if exc.unacked is None:
                raise
            async with _after_lost_ack(me) as again:
                return await manage_on(again, resend=exc.unacked)
    except RelayRefused as exc:
        if exc.code in (wire.ErrorCode.UNAUTHORIZED, wire.ErrorCode.INVALID_EVENT):
            raise CliError(f"the change was refused: {exc.message}") from None
        raise
