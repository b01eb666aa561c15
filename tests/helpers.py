"""Builders shared by the test modules: accounts with real keys, sealed events, databases.

Everything here makes *honest* data with real keys; tests that need dishonest data start from
these and tamper with the result, so every tamper test also shows the honest case passes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from clientkit import _collab
from ledger import AccountRow
from model import _crypto, scrub
from model.chain import start_of
from model.envelope import SignedEvent, VerifiedEvent, seal_event, verify_event
from model.ids import new_id
from model.membership import Member, MemberKind, Operation, Proof, Role, apply, proof_of

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ledger import Ledger
    from model.chain import Head

TS0 = 1_700_000_000_000  # a fixed, realistic timestamp (ms) so tests are deterministic


@dataclass(frozen=True)
class Actor:
    """An account together with the private keys only its client would hold."""

    row: AccountRow
    signing_key: nacl.signing.SigningKey
    box_key: nacl.public.PrivateKey

    @property
    def account_id(self) -> str:
        return self.row.account_id

    @property
    def sign_pk(self) -> bytes:
        return bytes(self.signing_key.verify_key)


def new_actor(handle: str | None = None) -> Actor:
    """A fresh account row and keys, not stored anywhere."""
    signing_key = nacl.signing.SigningKey.generate()
    box_key = nacl.public.PrivateKey.generate()
    account_id = new_id("a")
    row = AccountRow(
        account_id=account_id,
        handle=handle or f"user-{secrets.token_hex(4)}",
        password_hash="$argon2id$test-only$not-a-real-hash",
        sign_pk=bytes(signing_key.verify_key),
        box_pk=bytes(box_key.public_key),
    )
    return Actor(row=row, signing_key=signing_key, box_key=box_key)


def make_account(ledger: Ledger, handle: str | None = None) -> Actor:
    """A fresh account, stored in `ledger`."""
    actor = new_actor(handle)
    ledger.create_account(actor.row)
    return actor


def new_collab_key() -> bytes:
    return _crypto.random_bytes(_crypto.AEAD_KEY_BYTES)


def genesis_of(owner: Actor, collab_id: str | None = None) -> tuple[VerifiedEvent, bytes]:
    """An honest genesis event for a new collab owned by `owner`, and its epoch-0 key."""
    signed, key = _collab.genesis(
        owner.signing_key, owner.account_id, owner.row.box_pk, collab_id or new_id("c"), TS0
    )
    return verify_event(signed, owner.sign_pk), key


def make_collab(ledger: Ledger, owner: Actor) -> tuple[str, bytes]:
    """A fresh collab owned by `owner`, created from its genesis event; returns its id and its
    epoch-0 key (which only clients hold)."""
    genesis, key = genesis_of(owner)
    proof = proof_of(genesis.body)
    ledger.create_collab(
        genesis, apply(None, proof, start_of(proof.collab_id), actor_id=owner.account_id)
    )
    return genesis.body.collab_id, key


def make_event(
    actor: Actor,
    collab_id: str,
    collab_key: bytes,
    *,
    kind: str = "msg",
    ts: int = TS0,
    content: bytes | None = None,
    refs: tuple[str, ...] = (),
) -> SignedEvent:
    """An honestly sealed and signed event. Content defaults to unique random bytes."""
    return seal_event(
        signing_key=actor.signing_key,
        collab_key=collab_key,
        collab_id=collab_id,
        actor_id=actor.account_id,
        kind=kind,
        ts=ts,
        content=secrets.token_bytes(24) if content is None else content,
        refs=refs,
    )


def make_verified(
    actor: Actor,
    collab_id: str,
    collab_key: bytes,
    *,
    kind: str = "msg",
    ts: int = TS0,
    content: bytes | None = None,
    refs: tuple[str, ...] = (),
) -> VerifiedEvent:
    """`make_event`, then `verify_event` — what the relay hands to the ledger."""
    signed = make_event(actor, collab_id, collab_key, kind=kind, ts=ts, content=content, refs=refs)
    return verify_event(signed, actor.sign_pk)


def make_events(
    actor: Actor, collab_id: str, collab_key: bytes, n: int, *, ts: int = TS0
) -> list[VerifiedEvent]:
    """`n` distinct verified events by `actor`, with increasing timestamps."""
    return [make_verified(actor, collab_id, collab_key, ts=ts + i) for i in range(n)]


# --- databases ----------------------------------------------------------------------------------


def with_dbname(conninfo: str, dbname: str) -> str:
    """`conninfo` (URL or key=value form) pointing at database `dbname` instead."""
    return make_conninfo(conninfo, dbname=dbname)


def create_database(admin_url: str, prefix: str, template: str | None = None) -> str:
    """Create a database with a random name (from `template` if given); return its name."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(query)
    return name


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


class Person:
    """Someone with a signing and a box key, who can become a collab member and propose
    management changes (model/membership.py)."""

    def __init__(self, kind: MemberKind = MemberKind.HUMAN) -> None:
        self.key = nacl.signing.SigningKey.generate()
        self.box = nacl.public.PrivateKey.generate()
        self.id = new_id("a")
        self.kind = kind

    def as_member(self, role: Role, caps: tuple[str, ...] | None = None) -> Member:
        """As a member; agents can read and post unless `caps` says otherwise."""
        if caps is None:
            caps = ("read", "post") if self.kind is MemberKind.AGENT else ()
        return Member(
            self.id, role, self.kind, bytes(self.key.verify_key), bytes(self.box.public_key), caps
        )

    def propose(self, op: Operation, head: Head, collab: str) -> Proof:
        return Proof(
            v=1,
            collab_id=collab,
            signer_id=self.id,
            base_seq=head.seq,
            base_chain=head.chain,
            op=op,
        )


# --- leak searches ------------------------------------------------------------------------------


def leak_forms(value: str | bytes) -> set[bytes]:
    """Every form in which a planted value would still be recognisable in a capture: raw, hex
    (both cases) and the secret-only core of its base64 at each of the three offsets (standard
    and URL-safe alphabets); for text also URL-encoded and JSON-escaped (model/scrub.py)."""
    if isinstance(value, str):
        return {form.encode() for form in scrub.encodings(value)}
    forms = {value, value.hex().encode(), value.hex().upper().encode()}
    return forms | {core.encode() for core in scrub._base64_cores(value)}


def find_leaks(haystack: bytes, planted: Mapping[str, str | bytes]) -> list[str]:
    """The names of the planted values found in `haystack` in any of their `leak_forms`."""
    return sorted(
        name
        for name, value in planted.items()
        if any(form in haystack for form in leak_forms(value))
    )
