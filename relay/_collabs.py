"""Collabs: creation from a signed genesis proof, appends handed to the collab's sequencer,
the membership the authorization point asks about, and tool calls through the broker.

Who may send each of these is decided before they get here (relay/_dispatch.py, model/authz.py);
what is checked here is what only the request's own content can tell: the genesis proof's
signature and owner keys, an added member's registered keys, the tool's existence.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import structlog
import trio

from ledger import AlreadyExists
from model import wire
from model.authz import MemberView
from model.chain import start_of
from model.envelope import KIND_MANAGEMENT, EventBody, event_id, verify_event
from model.errors import BadSignature, ModelError
from model.ids import is_id, new_id
from model.membership import (
    CAP_READ,
    AddMember,
    CreateCollab,
    MemberKind,
    Membership,
    Operation,
    ProofRejected,
    RemoveMember,
    SetCaps,
    apply,
    proof_of,
)
from model.proofs import KeyPair
from model.sequencer import Assignment
from relay import _rekey, _stages
from relay._checkpoints import ReceiptsNotReady
from relay._connection import MAX_APPENDS_IN_FLIGHT
from relay._context import RequestRefused, refuse, where
from relay._sequencer import InboxFull, ShuttingDown, Submission, appended
from relay.broker import ToolFailed, UnknownTool, tool_access

if TYPE_CHECKING:
    from relay._connection import Connection
    from relay._context import Services
    from relay._sessions import Sessions

log = structlog.get_logger("cozy.relay")

# A collab's genesis event must be this fresh (ms) when it reaches the relay.
CREATE_COLLAB_MAX_SKEW_MS: Final = 10 * 60 * 1000
# A duplicate found stored before its group reached the collab's tree: wait this long, this many
# times, for the tree to catch up before asking the author to retry.
_RECEIPT_WAIT: Final = 0.01
_RECEIPT_TRIES: Final = 20


class Collabs:
    def __init__(self, services: Services, sessions: Sessions) -> None:
        self._s = services
        self._sessions = sessions
        # Where the operator lets each tool be used, and whether a grant is needed there.
        self.tool_access = tool_access(services.config.tools)

    async def member_view(self, conn: Connection, collab_id: str) -> MemberView | None:
        """The sender's membership in `collab_id` (None: not a member, or no such collab).

        Cached per connection until a change of this account's membership evicts it
        (`changed`). The answer is never older than the last eviction: a lookup during which
        an eviction happened (the connection's membership generation moved while it awaited the
        database) is thrown away and made again, so a removal that commits while a subscribe,
        a tool call or a download is being authorized cannot be overtaken by it (issue 14).
        """
        cached = conn.member_of.get(collab_id)
        if cached is not None:
            return cached
        if not is_id(collab_id, "c"):
            return None
        account_id = self._sessions.account_of(conn)
        while True:
            generation = conn.membership_generation
            found = await self._s.db(self._s.ledger.member, collab_id, account_id)
            if conn.account_id != account_id:
                return None  # the session ended meanwhile: nothing to authorize
            if generation == conn.membership_generation:
                break
        if found is None:
            return None
        kind, caps = found
        view = conn.member_of[collab_id] = MemberView(MemberKind(kind), caps)
        return view

    def changed(self, collab_id: str, op: Operation, after: Membership) -> None:
        """A committed management change: what the relay cached or serves under the membership
        before it must not outlive it (called by the collab's sequencer)."""
        match op:
            case RemoveMember(account_id=account_id):
                self._forget(collab_id, account_id)
                self._s.fanout.evict(collab_id, account_id, "you were removed from this collab")
                log.info("member_removed", collab_id=collab_id, account_id=account_id)
            case SetCaps(account_id=account_id):
                # A grant or revocation takes effect on the member's very next request.
                self._forget(collab_id, account_id)
                if not after.members[account_id].may(CAP_READ):
                    self._s.fanout.evict(
                        collab_id, account_id, "your read capability in this collab was revoked"
                    )
                log.info("member_caps_changed", collab_id=collab_id, account_id=account_id)

    def _forget(self, collab_id: str, account_id: str) -> None:
        """Drop the cached membership on the account's connections, so their next request is
        checked afresh (a lookup racing this one does not write its stale answer back)."""
        for conn in self._sessions.connections_of(account_id):
            conn.member_of.pop(collab_id, None)
            conn.membership_generation += 1

    async def create_collab(self, conn: Connection, req: wire.CreateCollab) -> None:
        """A collab starts with its genesis proof, signed by the creator's account key: a
        session token alone cannot create one, and the relay cannot invent an owner (SO-5)."""
        account_id = self._sessions.account_of(conn)
        try:
            verified = verify_event(req.event, conn.sign_pk)
            body = verified.body
            if body.kind != KIND_MANAGEMENT or body.actor_id != account_id:
                raise ProofRejected("bad_genesis", "send a `create` proof made by your account")
            proof = proof_of(body)
            if not isinstance(proof.op, CreateCollab):
                raise ProofRejected("bad_genesis", "a collab's first event must create it")
            owner = proof.op.owner
            if (owner.sign_pk, owner.box_pk) != (conn.sign_pk, conn.box_pk):
                raise ProofRejected("bad_genesis", "the owner's keys must be your account's keys")
            membership = apply(None, proof, start_of(body.collab_id), actor_id=account_id)
        except BadSignature:
            raise RequestRefused(
                wire.ErrorCode.BAD_SIGNATURE, "collab creation must be signed by your account key"
            ) from None
        except ModelError as exc:
            raise RequestRefused(
                wire.ErrorCode.INVALID_EVENT, f"{exc}; nothing was stored"
            ) from None
        if abs(time.time() * 1000 - body.ts) > CREATE_COLLAB_MAX_SKEW_MS:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "the creation proof is too old or from the future; check your clock",
            )
        try:
            await self._s.db(self._s.ledger.create_collab, verified, membership)
        except AlreadyExists:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "that collab id exists already; pick another random id",
            ) from None
        conn.member_of[body.collab_id] = MemberView(MemberKind.HUMAN, proof.op.owner.caps)
        log.info("collab_created", collab_id=body.collab_id, account_id=account_id)
        conn.reply(wire.CollabCreated(rid=req.rid, collab_id=body.collab_id))

    async def append(self, conn: Connection, req: wire.Append, body: EventBody) -> None:
        """Hand a signed event to its collab's sequencer, which verifies and orders it."""
        if body.actor_id != self._sessions.account_of(conn):
            raise RequestRefused(
                wire.ErrorCode.UNAUTHORIZED, "events must be authored by the logged-in account"
            )
        author_pk = conn.sign_pk
        if body.kind == KIND_MANAGEMENT:
            try:
                op = _operation(body)
                await self._check_addition(op)
                author_pk = _rekey.append_key(op, KeyPair(conn.sign_pk, conn.box_pk))
            except RequestRefused:
                # Checked against the directory as it is now: a change stored before an added
                # member or the sender rotated their keys is answered with its stored fate.
                if await self.answer_if_stored(conn, req, body):
                    return
                raise
        sequencers = self._s.sequencers
        assert sequencers is not None
        # Shed load instead of queueing it: a flood gets `overloaded` at once, and the reader
        # of this connection never waits on a full inbox (which would stall its other requests).
        ticket = conn.admit_append(len(req.event.body))
        if ticket is None:
            raise self._s.overload(
                f"this connection already has {conn.appends_in_flight} appends waiting for their"
                f" acks (at most {MAX_APPENDS_IN_FLIGHT}, 16 MiB): wait for acks, then retry"
            )
        sub = Submission(ticket, req.rid, req.event, body, author_pk)
        if _stages.RECORDER is not None:
            sub.stamps = [_stages.now()]
        try:
            sequencers.submit_nowait(body.collab_id, sub)
        except InboxFull:
            ticket.release()
            raise self._s.overload(
                "this collab receives appends faster than the relay can store them; nothing was"
                " stored: retry after a short pause (appends are idempotent)"
            ) from None
        except ShuttingDown:
            ticket.release()
            raise RequestRefused(
                wire.ErrorCode.SHUTTING_DOWN, "the relay is shutting down; retry on reconnect"
            ) from None

    async def answer_if_stored(self, conn: Connection, req: wire.Append, body: EventBody) -> bool:
        """If the sender's own event `req` is stored already, answer it as a duplicate with its
        stored seq, chain and receipt (an inclusion proof under the collab's current
        checkpoint) and return True; else return False (the caller refuses
        as usual). Only an event the sender names itself the author of, and whose stored
        author is the sender, is answered: a removed member (the authorization point asks for
        a non-member on a row with `own_stored_fate`) learns the fate of its own retried event,
        and nothing of anyone else's."""
        sequencers = self._s.sequencers
        if sequencers is None or not is_id(body.collab_id, "c"):
            return False
        sender = self._sessions.account_of(conn)
        if body.actor_id != sender:
            return False  # no lookup at all for an event the sender does not claim
        eid = event_id(req.event)
        at = (await self._s.db(self._s.ledger.stored_at, [eid])).get(eid)
        if at is None or at.collab_id != body.collab_id or at.actor_id != sender:
            return False
        assignment = Assignment(at.seq, eid, at.chain, duplicate=True)
        for _wait in range(_RECEIPT_TRIES):
            try:
                note, (proof,) = await sequencers.receipts(body.collab_id, [at.seq])
            except ReceiptsNotReady:
                # Committed, and its sequencer is adding the group to the tree right now.
                await trio.sleep(_RECEIPT_WAIT)
                continue
            conn.reply(appended(req.rid, body.collab_id, assignment, note, proof))
            return True
        raise self._s.overload(
            "the relay cannot prove this event stored yet; retry it (appends are idempotent:"
            " a stored event gets its seq back)"
        )

    async def _check_addition(self, op: Operation) -> None:
        """An added member's pinned keys and kind must be that account's (SO-5): every member's
        key is one its owner registered, and an agent's account is never seated as a person
        (who could manage the collab) nor a person's as an agent. The fold itself cannot know
        the directory; clients check the same against `AccountInfo.kind`."""
        if not isinstance(op, AddMember):
            return
        new = op.member
        row = (
            await self._s.db(self._s.ledger.account_by_id, new.account_id)
            if is_id(new.account_id, "a")
            else None
        )
        if row is None or (row.sign_pk, row.box_pk) != (new.sign_pk, new.box_pk):
            raise RequestRefused(
                wire.ErrorCode.INVALID_EVENT,
                "the member to add must be an existing account with exactly its registered"
                " keys; look the account up again",
            )
        if row.kind != new.kind.value:
            raise RequestRefused(
                wire.ErrorCode.INVALID_EVENT,
                f"that account is of kind {row.kind}, but the proof adds it as {new.kind.value};"
                " nothing was stored: add it as what it is (agents with --agent)",
            )

    def call_tool(self, conn: Connection, req: wire.CallTool) -> None:
        """Checked already (the authorization point refuses a tool the relay does not declare:
        model/authz.py reads the same `[tools]` as the broker); the call itself runs beside the
        read loop (it may take seconds)."""
        self._s.start_background(conn, self._call_tool, conn, req)

    async def _call_tool(self, conn: Connection, req: wire.CallTool) -> None:
        try:
            status, body = await self._s.broker.call(req.tool, req.args)
        except ToolFailed as exc:
            refuse(conn, req.rid, wire.ErrorCode.TOOL_FAILED, str(exc))
            return
        except UnknownTool:
            refuse(conn, req.rid, wire.ErrorCode.NOT_FOUND, "no such tool")
            return
        except Exception as exc:  # noqa: BLE001 — a broker bug fails this call, nothing else
            incident = new_id("e")
            log.error("tool_failed", incident=incident, error=type(exc).__name__, where=where(exc))
            refuse(
                conn,
                req.rid,
                wire.ErrorCode.INTERNAL,
                f"the tool call failed inside the relay (incident {incident})",
            )
            return
        log.info("tool_result", tool=req.tool, status=status, account_id=conn.account_id)
        conn.reply(wire.ToolResult(rid=req.rid, status=status, body=body))


def _operation(body: EventBody) -> Operation:
    """The change a `mgmt` event's proof makes, decoded once for the relay's checks of it."""
    try:
        return proof_of(body).op
    except ProofRejected as exc:
        raise RequestRefused(wire.ErrorCode.INVALID_EVENT, f"{exc}; nothing was stored") from None
