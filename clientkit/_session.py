"""One client session: who is acting, with which unlocked keys, over which connection, and what
this device has verified — the one object the CLI and the bot kit both act through.

`Client` (clientkit/_client.py) is one connection and its wire-level calls: it verifies what the
relay sends but remembers nothing between connections. A `Session` adds what a person or a bot
means by "me": the account's identity, its keys, this device's durable state (`ClientState`:
the saved verified head and the relay's receipts per collab, and the author streams that make
posts exactly once), and the views it verified. Here, and only here:

- **every read is checked** against that state: the history must pass through the head this
  device saved and show each of its receipted events at its seq, or an `IntegrityAlarm` is
  raised before anything is sealed or sent (a rolled-back relay cannot get a post, a DM, an
  attachment, a download or a membership change out of a device that saw more);
- **posts carry ordering evidence** from this device's author stream; posts and DMs are kept
  before they are sent (clientkit/_outbox.py), and content is sealed by one function
  (`_appends.seal_content`);
- **retries**: a `stale` bounce is sealed again against a fresh checked read (the one loop in
  `Client.seal_and_append`), `overloaded` is retried by `Client.append`, and — when the session
  was given a way to `reconnect` — a connection lost before the ack is followed by the same
  signed bytes on a new connection, never by a new sealing.

What does not live here: argument parsing and printing (the CLI's `_cli_*` modules), handler
dispatch and cursors (clientkit/bot.py), and the wire calls themselves (`Client`).
"""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from clientkit import _quorum as quorum
from clientkit._appends import seal_content
from clientkit._outbox import AuthorStream, Sent
from clientkit.errors import (
    ConnectionLost,
    NoSuchAttachment,
    NotAMember,
    PostUnconfirmed,
    QuorumNotMet,
)
from model import artifacts, dm
from model import content as contentmod
from model._crypto import random_bytes
from model.epochs import NotARecipient
from model.view import CollabView
from model.viewsnap import SnapshotRejected

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from contextlib import AbstractAsyncContextManager

    import nacl.public
    import nacl.signing

    from clientkit._client import Client, History
    from clientkit._state import ClientState, SentEvent
    from model import wire
    from model.envelope import SignedEvent
    from model.membership import MemberKind, Operation


@dataclass(frozen=True)
class Identity:
    """Who the session acts as: the account, its handle, and whether it is a person or an
    agent (a bot)."""

    account_id: str
    handle: str
    kind: MemberKind


@dataclass(frozen=True)
class Keys:
    """The account's unlocked keys. `past_box_keys` open what was sealed to the account before a
    key rotation; `own_sign_pks` are every signing key it has had (a `rekey` to any other is an
    alarm). Never printed: the repr names no key."""

    signing_key: nacl.signing.SigningKey = field(repr=False)
    box_key: nacl.public.PrivateKey = field(repr=False)
    past_box_keys: tuple[nacl.public.PrivateKey, ...] = field(default=(), repr=False)
    own_sign_pks: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Attached:
    """A file posted to a collab: its artifact `ref` and the post that carries its key."""

    ref: str
    sent: Sent


class Session:
    """An account acting over one relay connection, with this device's verified state.

    `device` names this device's author stream (docs/ordering.md). `reconnect`, when given,
    opens a new authenticated connection: it is used to resend an event whose ack a lost
    connection never delivered (use the session as ``async with`` then, so those connections
    close with it). Without it a lost connection is raised (`ConnectionLost`), and the caller
    reconnects — as the bot kit does, its author stream resending the kept event.

    `views` holds the last view verified per collab by this session.
    """

    def __init__(
        self,
        client: Client,
        identity: Identity,
        keys: Keys,
        state: ClientState,
        *,
        device: str,
        reconnect: Callable[[], AbstractAsyncContextManager[Client]] | None = None,
    ) -> None:
        self.identity = identity
        self.keys = keys
        self.state = state
        self.device = device
        self.views: dict[str, CollabView] = {}
        self._reconnect = reconnect
        self._connections = AsyncExitStack()
        self.client = client
        self._adopt(client)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._connections.aclose()

    def _adopt(self, client: Client) -> None:
        # Every receipt the relay signs for this device is kept; an earlier one for the same
        # position that disagrees is an equivocation proof (`Client._check_receipt`).
        client.on_receipt = self.state.add_receipt
        # And every signed checkpoint it verified (clientkit/_checkpoints.py).
        client.checkpoints.store = self.state
        self.client = client

    async def _reconnected(self) -> None:
        assert self._reconnect is not None
        self._adopt(await self._connections.enter_async_context(self._reconnect()))

    def _can_resend(self, exc: ConnectionLost) -> bool:
        return exc.unacked is not None and self._reconnect is not None

    # --- the checked read path -----------------------------------------------------------------

    @asynccontextmanager
    async def history(
        self,
        collab_id: str,
        *,
        keys: dict[int, bytes] | None = None,
        follow: bool = False,
        view: CollabView | None = None,
    ) -> AsyncIterator[History]:
        """Verified entries of the collab from the genesis, checked against this device's
        saved head and receipts (`Client.history` with `expect` and `receipts`).

        One pass: entries from before this account's addition to an epoch open all the same
        (the fold holds them until the epoch's key arrives, model/view.py `hold`). The caller
        decides when to save the head (`History.head` is only ever a position that passed every
        check); `read` saves it. `view`, a view this session verified before (a following tail
        after a reconnection), resumes right after its head instead of reading from the genesis
        again.
        """
        async with self.client.history(
            collab_id,
            self.keys.box_key,
            keys=keys,
            expect=self.state.head(collab_id),
            receipts=self.state.receipts(collab_id),
            follow=follow,
            view=view,
            past_box_keys=self.keys.past_box_keys,
            own_sign_pks=self.keys.own_sign_pks,
        ) as events:
            yield events

    async def read(self, collab_id: str) -> CollabView:
        """This account's verified view of the collab up to the relay's head, checked against
        the head this device saved and the receipts it holds; the new head and the fold there
        are saved (`save_view`), and the next read resumes from them (`resume_view`).

        Raises the `IntegrityAlarm` the relay earned (`ForkDetected` for a history that was
        rolled back behind the saved head), and `RelayRefused` (`unauthorized`) for a collab
        this account cannot read.
        """
        start = self.resume_view(collab_id)
        kept = None if start is None else start.head
        async with self.history(collab_id, view=start) as events:
            async for _ in events:
                pass
        self.state.save_head(collab_id, events.head)
        if events.view.head != kept:  # nothing new: the kept fold is this one already
            self.save_view(collab_id, events.view)
        self.views[collab_id] = events.view
        return events.view

    def save_view(self, collab_id: str, view: CollabView) -> None:
        """Keep `view` (verified by this session, its head saved) sealed in this device's
        state, so a later read takes only what came after its head. A view still holding
        content (model/view.py `hold`) is not kept."""
        sealed = view.seal()
        if sealed is not None:
            self.state.save_view(collab_id, view.head, sealed)

    def resume_view(self, collab_id: str, *, before: int | None = None) -> CollabView | None:
        """The fold this device kept (`save_view`), when it opens as this account's own at a
        head on the saved head's path, and (with `before`) ends before that seq; None
        otherwise — the caller reads from the genesis. Nothing the relay says is trusted for
        it: the history after it must still pass through the saved head (`history`'s
        `expect`), and a relay that now ends before it is a rollback (`ForkDetected`)."""
        kept = self.state.view(collab_id)
        if kept is None or (before is not None and kept[0].seq >= before):
            return None
        head, sealed = kept
        try:
            return CollabView.resume(
                sealed,
                head,
                collab_id,
                self.identity.account_id,
                self.keys.box_key,
                past_box_keys=self.keys.past_box_keys,
                own_sign_pks=self.keys.own_sign_pks,
                hold=True,
            )
        except SnapshotRejected:
            return None

    async def verify(
        self, collab_id: str, *, progress: Callable[[int], None] | None = None
    ) -> CollabView:
        """Re-verify the collab's whole history from seq 1 (what `cozy verify` promises: no
        saved shortcut is taken), checked against the saved head and receipts; the new head is
        saved. `progress` is called with the count of events verified so far, now and then."""
        count = 0
        async with self.history(collab_id) as events:
            async for _ in events:
                count += 1
                if progress is not None and count % 500 == 0:
                    progress(count)
        self.state.save_head(collab_id, events.head)
        self.save_view(collab_id, events.view)
        self.views[collab_id] = events.view
        return events.view

    async def _read_on(self, collab_id: str) -> None:
        """`read`, resumed from this session's last view of the collab when it has one (a bot
        confirming each reply does not read from the genesis each time)."""
        view = self.views.get(collab_id)
        if view is None:
            await self.read(collab_id)
            return
        async with self.history(collab_id, view=view) as events:
            async for _ in events:
                pass
        self.state.save_head(collab_id, events.head)

    # --- changes -------------------------------------------------------------------------------

    async def resend_unacked(self, collab_id: str) -> list[SentEvent]:
        """Send again, the same bytes, this device's events in the collab whose ack was never
        recorded (a crash or a lost connection after signing): before anything new is signed.
        Returns those the relay has now stored."""
        stored: list[SentEvent] = []
        for device in (self.device, self.dm_device):
            stream = AuthorStream(self.state, collab_id, device)
            stored += await stream.resend_unacked(self.client)
        return stored

    async def create_collab(self, name: str) -> str:
        """Create a collab owned by this account and post its name; returns its id."""
        collab_id, _key = await self.client.create_collab(
            self.keys.signing_key, bytes(self.keys.box_key.public_key)
        )
        await self.post(collab_id, contentmod.CollabMeta(name=name))
        return collab_id

    async def post(
        self,
        collab_id: str,
        content: contentmod.Content | str,
        *,
        refs: tuple[str, ...] = (),
        intent: bytes | None = None,
        source: int = 0,
        history: History | None = None,
        once: bool = False,
    ) -> Sent:
        """Post `content` (a `str` is a message) in this device's author stream.

        Sealed under the collab key of a freshly checked view (or of `history`'s view: a
        stream of this collab open on this connection, as a bot handler has), with the
        stream's next ordering evidence; kept before it is sent. An earlier event of the stream
        whose ack was never recorded is sent again first, and if it was made for the same
        `intent` it is the answer (`Sent.earlier`): a rerun after an interruption does not post
        twice. `intent` defaults to the collab, content and refs (a rerun of the same command);
        a bot names the entry it answers and passes `source` (that entry's seq) and `once`
        (see `AuthorStream.send`).

        Raises `NotAMember` when this account can no longer seal in the collab.
        """
        if isinstance(content, str):
            content = contentmod.Message(text=content)
        message = content
        signing_key = self.keys.signing_key

        def seal(view: CollabView, evidence: contentmod.Evidence) -> SignedEvent:
            try:
                epoch, key = view.current_key()
            except NotARecipient:
                raise NotAMember(
                    f"you are not a member of {collab_id} any more",
                    collab_id=collab_id,
                    account_id=view.account_id,
                ) from None
            return seal_content(
                signing_key=signing_key,
                collab_key=key,
                epoch=epoch,
                collab_id=collab_id,
                actor_id=view.account_id,
                content=message,
                ts=evidence.clock,
                refs=refs,
                evidence=evidence,
            )

        intent = intent or _intent(b"post", collab_id, content, refs)
        return await self._send(
            AuthorStream(self.state, collab_id, self.device, seen=self.views.get(collab_id)),
            seal,
            intent=intent,
            source=source,
            history=history,
            once=once,
        )

    async def dm(
        self,
        collab_id: str,
        to: str,
        content: contentmod.Content | str,
        *,
        intent: bytes | None = None,
        source: int = 0,
        history: History | None = None,
        once: bool = False,
    ) -> Sent:
        """A direct message to the member `to` (an account id), sealed to their box key as this
        device's verified fold pinned it. Raises `NotAMember` if `to` is not a member there.

        A DM carries no ordering evidence (docs/ordering.md), but it is kept before it is sent
        and resent like a post, in a stream of its own (`dm_device`), with the same `intent`,
        `source`, `history` and `once` (a rerun of the same DM after an interruption, or a bot's
        replayed handler, does not send it twice).
        """
        if isinstance(content, str):
            content = contentmod.Message(text=content)
        body = contentmod.encode_content(content)
        keys = self.keys

        def seal(view: CollabView, evidence: contentmod.Evidence) -> SignedEvent:
            membership = view.membership
            recipient = None if membership is None else membership.members.get(to)
            if membership is None or recipient is None:
                raise NotAMember(
                    f"{to} is not a member of {collab_id}", collab_id=collab_id, account_id=to
                )
            return dm.seal_dm(
                signing_key=keys.signing_key,
                sender_box_key=keys.box_key,
                recipient_box_pk=recipient.box_pk,  # from the fold, never from the directory
                collab_id=collab_id,
                sender_id=view.account_id,
                recipient_id=to,
                ts=evidence.clock,
                epoch=membership.epoch,
                content=body,
            )

        intent = intent or _intent(b"dm", collab_id, content, (to,))
        return await self._send(
            AuthorStream(self.state, collab_id, self.dm_device),
            seal,
            intent=intent,
            source=source,
            history=history,
            once=once,
        )

    @property
    def dm_device(self) -> str:
        """The stream this device's DMs are kept in (they carry no evidence, so no reader
        checks its counters: it only keeps them before they are sent)."""
        return f"{self.device}-dm"

    async def _send(
        self,
        stream: AuthorStream,
        seal: Callable[[CollabView, contentmod.Evidence], SignedEvent],
        *,
        intent: bytes,
        source: int,
        history: History | None,
        once: bool,
    ) -> Sent:
        """The one send of sealed content: against `history`'s view or a freshly checked one,
        kept in `stream` before it is sent, sealed again after a `stale` bounce (against a
        fresh checked read), and — when the session can `reconnect` — resent, the same bytes,
        on a new connection after a lost ack."""
        collab_id = stream.collab_id

        async def send(view: CollabView | None) -> Sent:
            return await stream.send(
                self.client,
                self.keys.box_key,
                seal,
                intent=intent,
                source=source,
                view=view,
                history=history,
                once=once,
                read=lambda: self.read(collab_id),
            )

        try:
            sent = await send(None if history is not None else await self.read(collab_id))
        except ConnectionLost as exc:
            if not self._can_resend(exc):
                raise
            await self._reconnected()
            # The kept event goes out again first (`AuthorStream.send`): the same bytes.
            sent = await send(await self.read(collab_id))
        seen = history.view if history is not None else self.views.get(collab_id)
        if seen is not None and seen.membership is not None and seen.membership.witnesses:
            await self._witnessed(collab_id, sent.seq)
        return sent

    async def _witnessed(self, collab_id: str, seq: int) -> None:
        """In a collab with a witness policy, a post counts as published only once a head the
        witness quorum cosigned includes it: read until one does, for up to `QUORUM_GRACE`.

        Why (docs/ordering.md): the author is the only one who knows of an event the relay
        acked; a relay that then hides it from everyone, witnesses included, shows every other
        member a consistent, freshly cosigned history without it. Here the author finds out at
        once (`PostUnconfirmed`, a `QuorumNotMet`: the event is stored, so a rerun would post
        it again). A relay that hides the event from its own author instead is `WithholdingDetected`
        (the read is checked against the ack's receipt)."""
        deadline = trio.current_time() + quorum.QUORUM_GRACE
        why = "no head the witnesses cosigned includes it"
        while True:
            try:  # refuses a head without the quorum, after the grace
                await self._read_on(collab_id)
            except QuorumNotMet as exc:
                why, deadline = "the witnesses did not cosign the head that includes it", 0.0
                size = exc.size
            else:
                held = self.client.checkpoints.held(self.client.relay_pk, collab_id)
                size = 0 if held is None else held.size
                if size >= seq:
                    return
            if trio.current_time() >= deadline:
                raise PostUnconfirmed(why, collab_id=collab_id, seq=seq, size=size)
            await trio.sleep(quorum.QUORUM_RETRY)

    async def manage(
        self,
        collab_id: str,
        change: Callable[[CollabView], Operation],
        *,
        signing_key: nacl.signing.SigningKey | None = None,
    ) -> tuple[wire.Appended, CollabView]:
        """A management change (add, remove, caps, role, rotate, rekey) against a freshly
        checked view, made again only after a `stale` refusal (`Client.manage`); a change whose
        ack a lost connection never delivered is resent, the same proof, when the session can
        `reconnect`. `signing_key` signs instead of the account's key (a `rekey` is signed by
        the key it replaces). Returns the ack and the view the change was made against."""
        key = signing_key or self.keys.signing_key

        async def read() -> CollabView:
            return await self.read(collab_id)

        async def manage_on(resend: SignedEvent | None = None) -> tuple[wire.Appended, CollabView]:
            return await self.client.manage(
                key, self.keys.box_key, collab_id, change, resend=resend, read=read
            )

        try:
            return await manage_on()
        except ConnectionLost as exc:
            if not self._can_resend(exc):
                raise
            await self._reconnected()
            return await manage_on(resend=exc.unacked)

    # --- files ---------------------------------------------------------------------------------

    async def attach(
        self, collab_id: str, name: str, size: int, pieces: Iterable[bytes]
    ) -> Attached:
        """Seal a file under a fresh file key, upload it piece by piece, and post a reference
        with the file key (under the collab key), so exactly the collab's readers can open it.
        The collab is read (checked) before anything is uploaded."""
        await self.read(collab_id)
        file_key = random_bytes(32)
        stored = await self.client.upload_artifact(
            collab_id, artifacts.seal_stream(file_key, collab_id, pieces)
        )
        attachment = contentmod.Attachment(name=name, size=size, ref=stored.ref, key=file_key)
        return Attached(stored.ref, await self.post(collab_id, attachment, refs=(stored.ref,)))

    async def attachment(self, collab_id: str, ref: str) -> contentmod.Attachment:
        """The attachment event with `ref`, read through this device's checked history (it
        holds the file key). Raises `NoSuchAttachment` if none this account can read has it."""
        found: contentmod.Attachment | None = None
        async with self.history(collab_id) as events:
            async for entry in events:
                if isinstance(entry.content, contentmod.Attachment) and entry.content.ref == ref:
                    found = entry.content
        self.state.save_head(collab_id, events.head)
        if found is None:
            raise NoSuchAttachment(
                f"no attachment you can read in {collab_id} has the ref {ref}",
                collab_id=collab_id,
                ref=ref,
            )
        return found

    @asynccontextmanager
    async def fetch(
        self, collab_id: str, ref: str
    ) -> AsyncIterator[tuple[contentmod.Attachment, AsyncIterator[bytes]]]:
        """The attachment with `ref` and its sealed pieces as the relay sends them: check them
        against the ref and open them with ``attachment.key`` (`model.artifacts.check_ref`,
        `open_stream`)."""
        attachment = await self.attachment(collab_id, ref)
        async with self.client.download_artifact(collab_id, ref) as pieces:
            yield attachment, pieces


def _intent(
    what: bytes, collab_id: str, content: contentmod.Content, refs: tuple[str, ...]
) -> bytes:
    """What a post or DM is for, by default: the same content with the same refs (for a DM,
    the recipient) in the same collab — a rerun of the same command — is the same intent."""
    return hashlib.sha256(
        b"\0".join(
            [what, collab_id.encode(), contentmod.encode_content(content), *map(str.encode, refs)]
        )
    ).digest()
