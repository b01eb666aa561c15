"""Accounts, their sealed keystores, agents and session generations.

`Accounts` is a mixin of `ledger.Ledger`; each method blocks, runs one transaction and raises
only `ledger.errors`. The relay verifies passwords and signatures; this module stores rows and
refuses what would overwrite a newer version (`StaleVersion`) or keys another rotation changed
(`KeysChanged`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import psycopg
import psycopg.errors

from ledger._db import _translated
from ledger.errors import AlreadyExists, HandleTaken, KeysChanged, StaleVersion

if TYPE_CHECKING:
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool

_ACCOUNT_COLUMNS = (
    "SELECT account_id, handle, password_hash, sign_pk, box_pk, kind, created_by,"
    " token_generation, session_generation FROM accounts"
)
_ACCOUNT_BY_HANDLE = _ACCOUNT_COLUMNS + " WHERE handle = %s"
_ACCOUNT_BY_ID = _ACCOUNT_COLUMNS + " WHERE account_id = %s"


class AccountRow(msgspec.Struct, frozen=True):
    account_id: str
    handle: str
    password_hash: str
    sign_pk: bytes
    box_pk: bytes
    kind: str = "human"  # or "agent": created by `created_by`, authenticates with agent tokens
    created_by: str | None = None
    token_generation: int = 0  # agent tokens carry it; revocation bumps it
    session_generation: int = 0  # a person's session tokens carry it; ending sessions bumps it

    def __repr__(self) -> str:
        return f"AccountRow(account_id={self.account_id!r}, handle={self.handle!r})"


class AgentRow(msgspec.Struct, frozen=True):
    """An agent as its creator lists it. `created_at` in seconds since the epoch."""

    account_id: str
    handle: str
    created_at: int
    revoked: bool  # every token issued to it is refused (revocation is final)


class KeystoreRow(msgspec.Struct, frozen=True):
    """A sealed keystore as stored: opaque to the relay, signed by the account key."""

    version: int
    blob: bytes
    sig: bytes

    def __repr__(self) -> str:
        return f"KeystoreRow(version={self.version}, <{len(self.blob)} bytes>)"


class Accounts:
    _pool: ConnectionPool[psycopg.Connection[TupleRow]]

    def create_account(self, row: AccountRow, keystore: KeystoreRow | None = None) -> None:
        """Create the account and, when given, its keystore (version 1) in one transaction."""
        with _translated(), self._pool.connection() as conn:
            try:
                conn.execute(
                    "INSERT INTO accounts (account_id, handle, password_hash, sign_pk, box_pk,"
                    " kind, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (row.account_id, row.handle, row.password_hash, row.sign_pk, row.box_pk,
                     row.kind, row.created_by),
                )  # fmt: skip
                if keystore is not None:
                    conn.execute(
                        "INSERT INTO keystores (account_id, version, blob, sig)"
                        " VALUES (%s, %s, %s, %s)",
                        (row.account_id, keystore.version, keystore.blob, keystore.sig),
                    )
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name == "accounts_handle_key":
                    raise HandleTaken(f"the handle {row.handle!r} is taken; pick another") from exc
                raise AlreadyExists("an account with this id exists already") from exc

    def revoke_agent(self, agent_id: str, creator_id: str) -> int | None:
        """Bump an agent's token generation (every token issued before is refused). Only its
        creator may; returns the new generation, or None when there is no such agent of theirs."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "UPDATE accounts SET token_generation = token_generation + 1"
                " WHERE account_id = %s AND kind = 'agent' AND created_by = %s"
                " RETURNING token_generation",
                (agent_id, creator_id),
            ).fetchone()
        return None if r is None else int(r[0])

    def agents_of(self, creator_id: str, *, limit: int) -> list[AgentRow]:
        """The first `limit` agents `creator_id` created, oldest first, revoked ones included."""
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT account_id, handle, created_at, token_generation > 0 FROM accounts"
                " WHERE kind = 'agent' AND created_by = %s ORDER BY created_at, account_id"
                " LIMIT %s",
                (creator_id, limit),
            ).fetchall()
        return [AgentRow(r[0], r[1], int(r[2].timestamp()), bool(r[3])) for r in rows]

    def end_sessions(self, account_id: str, *, password_hash: str | None = None) -> int | None:
        """Bump a person's session generation, so every session token issued before is refused;
        with `password_hash`, store it as the new login password in the same statement.

        Returns the new generation, or None when there is no such (human) account.
        """
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "UPDATE accounts SET session_generation = session_generation + 1,"
                " password_hash = coalesce(%s, password_hash)"
                " WHERE account_id = %s AND kind = 'human' RETURNING session_generation",
                (password_hash, account_id),
            ).fetchone()
        return None if r is None else int(r[0])

    # --- keystores -----------------------------------------------------------------------------

    def keystore(self, account_id: str) -> KeystoreRow | None:
        """The stored keystore (``blob`` empty once deleted), or None if there never was one."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT version, blob, sig FROM keystores WHERE account_id = %s", (account_id,)
            ).fetchone()
        return None if r is None else KeystoreRow(r[0], bytes(r[1] or b""), bytes(r[2]))

    def put_keystore(self, account_id: str, new: KeystoreRow) -> None:
        """Store `new` if its version is exactly one above the stored one (1 if none).

        The caller has verified the account key's signature. Raises `StaleVersion` naming the
        stored version otherwise; nothing is written then.
        """
        with _translated(), self._pool.connection() as conn:
            self._put_keystore_in(conn, account_id, new)

    @staticmethod
    def _put_keystore_in(conn: psycopg.Connection[Any], account_id: str, new: KeystoreRow) -> None:
        r = conn.execute(
            "SELECT version FROM keystores WHERE account_id = %s FOR UPDATE", (account_id,)
        ).fetchone()
        current = 0 if r is None else int(r[0])
        if new.version != current + 1:
            raise StaleVersion(current)
        conn.execute(
            "INSERT INTO keystores (account_id, version, blob, sig) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (account_id) DO UPDATE SET version = EXCLUDED.version,"
            " blob = EXCLUDED.blob, sig = EXCLUDED.sig, updated_at = now()",
            (account_id, new.version, new.blob or None, new.sig),
        )

    def rotate_account_keys(
        self,
        account_id: str,
        old: tuple[bytes, bytes],
        new: tuple[bytes, bytes],
        keystore: KeystoreRow,
    ) -> None:
        """Replace the account's (sign_pk, box_pk) `old` by `new` and store `keystore` (the
        next version) with them, in one transaction (ADR-0017).

        The caller has verified the old and new keys' signatures. Raises `KeysChanged` when
        the stored keys are not `old` (another rotation won), `StaleVersion` when the keystore
        version is not the next one; nothing is written then.
        """
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT sign_pk, box_pk FROM accounts WHERE account_id = %s FOR UPDATE",
                (account_id,),
            ).fetchone()
            if r is None or (bytes(r[0]), bytes(r[1])) != old:
                raise KeysChanged("the account's keys changed meanwhile")
            self._put_keystore_in(conn, account_id, keystore)
            conn.execute(
                "UPDATE accounts SET sign_pk = %s, box_pk = %s WHERE account_id = %s",
                (new[0], new[1], account_id),
            )

    def account_by_handle(self, handle: str) -> AccountRow | None:
        return self._account("handle", handle)

    def account_by_id(self, account_id: str) -> AccountRow | None:
        return self._account("account_id", account_id)

    def account_handles(self) -> list[str]:
        """Every account's handle (operator tools name lockouts with them)."""
        with _translated(), self._pool.connection() as conn:
            return [str(r[0]) for r in conn.execute("SELECT handle FROM accounts ORDER BY handle")]

    def _account(self, column: str, value: str) -> AccountRow | None:
        query = _ACCOUNT_BY_HANDLE if column == "handle" else _ACCOUNT_BY_ID
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(query, (value,)).fetchone()
        if r is None:
            return None
        return AccountRow(
            r[0], r[1], r[2], bytes(r[3]), bytes(r[4]), r[5], r[6], int(r[7]), int(r[8])
        )
