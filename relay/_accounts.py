"""Accounts: sign-up, login, agents, and the account directory members look each other up in.

Passwords are hashed and verified with Argon2id in worker threads, in the fair turns of the
front door's Argon2 slots (relay/_frontdoor.py); logins are throttled per handle string with
identical answers and identical Argon2 cost whether the handle is unknown, a person's or an
agent's (SO-6). Sign-up, handle lookups and agent creation tell whether a handle exists, so
they are charged to the caller's and the relay's rate budgets first (ADR-0018).
Keys never come from here unsigned: a keystore is stored only with the account key's signature
(model/proofs.py), so a session alone cannot replace it (SO-2), and only when its plaintext KDF
header is at the floor (relay/_keystores.py), so a database thief finds no cheap one to crack.
Failed logins are recorded under a keyed hash of the handle (`_throttle.HandleKeyer`), never
the string typed. Creating and revoking agents, changing the login password and ending sessions
arrive here only with a signature by the account key over the request (checked at the
authorization point, relay/_dispatch.py), so a session alone cannot do them either (SO-5).
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Final

import structlog
import trio

from ledger import AccountRow, AlreadyExists, HandleTaken, KeystoreRow, LedgerError, StaleVersion
from model import wire
from model.ids import is_id
from model.membership import MemberKind
from model.proofs import KeyPair, verify_keystore_write
from relay import _auth, _keystores, _rekey, _throttle
from relay._context import RequestRefused, require_public_keys

if TYPE_CHECKING:
    from relay._connection import Connection
    from relay._context import Services
    from relay._sessions import Sessions

log = structlog.get_logger("cozy.relay")

# An `Agents` reply lists at most this many (about 100 bytes each, well inside a frame).
MAX_LISTED_AGENTS: Final = 1000


class Accounts:
    def __init__(self, services: Services, sessions: Sessions) -> None:
        self._s = services
        self._sessions = sessions
        self._handle_key = _throttle.HandleKeyer(services.config.jwt_signing_key.value)

    async def signup(self, conn: Connection, req: wire.Signup) -> None:
        # Answers whether a handle exists (`handle_taken`): charged before any work.
        self._s.front_door.spend_signup(conn.caller)
        try:
            _auth.check_signup(req.handle, req.password)
        except _auth.AuthError as exc:
            raise RequestRefused(wire.ErrorCode.INVALID_REQUEST, str(exc)) from None
        require_public_keys(req.sign_pk, req.box_pk)
        if not is_id(req.account_id, "a"):
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST, "account_id must look like a_<26 base32 chars>"
            )
        keystore = None
        if req.keystore:
            if not verify_keystore_write(
                req.sign_pk, req.account_id, 1, req.keystore, req.keystore_sig
            ):
                raise RequestRefused(
                    wire.ErrorCode.BAD_SIGNATURE,
                    "the keystore is not signed by the account key being registered",
                )
            _keystores.check_stored_kdf(req.keystore, self._s.config)
            keystore = KeystoreRow(1, req.keystore, req.keystore_sig)
        async with self._s.front_door.argon2.turn("signup", conn.caller):
            password_hash = await trio.to_thread.run_sync(_auth.hash_password, req.password)
        account_id = req.account_id
        await self._create_account(
            AccountRow(account_id, req.handle, password_hash, req.sign_pk, req.box_pk), keystore
        )
        log.info("account_created", account_id=account_id)
        conn.reply(wire.SignedUp(rid=req.rid, account_id=account_id))

    async def login(self, conn: Connection, req: wire.Login) -> None:
        """Throttled per handle string, known or not, with identical answers (SO-6).

        The lock check, the verification and the bookkeeping of its outcome all happen while
        holding one Argon2 slot (taken in the handle's turn, so a flood for one handle cannot
        starve others), and attempts queued behind a failure see the lock it caused: a locked
        handle's password is never verified, however many attempts arrive at once. Every
        attempt that is not locked costs exactly one Argon2 verification, whether the handle
        is unknown, a person's or an agent's (agents have no password and never log in).
        """
        s = self._s
        policy = _throttle.LOGIN_POLICY
        if not _auth.HANDLE_RE.fullmatch(req.handle):
            # No account can have this handle: answer as for any unknown handle, after the same
            # verifier work, without touching the database with arbitrary bytes.
            async with s.front_door.argon2.turn("login", req.handle):
                await trio.to_thread.run_sync(_auth.verify_password, None, req.password)
            s.auth_counters.failed("invalid_credentials")
            raise RequestRefused(wire.ErrorCode.INVALID_CREDENTIALS, "handle or password is wrong")
        async with s.front_door.argon2.turn("login", req.handle):
            handle_key = self._handle_key(req.handle)
            wait = await s.db(s.ledger.login_wait, handle_key)
            if wait > 0:
                s.auth_counters.failed("locked_out")
                raise RequestRefused(wire.ErrorCode.RATE_LIMITED, _throttle.lockout_message(wait))
            row = await s.db(s.ledger.account_by_handle, req.handle)
            # Only a person's account has a password; an agent's handle is verified against
            # the dummy hash like an unknown one, so neither answer nor cost tells them apart.
            stored = row.password_hash if row is not None and row.kind == "human" else None
            ok = await trio.to_thread.run_sync(  # the slot held above bounds the concurrency
                _auth.verify_password, stored, req.password
            )
            if row is None or stored is None or not ok:
                locked_for = await s.db(
                    partial(s.ledger.record_login_failure, policy=policy), handle_key
                )
                s.auth_counters.failed("invalid_credentials", locked=locked_for > 0)
                raise RequestRefused(
                    wire.ErrorCode.INVALID_CREDENTIALS, "handle or password is wrong"
                )
            await s.db(s.ledger.record_login_success, handle_key)
        if _auth.needs_rehash(row.password_hash):
            await self._rehash(row, req.password)
        token, expires = _auth.issue_token(
            s.config.jwt_signing_key.value,
            row.account_id,
            s.config.session_ttl_seconds,
            time.time(),
            session_generation=row.session_generation,
        )
        self._sessions.bind(conn, row, expires)
        conn.reply(
            wire.LoggedIn(rid=req.rid, account_id=row.account_id, token=token, expires_at=expires)
        )

    async def _rehash(self, row: AccountRow, password: str) -> None:
        """Store a hash with today's Argon2id parameters; best effort (the login stands)."""
        s = self._s
        async with s.front_door.argon2.turn("login", row.handle):
            new_hash = await trio.to_thread.run_sync(_auth.hash_password, password)
        try:
            await s.db(
                partial(s.ledger.update_password_hash, replaces=row.password_hash),
                row.account_id,
                new_hash,
            )
        except LedgerError as exc:
            log.warning(
                "password_rehash_failed", account_id=row.account_id, error=type(exc).__name__
            )
        else:
            log.info("password_rehashed", account_id=row.account_id)

    async def get_account(self, conn: Connection, req: wire.GetAccount) -> None:
        s = self._s
        if req.account_id is not None:
            ok = is_id(req.account_id, "a")
            row = await s.db(s.ledger.account_by_id, req.account_id) if ok else None
        elif req.handle is not None:
            # Answers whether a handle exists: charged to the rate budgets. Ids are not (130
            # random bits cannot be guessed, and members must resolve the ids they see).
            s.front_door.spend_handle_lookup(conn.caller)
            ok = bool(_auth.HANDLE_RE.fullmatch(req.handle))
            row = await s.db(s.ledger.account_by_handle, req.handle) if ok else None
        else:
            raise RequestRefused(wire.ErrorCode.INVALID_REQUEST, "give account_id or handle")
        if row is None:
            raise RequestRefused(wire.ErrorCode.NOT_FOUND, "no such account")
        conn.reply(
            wire.AccountInfo(
                rid=req.rid,
                account_id=row.account_id,
                handle=row.handle,
                sign_pk=row.sign_pk,
                box_pk=row.box_pk,
                kind=MemberKind(row.kind),
            )
        )

    async def get_keystore(self, conn: Connection, req: wire.GetKeystore) -> None:
        stored = await self._s.db(self._s.ledger.keystore, self._sessions.account_of(conn))
        if stored is None or not stored.blob:
            raise RequestRefused(wire.ErrorCode.NOT_FOUND, "this account has no stored keystore")
        conn.reply(wire.Keystore(rid=req.rid, version=stored.version, blob=stored.blob))

    async def put_keystore(self, conn: Connection, req: wire.PutKeystore) -> None:
        """Keystore writes need the account key: a stolen session cannot replace, roll back or
        delete the sealed keystore (SO-2)."""
        account_id = self._sessions.account_of(conn)
        if not verify_keystore_write(conn.sign_pk, account_id, req.version, req.blob, req.sig):
            raise RequestRefused(
                wire.ErrorCode.BAD_SIGNATURE, "keystore writes must be signed by your account key"
            )
        if req.blob:  # an empty blob deletes the keystore
            _keystores.check_stored_kdf(req.blob, self._s.config)
        try:
            await self._s.db(
                self._s.ledger.put_keystore,
                account_id,
                KeystoreRow(req.version, req.blob, req.sig),
            )
        except StaleVersion as exc:
            raise RequestRefused(
                wire.ErrorCode.STALE,
                f"the stored keystore is version {exc.current}; fetch it, merge, and write version {exc.current + 1}",
            ) from None
        log.info(
            "keystore_stored", account_id=account_id, version=req.version, deleted=not req.blob
        )
        conn.reply(wire.KeystoreStored(rid=req.rid, version=req.version))

    async def rotate_account_keys(self, conn: Connection, req: wire.RotateAccountKeys) -> None:
        """Replace the account's keys in the directory (ADR-0017, relay/_rekey.py); from then
        on every connection of the account is bound to the new keys."""
        account_id = self._sessions.account_of(conn)
        row = await self._s.db(self._s.ledger.account_by_id, account_id)
        if row is None:
            raise RequestRefused(wire.ErrorCode.UNAUTHENTICATED, "log in again")
        new = await _rekey.rotate_account_keys(
            self._s.db, self._s.ledger.rotate_account_keys, account_id,
            KeyPair(row.sign_pk, row.box_pk), req,
            check_keystore=partial(_keystores.check_stored_kdf, config=self._s.config),
        )  # fmt: skip
        for other in (conn, *self._sessions.connections_of(account_id)):
            other.sign_pk, other.box_pk = new
        log.info("account_keys_rotated", account_id=account_id, version=req.keystore_version)
        conn.reply(wire.AccountKeysRotated(rid=req.rid, keystore_version=req.keystore_version))

    async def list_collabs(self, conn: Connection, req: wire.ListCollabs) -> None:
        account_id = self._sessions.account_of(conn)
        collab_ids = await self._s.db(self._s.ledger.collabs_of, account_id)
        conn.reply(wire.Collabs(rid=req.rid, collab_ids=collab_ids))

    async def _create_account(self, row: AccountRow, keystore: KeystoreRow | None) -> None:
        try:
            await self._s.db(self._s.ledger.create_account, row, keystore)
        except HandleTaken as exc:
            raise RequestRefused(wire.ErrorCode.HANDLE_TAKEN, str(exc)) from None
        except AlreadyExists:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST, "that account id is taken; pick another random id"
            ) from None

    async def create_agent(self, conn: Connection, req: wire.CreateAgent) -> None:
        """A person registers a bot's account (keys generated on the person's device) and gets
        the agent's long-lived, revocable token. What the agent may do in a collab is granted
        separately, by the signed `add` proof with its capabilities."""
        creator = self._sessions.account_of(conn)
        # Answers whether a handle exists (`handle_taken`): charged like a handle lookup.
        self._s.front_door.spend_handle_lookup(conn.caller)
        if not _auth.HANDLE_RE.fullmatch(req.handle) or not is_id(req.account_id, "a"):
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "an agent needs a handle (3-32 of a-z, 0-9, '_', '.', '-') and an a_… id",
            )
        require_public_keys(req.sign_pk, req.box_pk)
        row = AccountRow(
            req.account_id, req.handle, "!agent: no password", req.sign_pk, req.box_pk,
            kind="agent", created_by=creator,
        )  # fmt: skip
        await self._create_account(row, None)
        token, expires = _auth.issue_token(
            self._s.config.jwt_signing_key.value,
            req.account_id,
            _auth.AGENT_TOKEN_TTL,
            agent_generation=0,
        )
        log.info("agent_created", account_id=req.account_id, created_by=creator)
        conn.reply(
            wire.AgentCreated(
                rid=req.rid, account_id=req.account_id, token=token, expires_at=expires
            )
        )

    async def revoke_agent(self, conn: Connection, req: wire.RevokeAgent) -> None:
        """Its creator revokes an agent: every token issued to it stops working at once, its
        connections close and its subscriptions end wherever they are. (Removing it from
        collabs, which rotates their keys, is the creator's signed `remove`, made separately.)"""
        creator = self._sessions.account_of(conn)
        generation = await self._s.db(self._s.ledger.revoke_agent, req.account_id, creator)
        if generation is None:
            raise RequestRefused(wire.ErrorCode.NOT_FOUND, "no agent of yours has that id")
        self._sessions.revoke(req.account_id, "agent revoked by its creator")
        log.info("agent_revoked", account_id=req.account_id, generation=generation)
        conn.reply(wire.AgentRevoked(rid=req.rid, account_id=req.account_id))

    async def list_agents(self, conn: Connection, req: wire.ListAgents) -> None:
        """The caller's agents (at most MAX_LISTED_AGENTS, oldest first): metadata only."""
        rows = await self._s.db(
            partial(self._s.ledger.agents_of, limit=MAX_LISTED_AGENTS),
            self._sessions.account_of(conn),
        )
        agents = [wire.AgentInfo(r.account_id, r.handle, r.created_at, r.revoked) for r in rows]
        conn.reply(wire.Agents(rid=req.rid, agents=agents))

    async def change_password(self, conn: Connection, req: wire.ChangePassword) -> None:
        """Store a new login password (signed by the account key: checked already) and end
        every other session of the account; this connection goes on under a fresh token."""
        s = self._s
        account_id = self._sessions.account_of(conn)
        if len(req.password) < _auth.MIN_PASSWORD_CHARS:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                f"login passwords need at least {_auth.MIN_PASSWORD_CHARS} characters;"
                " nothing was changed",
            )
        # A login-class Argon2 turn, in a lane of its own per account (":" is in no handle), so
        # an account changing its password in a loop gets one turn per round like a handle.
        async with s.front_door.argon2.turn("login", f"password:{account_id}"):
            password_hash = await trio.to_thread.run_sync(_auth.hash_password, req.password)
        generation = await s.db(
            partial(s.ledger.end_sessions, password_hash=password_hash), account_id
        )
        if generation is None:  # pragma: no cover — the row of a bound person's session
            raise RequestRefused(wire.ErrorCode.NOT_FOUND, "no such account")
        token, expires = _auth.issue_token(
            s.config.jwt_signing_key.value,
            account_id,
            s.config.session_ttl_seconds,
            session_generation=generation,
        )
        keep = conn if conn.account_id == account_id else None
        ended = self._sessions.end_account(
            account_id,
            generation,
            "the account's login password was changed: log in again with the new one",
            keep=keep,
        )
        if keep is not None:
            self._sessions.renew(conn, expires)
        log.info("password_changed", account_id=account_id, sessions_ended=ended)
        conn.reply(wire.PasswordChanged(rid=req.rid, token=token, expires_at=expires))

    async def end_sessions(self, conn: Connection, req: wire.EndSessions) -> None:
        """End every session of the caller's account, this one too (signed: checked already).
        Every session token issued so far is refused from now on."""
        account_id = self._sessions.account_of(conn)
        generation = await self._s.db(self._s.ledger.end_sessions, account_id)
        if generation is None:  # pragma: no cover — the row of a bound person's session
            raise RequestRefused(wire.ErrorCode.NOT_FOUND, "no such account")
        conn.reply(wire.SessionsEnded(rid=req.rid))
        ended = self._sessions.end_account(
            account_id, generation, "every session of this account was ended: log in again"
        )
        log.info("sessions_ended", account_id=account_id, sessions_ended=ended)
