"""Every frame a client sends comes through here: decoded, authorized, then routed to its role.

This is the relay's one authorization point. `_authorize` applies the request type's row of
model/authz.py — who may send it (anyone, any account, people only), for a signed request its
signature by the account key bound at login over this connection's challenge, and for a
collab-scoped request the sender's membership and capability there — before any handler runs.
Handlers only check what the request's own content can tell (the signed events and keystore
writes it carries, keys, hashes).
A request type without a row is refused as `internal` and never reaches a handler.

Every refusal is a typed error frame on that connection (SO-6); an unexpected exception in one
request is logged with an incident id and answered `internal`, and the connection goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from ledger import InvalidInput, LedgerError
from model import authz, wire
from model.envelope import EventBody, decode_body
from model.errors import InvalidEvent
from model.ids import new_id
from model.proofs import verify_request
from relay._context import RequestRefused, refuse, where
from relay._throttle import Throttled

if TYPE_CHECKING:
    from relay._accounts import Accounts
    from relay._artifacts import Artifacts
    from relay._collabs import Collabs
    from relay._connection import Connection
    from relay._frontdoor import FrontDoor
    from relay._sessions import Sessions
    from relay._subscriptions import Subscriptions

log = structlog.get_logger("cozy.relay")


class _Answered(Exception):
    """The authorization point answered the request itself (a stored event's fate)."""


class Dispatcher:
    def __init__(
        self,
        *,
        sessions: Sessions,
        accounts: Accounts,
        collabs: Collabs,
        artifacts: Artifacts,
        subscriptions: Subscriptions,
        front_door: FrontDoor,
    ) -> None:
        self._front_door = front_door
        self._sessions = sessions
        self._accounts = accounts
        self._collabs = collabs
        self._artifacts = artifacts
        self._subscriptions = subscriptions

    async def on_frame(self, conn: Connection, data: bytes | str) -> None:
        if isinstance(data, str):
            refuse(
                conn,
                None,
                wire.ErrorCode.MALFORMED_FRAME,
                "send binary msgpack frames, not text; see docs/protocol.md",
            )
        elif len(data) > wire.MAX_FRAME_BYTES:
            refuse(
                conn,
                None,
                wire.ErrorCode.FRAME_TOO_LARGE,
                f"frame is {len(data)} bytes; the limit is {wire.MAX_FRAME_BYTES}. Nothing was stored.",
            )
        else:
            await self._on_request(conn, data, in_batch=False)

    async def _on_request(self, conn: Connection, data: bytes, *, in_batch: bool) -> None:
        """Decode and run one request; every refusal becomes a typed error frame."""
        rid: int | None = None
        try:
            try:
                req = wire.decode_request(data)
            except wire.MalformedFrame as exc:
                rid = exc.rid
                raise RequestRefused(wire.ErrorCode.MALFORMED_FRAME, str(exc)) from None
            if isinstance(req, wire.Batch):
                if in_batch or len(req.frames) > wire.MAX_BATCH_FRAMES:
                    raise RequestRefused(
                        wire.ErrorCode.MALFORMED_FRAME,
                        f"batches do not nest and hold at most {wire.MAX_BATCH_FRAMES} frames",
                    )
                for raw in req.frames:
                    await self._on_request(conn, bytes(raw), in_batch=True)
                return
            rid = req.rid
            body = await self._authorize(conn, req)
            await self._route(conn, req, body)
        except _Answered:
            pass
        except RequestRefused as exc:
            refuse(conn, rid, exc.code, exc.message)
        except Throttled as exc:
            refuse(conn, rid, wire.ErrorCode.RATE_LIMITED, exc.message)
        except InvalidInput:
            refuse(
                conn,
                rid,
                wire.ErrorCode.INVALID_REQUEST,
                "the request holds a value that cannot be stored (e.g. a NUL character)",
            )
        except LedgerError as exc:
            log.warning("ledger_error", error=type(exc).__name__, rid=rid)
            refuse(
                conn,
                rid,
                wire.ErrorCode.OVERLOADED,
                "the ledger is unavailable right now; retry shortly",
            )
        except Exception as exc:  # noqa: BLE001 — one request's bug must not take the relay down
            incident = new_id("e")
            log.error(
                "request_failed",
                incident=incident,
                rid=rid,
                error=type(exc).__name__,
                where=where(exc),
            )
            refuse(
                conn,
                rid,
                wire.ErrorCode.INTERNAL,
                f"the relay failed on this request (incident {incident}); it is logged for the operator",
            )

    async def _authorize(self, conn: Connection, req: wire.Request) -> EventBody | None:
        """The authorization point: the request's rule against the sender's standing, then the
        request's signature, then the sender's membership and capability in the collab it
        names. Raises `RequestRefused`.

        Returns an append's decoded body (it names the append's collab), else None. A non-member
        resending an event of its own that is stored already is answered here with its stored
        fate when the rule allows it (`own_stored_fate`; `Collabs.answer_if_stored`), and
        `_Answered` is raised.
        """
        rule = authz.rule_for(req)
        standing, ended = self._sessions.standing(conn)
        refusal = authz.decide_sender(rule, standing, ended=ended)
        if refusal is None and rule.signed is authz.Signed.REQUEST:
            assert conn.account_id is not None, "signed rows need a session"
            verified = verify_request(conn.sign_pk, conn.challenge, conn.account_id, req)
            refusal = authz.decide_signature(rule, verified=verified)
        body = None
        if refusal is None and rule.capability is not None:
            body = _append_body(req) if isinstance(req, wire.Append) else None
            collab_id = body.collab_id if body is not None else authz.collab_of(req)
            assert collab_id is not None, "collab-scoped rules name their collab"
            member = await self._collabs.member_view(conn, collab_id)
            refusal = authz.decide_member(
                member,
                authz.needed_capability(rule, req),
                collab_id=collab_id,
                tools=self._collabs.tool_access,
            )
            if (
                refusal is not None
                and rule.own_stored_fate
                and member is None
                and isinstance(req, wire.Append)
                and body is not None
                and await self._collabs.answer_if_stored(conn, req, body)
            ):
                raise _Answered
        if refusal is not None:
            raise RequestRefused(refusal.code, refusal.message)
        return body

    async def _route(self, conn: Connection, req: wire.Request, body: EventBody | None) -> None:
        match req:
            case wire.Append():
                assert body is not None
                await self._collabs.append(conn, req, body)
            case wire.Ping():
                conn.reply(wire.Pong(rid=req.rid))
            case wire.Signup():
                async with self._front_door.answering(conn):  # its login deadline waits
                    await self._accounts.signup(conn, req)
            case wire.Login():
                async with self._front_door.answering(conn):
                    await self._accounts.login(conn, req)
            case wire.Authenticate():
                await self._sessions.authenticate(conn, req)
            case wire.GetAccount():
                await self._accounts.get_account(conn, req)
            case wire.GetKeystore():
                await self._accounts.get_keystore(conn, req)
            case wire.PutKeystore():
                await self._accounts.put_keystore(conn, req)
            case wire.RotateAccountKeys():
                await self._accounts.rotate_account_keys(conn, req)
            case wire.ListCollabs():
                await self._accounts.list_collabs(conn, req)
            case wire.CreateAgent():
                await self._accounts.create_agent(conn, req)
            case wire.RevokeAgent():
                await self._accounts.revoke_agent(conn, req)
            case wire.ListAgents():
                await self._accounts.list_agents(conn, req)
            case wire.ChangePassword():
                await self._accounts.change_password(conn, req)
            case wire.EndSessions():
                await self._accounts.end_sessions(conn, req)
            case wire.CreateCollab():
                await self._collabs.create_collab(conn, req)
            case wire.CallTool():
                self._collabs.call_tool(conn, req)
            case wire.Subscribe():
                self._subscriptions.subscribe(conn, req)
            case wire.Unsubscribe():
                self._subscriptions.unsubscribe(conn, req)
            case wire.PutArtifactChunk():
                await self._artifacts.put_chunk(conn, req)
            case wire.GetArtifact():
                await self._artifacts.get(conn, req)


def _append_body(req: wire.Append) -> EventBody:
    """An append names its collab inside the signed body: decode it before authorizing."""
    try:
        return decode_body(req.event.body)
    except InvalidEvent as exc:
        raise RequestRefused(wire.ErrorCode.INVALID_EVENT, f"{exc}; nothing was stored") from None
