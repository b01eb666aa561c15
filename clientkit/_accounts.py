"""`Client` calls about accounts, keystores, sessions, agents and the broker's tools."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clientkit._connection import ClientCore
from clientkit.errors import RelayRefused, TamperDetected
from model import wire
from model.ids import new_id
from model.proofs import KeyPair, account_rekey_bytes, sign_keystore_write

if TYPE_CHECKING:
    import nacl.signing
    import trio_websocket


class AccountCalls(ClientCore):
    """Accounts, keystores, sessions, agents and tool calls."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        super().__init__(ws)
        self._accounts: dict[str, wire.AccountInfo] = {}

    async def signup(
        self,
        handle: str,
        password: str,
        signing_key: nacl.signing.SigningKey,
        box_pk: bytes,
        *,
        sealed_keystore: bytes = b"",
        account_id: str | None = None,
    ) -> str:
        """Register an account (and, with `sealed_keystore`, store it as version 1)."""
        account_id = account_id or new_id("a")
        keystore_sig = (
            sign_keystore_write(signing_key, account_id, 1, sealed_keystore)
            if sealed_keystore
            else b""
        )
        reply = await self.request(
            lambda rid: wire.Signup(
                rid=rid,
                account_id=account_id,
                handle=handle,
                password=password,
                sign_pk=bytes(signing_key.verify_key),
                box_pk=box_pk,
                keystore=sealed_keystore,
                keystore_sig=keystore_sig,
            ),
            wire.SignedUp,
        )
        return reply.account_id

    async def fetch_keystore(self) -> wire.Keystore:
        """The caller's sealed keystore as stored on the relay (needs only a session)."""
        return await self.request(lambda rid: wire.GetKeystore(rid=rid), wire.Keystore)

    async def store_keystore(
        self, signing_key: nacl.signing.SigningKey, version: int, sealed_keystore: bytes
    ) -> None:
        """Replace the stored keystore with `version` (stored version + 1), signed by the
        account key. Raises `RelayRefused` with code STALE when another device got there first."""
        if self.account_id is None:
            raise RelayRefused(wire.ErrorCode.UNAUTHENTICATED, "log in first")
        sig = sign_keystore_write(signing_key, self.account_id, version, sealed_keystore)
        await self.request(
            lambda rid: wire.PutKeystore(rid=rid, version=version, blob=sealed_keystore, sig=sig),
            wire.KeystoreStored,
        )

    async def rotate_account_keys(
        self,
        old_key: nacl.signing.SigningKey,
        old_box_pk: bytes,
        new_key: nacl.signing.SigningKey,
        new_box_pk: bytes,
        version: int,
        sealed_keystore: bytes,
    ) -> wire.AccountKeysRotated:
        """Replace this account's keys in the relay's directory (ADR-0017), storing
        `sealed_keystore` (sealed to the new keys) as keystore `version` with them. Signed by
        the old key (authority) and the new one (possession). Raises `RelayRefused`: STALE when
        the keys or the keystore changed meanwhile, BAD_SIGNATURE when `old_key` is not the
        registered key."""
        account_id = self._me()
        old = KeyPair(bytes(old_key.verify_key), old_box_pk)
        new = KeyPair(bytes(new_key.verify_key), new_box_pk)
        statement = account_rekey_bytes(account_id, old, new, version, sealed_keystore)
        reply = await self.request(
            lambda rid: wire.RotateAccountKeys(
                rid=rid,
                sign_pk=new.sign_pk,
                box_pk=new.box_pk,
                keystore_version=version,
                keystore=sealed_keystore,
                keystore_sig=sign_keystore_write(new_key, account_id, version, sealed_keystore),
                old_sig=old_key.sign(statement).signature,
                new_sig=new_key.sign(statement).signature,
            ),
            wire.AccountKeysRotated,
        )
        self._accounts.pop(account_id, None)  # the cached directory entry is out of date
        return reply

    async def collabs(self) -> list[str]:
        """The collabs the relay says this account is a member of (it can leave one out)."""
        reply = await self.request(lambda rid: wire.ListCollabs(rid=rid), wire.Collabs)
        return list(reply.collab_ids)

    async def login(self, handle: str, password: str) -> wire.LoggedIn:
        reply = await self.request(
            lambda rid: wire.Login(rid=rid, handle=handle, password=password), wire.LoggedIn
        )
        self.account_id = reply.account_id
        return reply

    async def authenticate(self, token: str) -> str:
        reply = await self.request(
            lambda rid: wire.Authenticate(rid=rid, token=token), wire.Authenticated
        )
        self.account_id = reply.account_id
        return reply.account_id

    async def account(self, account_id: str) -> wire.AccountInfo:
        """Public keys and handle of an account (cached for this connection)."""
        info = self._accounts.get(account_id)
        if info is None:
            info = await self.request(
                lambda rid: wire.GetAccount(rid=rid, account_id=account_id), wire.AccountInfo
            )
            if info.account_id != account_id:
                raise TamperDetected("relay answered for another account", collab_id="-", seq=None)
            self._accounts[account_id] = info
        return info

    async def lookup(self, handle: str) -> wire.AccountInfo:
        """An account by handle, from the relay's directory (use its keys only to add a
        member, after comparing fingerprints; the fold pins them from then on)."""
        info = await self.request(
            lambda rid: wire.GetAccount(rid=rid, handle=handle), wire.AccountInfo
        )
        if info.handle != handle:
            raise TamperDetected("relay answered for another handle", collab_id="-", seq=None)
        return info

    async def create_agent(
        self, account_id: str, handle: str, sign_pk: bytes, box_pk: bytes
    ) -> wire.AgentCreated:
        """Register a bot's account (its keys generated by the caller); returns its token.
        Signed with the key from `use_key`."""
        return await self.request(
            self.signed(
                lambda rid: wire.CreateAgent(
                    rid=rid, account_id=account_id, handle=handle, sign_pk=sign_pk, box_pk=box_pk
                )
            ),
            wire.AgentCreated,
        )

    async def revoke_agent(self, account_id: str) -> None:
        """Invalidate every token of an agent this account created, at once. Signed with the
        key from `use_key`."""
        await self.request(
            self.signed(lambda rid: wire.RevokeAgent(rid=rid, account_id=account_id)),
            wire.AgentRevoked,
        )

    async def list_agents(self) -> list[wire.AgentInfo]:
        """The agents this account created, revoked ones included (a session may ask)."""
        reply = await self.request(lambda rid: wire.ListAgents(rid=rid), wire.Agents)
        return reply.agents

    async def change_password(self, password: str) -> wire.PasswordChanged:
        """Replace the login password. Every other session of the account ends; the reply
        carries this device's new session token. Signed with the key from `use_key`."""
        return await self.request(
            self.signed(lambda rid: wire.ChangePassword(rid=rid, password=password)),
            wire.PasswordChanged,
        )

    async def end_sessions(self) -> None:
        """End every session of this account, this connection's included: every session token
        issued so far stops working. Signed with the key from `use_key`."""
        await self.request(self.signed(lambda rid: wire.EndSessions(rid=rid)), wire.SessionsEnded)

    async def call_tool(
        self, collab_id: str, tool: str, args: dict[str, str] | None = None
    ) -> wire.ToolResult:
        """Have the relay's broker call an operator-declared tool; the secret it uses never
        reaches this client. Raises `RelayRefused` (`unauthorized` without the capability,
        `not_found` for an unknown tool, `tool_failed` with a scrubbed reason,
        `bad_signature` without `use_key`)."""
        return await self.request(
            self.signed(
                lambda rid: wire.CallTool(rid=rid, collab_id=collab_id, tool=tool, args=args or {})
            ),
            wire.ToolResult,
        )
