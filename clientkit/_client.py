"""The async client: one WebSocket connection to a relay, requests matched by rid.

A reader task owns the socket's receive side and routes every frame: replies go to the waiting
request, pushed events go to their collab's subscription channel. Everything the relay sends is
treated as untrusted: events are verified (author signature, canonical body, collab binding,
contiguous seq, recomputed chain) and decrypted before a caller sees them, and acks are checked
against the relay's signed receipt.

`Client` is put together from one private module per concern: the connection, request/reply
and signing (`_connection.py`), accounts and agents (`_accounts.py`), verified history
(`_history.py`), collab management and the append pipeline (`_appends.py`), artifacts
(`_artifacts.py`). This module opens the connection (`connect`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio
import trio_websocket

from clientkit._accounts import AccountCalls
from clientkit._appends import APPEND_WINDOW as APPEND_WINDOW
from clientkit._appends import AppendCalls
from clientkit._artifacts import ArtifactCalls
from clientkit._history import History as History
from clientkit._transport import CONNECT_TIMEOUT, open_websocket
from clientkit.errors import AccessRefused, RelayIdentityChanged, RelayUnreachable

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class Client(AccountCalls, AppendCalls, ArtifactCalls):
    """A connected client. Make one with `connect`."""


@asynccontextmanager
async def connect(
    url: str, *, pinned_relay_pk: bytes | None = None, access_token: str | None = None
) -> AsyncIterator[Client]:
    """Open a connection; yields once the relay has introduced itself.

    With `pinned_relay_pk`, refuses a relay whose signing key differs (trust on first use).
    `access_token` is a Cloudflare Access token for a relay behind Access (default: the
    COZY_CF_ACCESS_TOKEN environment variable); see `access_headers`. A refused upgrade raises
    `AccessRefused`.
    """
    try:
        async with _connected(url, pinned_relay_pk, access_token) as client:
            yield client
    except BaseExceptionGroup as group:
        # The reader task only ever ends quietly, so a group holds the caller's own error:
        # surface it as itself rather than wrapped.
        if len(group.exceptions) == 1:
            raise _typed_refusal(group.exceptions[0]) from None
        raise
    except trio_websocket.ConnectionRejected as exc:
        raise _typed_refusal(exc) from None


def _typed_refusal(exc: BaseException) -> BaseException:
    """A refused upgrade (Cloudflare Access, SO-6) as `AccessRefused`; anything else as is."""
    if not isinstance(exc, trio_websocket.ConnectionRejected):
        return exc
    text = (exc.body or b"").decode("utf-8", "replace")[:300]
    reason = "".join(c if c.isprintable() else " " for c in text).strip() or "no reason given"
    return AccessRefused(exc.status_code, reason)


@asynccontextmanager
async def _connected(
    url: str, pinned_relay_pk: bytes | None, access_token: str | None
) -> AsyncIterator[Client]:
    async with trio.open_nursery() as nursery:
        try:
            # Close the WebSocket (handshake and all) before cancelling its reader tasks.
            async with open_websocket(url, nursery, access_token=access_token) as ws:
                client = Client(ws)
                nursery.start_soon(client._read_loop)
                with trio.move_on_after(CONNECT_TIMEOUT) as waited:
                    await client._welcome.wait()
                if waited.cancelled_caught:
                    raise RelayUnreachable(
                        f"{url} accepted the connection but did not introduce itself within"
                        f" {CONNECT_TIMEOUT:g} s: is it a CozyLabs relay?"
                    )
                if client._closed is not None:
                    raise client._closed
                if pinned_relay_pk is not None and client.relay_pk != pinned_relay_pk:
                    raise RelayIdentityChanged(
                        "the relay's signing key changed since this device first met it; "
                        "if the operator rotated it on purpose, re-pin with `cozy account login --repin`"
                    )
                yield client
        finally:
            nursery.cancel_scope.cancel()
