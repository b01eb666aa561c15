"""The authorization matrix (SO-5, issue 13): every wire request x every kind of principal,
each cell with one stated outcome, asserted against a real relay.

Rows are the wire's request types (`typing.get_args(wire.Request)`), so a request type added
without its row here — or without its rule in model/authz.RULES — fails this test before it
can be sent by anyone. Columns are the principals an attacker can be:

    anon      never authenticated
    expired   a person's session that ran out while the connection stayed open
    session   a password-only session: the attacker knows carol's login password (so holds her
              session) but not her account key, and signs with a key of their own
    owner     the collab's owner (alice), with no tool grant
    member    a person who is a plain member (bob), with no tool grant
    granted   a person who is a plain member with the `tool:raw` grant (carol)
    outsider  a person who is a member of another collab, not this one (dave)
    removed   a person removed from the collab (erin)
    agent     an agent member with no capability; a_read / a_post / a_tool: with only `read`,
              only `post`, only `tool:raw`; a_out: an agent that is no member of the collab
    revoked   an agent whose token was revoked (it presents the token again)

A cell is `ok` (the request's success reply) or the error code of the refusal. A request is
built honestly for its principal (signed by the principal's own key, against the collab's
current epoch, with fresh ids), so a refusal is the authorization's doing, not a malformed
request's. Each cell runs on a connection of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import time
import typing
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import msgspec
import nacl.public
import nacl.signing
import pytest
import trio
import trio_websocket

from clientkit import _collab, connect
from model import artifacts, authz, keystore, wire
from model import content as contentmod
from model.artifacts import RefHasher
from model.envelope import seal_event
from model.ids import new_id
from model.membership import CAP_POST, CAP_READ, MemberKind, Role
from model.proofs import KeyPair, account_rekey_bytes, sign_keystore_write, sign_request
from relay import _auth
from relay.config import Secret
from tests.broker_harness import bao, tools, upstream, upstream_server
from tests.relay_harness import (
    PASSWORD,
    User,
    grant,
    make_agent,
    relay_config,
    running_relay,
    session,
    sign_up,
)

__all__ = ["bao", "upstream", "upstream_server"]  # fixtures used by name

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

R = typing.TypeVar("R", bound=wire.Request)
OK: Final = "ok"
UNAUTHN: Final = wire.ErrorCode.UNAUTHENTICATED.value
DENIED: Final = wire.ErrorCode.UNAUTHORIZED.value
BADSIG: Final = wire.ErrorCode.BAD_SIGNATURE.value
NOTFOUND: Final = wire.ErrorCode.NOT_FOUND.value
EXPIRES_AFTER: Final = 5  # seconds: the `expired` column's sessions, bound then waited out

COLUMNS: Final = (
    "anon", "expired", "session", "owner", "member", "granted", "outsider", "removed",
    "agent", "a_read", "a_post", "a_tool", "a_out", "revoked",
)  # fmt: skip

# fmt: off
TABLE: Final[dict[type[wire.Request], tuple[str, ...]]] = {
    #                     anon     expired  session   owner   member  granted outsider removed  agent   a_read  a_post  a_tool  a_out   revoked
    wire.Ping:          (OK,      OK,      OK,       OK,     OK,     OK,     OK,      OK,      OK,     OK,     OK,     OK,     OK,     OK),
    wire.Signup:        (OK,      OK,      OK,       OK,     OK,     OK,     OK,      OK,      OK,     OK,     OK,     OK,     OK,     OK),
    wire.Login:         (OK,      OK,      OK,       OK,     OK,     OK,     OK,      OK,      OK,     OK,     OK,     OK,     OK,     OK),
    wire.Authenticate:  (OK,      OK,      OK,       OK,     OK,     OK,     OK,      OK,      OK,     OK,     OK,     OK,     OK,     OK),
    wire.GetAccount:    (UNAUTHN, UNAUTHN, OK,       OK,     OK,     OK,     OK,      OK,      OK,     OK,     OK,     OK,     OK,     UNAUTHN),
    wire.GetKeystore:   (UNAUTHN, UNAUTHN, OK,       OK,     OK,     OK,     OK,      OK,      OK,     OK,     OK,     OK,     OK,     UNAUTHN),
    wire.PutKeystore:   (UNAUTHN, UNAUTHN, BADSIG,   OK,     OK,     OK,     OK,      OK,      OK,     OK,     OK,     OK,     OK,     UNAUTHN),
    wire.CreateCollab:  (UNAUTHN, UNAUTHN, BADSIG,   OK,     OK,     OK,     OK,      OK,      DENIED, DENIED, DENIED, DENIED, DENIED, UNAUTHN),
    wire.CreateAgent:   (UNAUTHN, UNAUTHN, BADSIG,   OK,     OK,     OK,     OK,      OK,      DENIED, DENIED, DENIED, DENIED, DENIED, UNAUTHN),
    wire.RevokeAgent:   (UNAUTHN, UNAUTHN, BADSIG,   OK,     OK,     OK,     OK,      OK,      DENIED, DENIED, DENIED, DENIED, DENIED, UNAUTHN),
    wire.Append:        (UNAUTHN, UNAUTHN, BADSIG,   OK,     OK,     OK,     DENIED,  DENIED,  DENIED, DENIED, OK,     DENIED, DENIED, UNAUTHN),
    wire.Subscribe:     (UNAUTHN, UNAUTHN, OK,       OK,     OK,     OK,     DENIED,  DENIED,  DENIED, OK,     DENIED, DENIED, DENIED, UNAUTHN),
    wire.Unsubscribe:   (UNAUTHN, UNAUTHN, OK,       OK,     OK,     OK,     NOTFOUND, NOTFOUND, NOTFOUND, OK, NOTFOUND, NOTFOUND, NOTFOUND, UNAUTHN),
    wire.GetArtifact:   (UNAUTHN, UNAUTHN, OK,       OK,     OK,     OK,     DENIED,  DENIED,  DENIED, OK,     DENIED, DENIED, DENIED, UNAUTHN),
    wire.PutArtifactChunk: (UNAUTHN, UNAUTHN, BADSIG, OK,    OK,     OK,     DENIED,  DENIED,  DENIED, DENIED, OK,     DENIED, DENIED, UNAUTHN),
    wire.CallTool:      (UNAUTHN, UNAUTHN, BADSIG,   DENIED, DENIED, OK,     DENIED,  DENIED,  DENIED, DENIED, DENIED, OK,     DENIED, UNAUTHN),
    wire.ListCollabs:   (UNAUTHN, UNAUTHN, OK,       OK,     OK,     OK,     OK,      OK,      OK,     OK,     OK,     OK,     OK,     UNAUTHN),
    wire.ListAgents:    (UNAUTHN, UNAUTHN, OK,       OK,     OK,     OK,     OK,      OK,      DENIED, DENIED, DENIED, DENIED, DENIED, UNAUTHN),
    # Sets the same password again, and hands the column its fresh token (the old one is ended).
    wire.ChangePassword: (UNAUTHN, UNAUTHN, BADSIG,  OK,     OK,     OK,     OK,      OK,      DENIED, DENIED, DENIED, DENIED, DENIED, UNAUTHN),
    # A batch is authorized frame by frame: here it carries a CreateCollab.
    wire.Batch:         (UNAUTHN, UNAUTHN, BADSIG,   OK,     OK,     OK,     OK,      OK,      DENIED, DENIED, DENIED, DENIED, DENIED, UNAUTHN),
    # Last: it replaces the principal's account keys.
    wire.RotateAccountKeys: (UNAUTHN, UNAUTHN, BADSIG, OK,   OK,     OK,     OK,      OK,      DENIED, DENIED, DENIED, DENIED, DENIED, UNAUTHN),
    # After the last: it ends every session of the principal's account.
    wire.EndSessions:   (UNAUTHN, UNAUTHN, BADSIG,   OK,     OK,     OK,     OK,      OK,      DENIED, DENIED, DENIED, DENIED, DENIED, UNAUTHN),
}
# fmt: on

# Cells whose stated outcome is not met yet, with the outcome seen today; the test fails as soon
# as one holds, so the entry is removed then. (Empty since per-request signatures, ADR-0019.)
PENDING: Final[dict[tuple[type[wire.Request], str], str]] = {}

# What a request's success looks like (the first reply frame carrying its rid).
SUCCESS: Final[dict[type[wire.Request], type[wire.Reply]]] = {
    wire.Ping: wire.Pong,
    wire.Signup: wire.SignedUp,
    wire.Login: wire.LoggedIn,
    wire.Authenticate: wire.Authenticated,
    wire.GetAccount: wire.AccountInfo,
    wire.GetKeystore: wire.Keystore,
    wire.PutKeystore: wire.KeystoreStored,
    wire.CreateCollab: wire.CollabCreated,
    wire.CreateAgent: wire.AgentCreated,
    wire.RevokeAgent: wire.AgentRevoked,
    wire.Append: wire.Appended,
    wire.Subscribe: wire.Subscribed,
    wire.Unsubscribe: wire.Unsubscribed,
    wire.GetArtifact: wire.ArtifactData,
    wire.PutArtifactChunk: wire.ArtifactStored,
    wire.CallTool: wire.ToolResult,
    wire.Batch: wire.CollabCreated,
    wire.ListCollabs: wire.Collabs,
    wire.RotateAccountKeys: wire.AccountKeysRotated,
    wire.ListAgents: wire.Agents,
    wire.ChangePassword: wire.PasswordChanged,
    wire.EndSessions: wire.SessionsEnded,
}


def _sealed_keystore() -> bytes:
    """A keystore as a client uploads it: opaque to the relay except its plaintext KDF header,
    which must be at the relay's floor (relay/_keystores.py). The relay never derives, so the
    wrapped parts are random bytes here (no Argon2 run per cell)."""
    return keystore.encode_sealed(
        keystore.SealedKeystore(
            v=keystore.KEYSTORE_VERSION,
            kdf=keystore.KdfParams("argon2id13", 3, 256 * 1024 * 1024, secrets.token_bytes(16)),
            wrapped_key=secrets.token_bytes(72),
            sealed=secrets.token_bytes(48),
        )
    )


# --- the world the cells run in ------------------------------------------------------------------


@dataclass
class Principal:
    name: str
    user: User | None  # whose account the connection speaks for; None: nobody's
    token: str | None  # presented with `authenticate` when the cell's connection opens
    sign: nacl.signing.SigningKey  # what the principal signs requests with
    box: nacl.public.PrivateKey
    kind: MemberKind | None = None
    bind_refused: bool = False  # the token is refused (revoked)
    # The session runs out this many seconds after the column starts: long enough to bind
    # every cell's connection, and waited out before any request is sent.
    expires_after: int | None = None

    @property
    def account_id(self) -> str:
        return self.user.account_id if self.user is not None else new_id("a")


@dataclass
class World:
    url: str
    jwt_key: bytes
    owner: User
    collab_id: str
    epoch: int
    key: bytes
    artifact_ref: str
    login_handle: str
    spare_token: str
    spare_agent: str  # an agent of the owner's that cells of non-people try to revoke
    keystore_versions: dict[str, int] = field(default_factory=dict)
    rids: typing.Iterator[int] = field(default_factory=lambda: iter(range(1, 1 << 30)))

    def rid(self) -> int:
        return next(self.rids)


@dataclass
class Build:
    frames: list[wire.Request]  # sent in order; the last one's answer is the cell's outcome
    rid: int  # the rid whose first reply is the outcome
    on_ok: Callable[[wire.Reply], None] | None = None  # called with the success reply


def _stranger() -> tuple[nacl.signing.SigningKey, nacl.public.PrivateKey]:
    return nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()


def _handle() -> str:
    return f"m-{secrets.token_hex(5)}"


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- one request builder per row -------------------------------------------------------------------

if TYPE_CHECKING:
    # A builder makes its row's request honestly for the principal, on the cell's connection
    # (whose welcome a connection-bound signature would sign).
    Builder = Callable[[World, Principal, "Conn"], Awaitable[Build]]


async def _ping(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.Ping(rid=rid)], rid)


async def _signup(w: World, _p: Principal, _conn: Conn) -> Build:
    rid, (sign, box) = w.rid(), _stranger()
    req = wire.Signup(
        rid=rid,
        account_id=new_id("a"),
        handle=_handle(),
        password=PASSWORD,
        sign_pk=bytes(sign.verify_key),
        box_pk=bytes(box.public_key),
    )
    return Build([req], rid)


async def _login(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.Login(rid=rid, handle=w.login_handle, password=PASSWORD)], rid)


async def _authenticate(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.Authenticate(rid=rid, token=w.spare_token)], rid)


async def _get_account(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.GetAccount(rid=rid, handle=w.owner.handle)], rid)


async def _get_keystore(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.GetKeystore(rid=rid)], rid)


async def _put_keystore(w: World, p: Principal, _conn: Conn) -> Build:
    rid, account_id = w.rid(), p.account_id
    version = w.keystore_versions.get(account_id, 0) + 1
    blob = _sealed_keystore()
    sig = sign_keystore_write(p.sign, account_id, version, blob)

    def stored(_reply: wire.Reply) -> None:
        w.keystore_versions[account_id] = version

    return Build([wire.PutKeystore(rid=rid, version=version, blob=blob, sig=sig)], rid, stored)


def _genesis(w: World, p: Principal) -> wire.CreateCollab:
    event, _key = _collab.genesis(
        p.sign, p.account_id, bytes(p.box.public_key), new_id("c"), _now_ms()
    )
    return wire.CreateCollab(rid=w.rid(), event=event)


async def _create_collab(w: World, p: Principal, _conn: Conn) -> Build:
    req = _genesis(w, p)
    return Build([req], req.rid)


async def _batch(w: World, p: Principal, _conn: Conn) -> Build:
    inner = _genesis(w, p)
    return Build([wire.Batch(frames=[msgspec.Raw(wire.encode(inner))])], inner.rid)


def _signed(conn: Conn, p: Principal, request: R) -> R:
    """`request` signed by the principal's own key for the cell's connection (ADR-0019)."""
    assert conn.welcome is not None
    sig = sign_request(p.sign, conn.welcome.challenge, p.account_id, request)
    return msgspec.structs.replace(request, sig=sig)


async def _create_agent(w: World, p: Principal, conn: Conn) -> Build:
    rid, (sign, box) = w.rid(), _stranger()
    req = wire.CreateAgent(
        rid=rid,
        account_id=new_id("a"),
        handle=_handle(),
        sign_pk=bytes(sign.verify_key),
        box_pk=bytes(box.public_key),
    )
    return Build([_signed(conn, p, req)], rid)


async def _revoke_agent(w: World, p: Principal, conn: Conn) -> Build:
    """A person revokes an agent of their own (made just now); anyone else tries the owner's."""
    target = w.spare_agent
    if p.user is not None and p.kind is MemberKind.HUMAN:
        sign, box = _stranger()
        target = new_id("a")
        async with connect(w.url) as side:
            await side.authenticate(p.user.token)
            side.use_key(p.user.signing_key)
            await side.create_agent(
                target, _handle(), bytes(sign.verify_key), bytes(box.public_key)
            )
    rid = w.rid()
    return Build([_signed(conn, p, wire.RevokeAgent(rid=rid, account_id=target))], rid)


async def _append(w: World, p: Principal, _conn: Conn) -> Build:
    event = seal_event(
        signing_key=p.sign,
        collab_key=w.key,
        collab_id=w.collab_id,
        actor_id=p.account_id,
        kind="msg",
        ts=_now_ms(),
        content=contentmod.encode_content(contentmod.Message(text="matrix")),
        epoch=w.epoch,
    )
    rid = w.rid()
    return Build([wire.Append(rid=rid, event=event)], rid)


async def _subscribe(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.Subscribe(rid=rid, collab_id=w.collab_id, follow=False)], rid)


async def _unsubscribe(w: World, _p: Principal, _conn: Conn) -> Build:
    """Ends a subscription the same connection opened first (when it was allowed to)."""
    opened = wire.Subscribe(rid=w.rid(), collab_id=w.collab_id, follow=True)
    rid = w.rid()
    return Build([opened, wire.Unsubscribe(rid=rid, collab_id=w.collab_id)], rid)


async def _get_artifact(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.GetArtifact(rid=rid, collab_id=w.collab_id, ref=w.artifact_ref)], rid)


async def _put_artifact_chunk(w: World, p: Principal, conn: Conn) -> Build:
    data = secrets.token_bytes(64)
    hasher = RefHasher()
    hasher.update(data)
    rid = w.rid()
    req = wire.PutArtifactChunk(
        rid=rid,
        collab_id=w.collab_id,
        upload=secrets.token_urlsafe(16),
        index=0,
        data=data,
        final=True,
        ref=hasher.ref(),
    )
    return Build([_signed(conn, p, req)], rid)


async def _call_tool(w: World, p: Principal, conn: Conn) -> Build:
    rid = w.rid()
    req = wire.CallTool(rid=rid, collab_id=w.collab_id, tool="raw", args={"q": "matrix"})
    return Build([_signed(conn, p, req)], rid)


async def _list_agents(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.ListAgents(rid=rid)], rid)


async def _change_password(w: World, p: Principal, conn: Conn) -> Build:
    """The same password again: the account's other sessions end, and the column goes on with
    the fresh token of the reply."""
    rid = w.rid()

    def renewed(reply: wire.Reply) -> None:
        assert isinstance(reply, wire.PasswordChanged)
        assert p.user is not None
        p.token = p.user.token = reply.token

    req = _signed(conn, p, wire.ChangePassword(rid=rid, password=PASSWORD))
    return Build([req], rid, renewed)


async def _end_sessions(w: World, p: Principal, conn: Conn) -> Build:
    rid = w.rid()
    return Build([_signed(conn, p, wire.EndSessions(rid=rid))], rid)


async def _list_collabs(w: World, _p: Principal, _conn: Conn) -> Build:
    rid = w.rid()
    return Build([wire.ListCollabs(rid=rid)], rid)


async def _rotate_account_keys(w: World, p: Principal, _conn: Conn) -> Build:
    """The principal replaces its account keys (ADR-0017): signed by the registered key (the
    principal's own signing key stands for it) and by the new one, with a keystore for them."""
    rid, account_id = w.rid(), p.account_id
    registered = (
        KeyPair(bytes(p.user.signing_key.verify_key), bytes(p.user.box_key.public_key))
        if p.user is not None
        else KeyPair(bytes(p.sign.verify_key), bytes(p.box.public_key))
    )
    sign, box = _stranger()
    new = KeyPair(bytes(sign.verify_key), bytes(box.public_key))
    version = w.keystore_versions.get(account_id, 0) + 1
    blob = _sealed_keystore()
    statement = account_rekey_bytes(account_id, registered, new, version, blob)
    req = wire.RotateAccountKeys(
        rid=rid,
        sign_pk=new.sign_pk,
        box_pk=new.box_pk,
        keystore_version=version,
        keystore=blob,
        keystore_sig=sign_keystore_write(sign, account_id, version, blob),
        old_sig=p.sign.sign(statement).signature,
        new_sig=sign.sign(statement).signature,
    )

    def rotated(_reply: wire.Reply) -> None:
        w.keystore_versions[account_id] = version
        assert p.user is not None
        p.user.signing_key, p.user.box_key = sign, box
        p.sign, p.box = sign, box  # the column's later requests are signed with the new key

    return Build([req], rid, rotated)


BUILDERS: Final[dict[type[wire.Request], Builder]] = {
    wire.Ping: _ping,
    wire.Signup: _signup,
    wire.Login: _login,
    wire.Authenticate: _authenticate,
    wire.GetAccount: _get_account,
    wire.GetKeystore: _get_keystore,
    wire.PutKeystore: _put_keystore,
    wire.CreateCollab: _create_collab,
    wire.CreateAgent: _create_agent,
    wire.RevokeAgent: _revoke_agent,
    wire.Append: _append,
    wire.Subscribe: _subscribe,
    wire.Unsubscribe: _unsubscribe,
    wire.GetArtifact: _get_artifact,
    wire.PutArtifactChunk: _put_artifact_chunk,
    wire.CallTool: _call_tool,
    wire.Batch: _batch,
    wire.ListCollabs: _list_collabs,
    wire.RotateAccountKeys: _rotate_account_keys,
    wire.ListAgents: _list_agents,
    wire.ChangePassword: _change_password,
    wire.EndSessions: _end_sessions,
}

REQUEST_TYPES: Final = frozenset(typing.get_args(wire.Request))


@pytest.mark.objective("SO-5")
def test_every_request_type_has_its_row_its_rule_and_its_builder() -> None:
    """A new request type fails here until someone states who may send it (model/authz.RULES,
    `decide`) and what each principal gets (TABLE), and builds it (BUILDERS)."""
    assert set(TABLE) == REQUEST_TYPES
    assert set(BUILDERS) == REQUEST_TYPES
    assert set(SUCCESS) == REQUEST_TYPES
    assert set(authz.RULES) == REQUEST_TYPES - {wire.Batch}  # a batch's frames are its rows
    assert all(len(row) == len(COLUMNS) for row in TABLE.values())
    for (row, column), today in PENDING.items():
        assert column in COLUMNS
        assert TABLE[row][COLUMNS.index(column)] != today


# --- running a cell -----------------------------------------------------------------------------


class Conn:
    """A raw connection of one cell: frames of one WebSocket message may answer several
    requests (the relay batches what it has queued), so they are read into a buffer."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._buffer: collections.deque[wire.Reply] = collections.deque()
        self.welcome: wire.Welcome | None = None  # what a connection-bound signature signs

    async def send(self, frame: wire.Request) -> None:
        await self.ws.send_message(wire.encode(frame))

    async def next_frame(self) -> wire.Reply:
        while not self._buffer:
            self._buffer.extend(wire.unbatch_replies(await self.ws.get_message()))  # type: ignore[arg-type]
        return self._buffer.popleft()

    async def answer(self, rid: int) -> wire.Reply:
        """The first frame answering `rid` (pushes and other answers are skipped)."""
        while True:
            frame = await self.next_frame()
            if getattr(frame, "rid", None) == rid:
                return frame


async def _enter(conn: Conn, w: World, p: Principal) -> None:
    """Open the cell's connection as `p`: the relay's welcome, then the principal's token."""
    welcome = await conn.next_frame()
    assert isinstance(welcome, wire.Welcome)
    conn.welcome = welcome
    if p.token is None:
        return
    rid = w.rid()
    await conn.send(wire.Authenticate(rid=rid, token=p.token))
    answer = await conn.answer(rid)
    if p.bind_refused:
        assert isinstance(answer, wire.Error), answer
        assert answer.code is wire.ErrorCode.UNAUTHENTICATED
    else:
        assert isinstance(answer, wire.Authenticated), answer


async def _outcome(conn: Conn, row: type[wire.Request], build: Build) -> str:
    for frame in build.frames:
        await conn.send(frame)
    answer = await conn.answer(build.rid)
    if isinstance(answer, wire.Error):
        return answer.code.value
    if not isinstance(answer, SUCCESS[row]):
        return f"unexpected {type(answer).__name__}"
    if build.on_ok is not None:
        build.on_ok(answer)
    return OK


async def _run_column(w: World, p: Principal) -> dict[type[wire.Request], str]:
    """Every row for one principal, each cell on a connection of its own, in TABLE order.

    A cell's connection is opened right before its request (so a row that ends the account's
    other sessions cannot disturb the next cell), except for an expiring session: then every
    cell's connection is opened and bound first, and the expiry is waited out once.
    """
    seen: dict[type[wire.Request], str] = {}
    if p.expires_after is None:
        for row in TABLE:
            async with trio_websocket.open_websocket_url(w.url) as ws:
                conn = Conn(ws)
                await _enter(conn, w, p)
                seen[row] = await _outcome(conn, row, await BUILDERS[row](w, p, conn))
        return seen
    assert p.user is not None
    now = int(time.time())
    expires_at = now + p.expires_after
    token, _ = _auth.issue_token(w.jwt_key, p.user.account_id, p.expires_after, now)
    p = dataclasses.replace(p, token=token)
    async with AsyncExitStack() as stack:
        conns = []
        for _ in TABLE:
            conn = Conn(await stack.enter_async_context(trio_websocket.open_websocket_url(w.url)))
            await _enter(conn, w, p)
            conns.append(conn)
        assert time.time() < expires_at, "binding the column took longer than the session"
        await trio.sleep(expires_at - time.time() + 0.3)
        for row, conn in zip(TABLE, conns, strict=True):
            seen[row] = await _outcome(conn, row, await BUILDERS[row](w, p, conn))
    return seen


# --- setting up the world -----------------------------------------------------------------------


async def _world(url: str, jwt_key: bytes) -> tuple[World, list[Principal]]:
    alice, bob, carol, dave, erin = [
        await sign_up(url, h) for h in ("alice", "bob", "carol", "dave", "erin")
    ]
    spare = await sign_up(url, "spare")
    cid = alice.collab_id
    async with session(url, alice) as a:
        for person in (bob, carol, erin):
            info = await a.lookup(person.handle)
            new = _collab.member_for(info, Role.MEMBER, MemberKind.HUMAN)
            await a.manage(
                alice.signing_key, alice.box_key, cid, lambda v, m=new: _collab.add(v, m)
            )
        await grant(a, alice, carol.account_id, "tool:raw")
        agents = {
            name: await make_agent(a, alice, caps)
            for name, caps in (
                ("agent", ()),
                ("a_read", (CAP_READ,)),
                ("a_post", (CAP_POST,)),
                ("a_tool", ("tool:raw",)),
                ("revoked", (CAP_READ, CAP_POST)),
            )
        }
        sign, box = _stranger()
        out_id, spare_id = new_id("a"), new_id("a")
        created = await a.create_agent(
            out_id, _handle(), bytes(sign.verify_key), bytes(box.public_key)
        )
        agents["a_out"] = User("a-out", out_id, sign, created.token, cid, alice.collab_key, box)
        await a.create_agent(spare_id, _handle(), bytes(sign.verify_key), bytes(box.public_key))
        await a.revoke_agent(agents["revoked"].account_id)
        await a.manage(
            alice.signing_key, alice.box_key, cid, lambda v: _collab.remove(v, erin.account_id)
        )
        view = await a.read(cid, alice.box_key)
        epoch, key = view.current_key()
        stored = await a.upload_artifact(
            cid, artifacts.seal_stream(key, cid, [b"an attachment for the matrix"])
        )
    world = World(
        url=url,
        jwt_key=jwt_key,
        owner=alice,
        collab_id=cid,
        epoch=epoch,
        key=key,
        artifact_ref=stored.ref,
        login_handle=spare.handle,
        spare_token=spare.token,
        spare_agent=spare_id,
    )
    # Every principal's account holds a stored keystore (version 1) to fetch.
    accounts = [alice, bob, carol, dave, erin, *agents.values()]
    for user in accounts:
        if user is agents["revoked"]:
            continue
        async with connect(url) as c:
            await c.authenticate(user.token)
            await c.store_keystore(user.signing_key, 1, _sealed_keystore())
        world.keystore_versions[user.account_id] = 1

    def own(name: str, user: User, kind: MemberKind) -> Principal:
        return Principal(name, user, user.token, user.signing_key, user.box_key, kind)

    anon_sign, anon_box = _stranger()
    thief_sign, thief_box = _stranger()
    principals = [
        Principal("anon", None, None, anon_sign, anon_box),
        dataclasses.replace(own("expired", bob, MemberKind.HUMAN), expires_after=EXPIRES_AFTER),
        Principal("session", carol, carol.token, thief_sign, thief_box, MemberKind.HUMAN),
        own("owner", alice, MemberKind.HUMAN),
        own("member", bob, MemberKind.HUMAN),
        own("granted", carol, MemberKind.HUMAN),
        own("outsider", dave, MemberKind.HUMAN),
        own("removed", erin, MemberKind.HUMAN),
        *(
            own(n, agents[n], MemberKind.AGENT)
            for n in ("agent", "a_read", "a_post", "a_tool", "a_out")
        ),
        dataclasses.replace(own("revoked", agents["revoked"], MemberKind.AGENT), bind_refused=True),
    ]
    assert [p.name for p in principals] == list(COLUMNS)
    return world, principals


@pytest.mark.objective("SO-5")
async def test_every_request_for_every_principal_gets_its_stated_outcome(
    database_url: str, tmp_path: Path, upstream: int, bao: tuple[str, str]
) -> None:
    config = dataclasses.replace(
        relay_config(database_url, tmp_path / "relay"),
        bao_addr=bao[0],
        bao_token=Secret(bao[1].encode()),
        tools=tools(upstream),
        # Each cell has a connection of its own, and a column's are open at once.
        max_connections_per_account=4 * len(TABLE),
    )
    async with running_relay(config) as relay:
        world, principals = await _world(relay.url, config.jwt_signing_key.value)
        seen: dict[tuple[type[wire.Request], str], str] = {}
        for p in principals:
            with trio.fail_after(120):
                for row, outcome in (await _run_column(world, p)).items():
                    seen[row, p.name] = outcome
    wrong = []
    for row, expected in TABLE.items():
        for column, want in zip(COLUMNS, expected, strict=True):
            got = seen[row, column]
            today = PENDING.get((row, column))
            if today is not None:
                if got != today:
                    wrong.append(
                        f"{row.__name__} x {column}: pending cell now gives {got!r}"
                        f" (stated {want!r}); take it out of PENDING"
                    )
            elif got != want:
                wrong.append(f"{row.__name__} x {column}: got {got!r}, stated {want!r}")
    assert not wrong, "\n".join(wrong)
    assert len(seen) == len(TABLE) * len(COLUMNS)
