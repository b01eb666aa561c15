"""Integrity: recompute the ledger from its events and compare with what is stored.

`Integrity` is a mixin of `ledger.Ledger`, behind `cozy relay verify-ledger` and
`rebuild-projections`; its methods block and raise only `ledger.errors`. `verify_ledger`
reports every chain, event id, routing column or signature that does not recompute (it changes
nothing); `rebuild_projections` rewrites the membership projection where the fold differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ledger._db import _translated
from ledger._projection import (
    _collab_ids_in,
    _fold_membership,
    _projection_of,
    _read_projection,
    _write_projection,
)
from model import chain as chainmod
from model.envelope import KIND_MANAGEMENT, SignedEvent, decode_body, event_id, verify_event
from model.errors import ModelError
from model.membership import Membership, apply, proof_of, signer_key

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import psycopg
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool


@dataclass
class ProjectionReport:
    """What `rebuild_projections` found: collabs whose stored projection differed."""

    collabs: int = 0
    repaired: list[str] = field(default_factory=list)


@dataclass
class LedgerReport:
    """What `verify_ledger` found. `ok` only when every collab's chain recomputed exactly."""

    collabs: int = 0
    events: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Integrity:
    _pool: ConnectionPool[psycopg.Connection[TupleRow]]

    def verify_ledger(self, progress: Callable[[str, int], None] | None = None) -> LedgerReport:
        """Recompute every collab's chain, every event id and every author signature."""
        report = LedgerReport()
        with _translated(), self._pool.connection() as conn:
            keys = {
                r[0]: bytes(r[1]) for r in conn.execute("SELECT account_id, sign_pk FROM accounts")
            }
            collabs = _collab_ids_in(conn)
            for collab_id in collabs:
                report.collabs += 1
                head = chainmod.start_of(collab_id)
                with conn.cursor(name="verify_ledger") as cur:
                    cur.itersize = 2000
                    cur.execute(
                        "SELECT seq, event_id, actor_id, kind, ts, body, sig, chain FROM events"
                        " WHERE collab_id = %s ORDER BY seq",
                        (collab_id,),
                    )
                    state: Membership | None = None
                    for seq, eid, actor, kind, ts, body, sig, chain in cur:
                        report.events += 1
                        signed = SignedEvent(bytes(body), bytes(sig))
                        problem = _check_row(
                            collab_id, head, seq, bytes(eid), actor, kind, ts, signed,
                            bytes(chain), _pinned_key(state, actor, kind, signed, keys),
                        )  # fmt: skip
                        if problem:
                            report.problems.append(f"{collab_id} seq {seq}: {problem}")
                        elif kind == KIND_MANAGEMENT:
                            state = _folded(state, signed, head)
                        head = chainmod.Head(seq, bytes(chain))
                if progress is not None:
                    progress(collab_id, head.seq)
            conn.rollback()
        return report

    def rebuild_projections(self, collab_ids: Sequence[str] | None = None) -> ProjectionReport:
        """Recompute membership, roles and epochs from the events; rewrite what differs.

        One transaction per collab, under the collab row's lock, so a concurrent membership
        change either lands before the fold or waits for it.
        """
        report = ProjectionReport()
        if collab_ids is None:
            with _translated(), self._pool.connection() as conn:
                collab_ids = _collab_ids_in(conn)
        for collab_id in collab_ids:
            with _translated(), self._pool.connection() as conn:
                conn.execute("SELECT 1 FROM collabs WHERE collab_id = %s FOR UPDATE", (collab_id,))
                folded = _fold_membership(conn, collab_id)
                if folded is None:
                    continue
                report.collabs += 1
                if _read_projection(conn, collab_id) != _projection_of(folded):
                    _write_projection(conn, folded)
                    report.repaired.append(collab_id)
        return report


def _pinned_key(
    state: Membership | None, actor: str, kind: str, signed: SignedEvent, keys: dict[str, bytes]
) -> bytes:
    """The key an event at this position must verify under: the one the collab's fold pins
    for its author there (a `rekey` changes it, ADR-0017), or for a management event the
    signer key of its proof; the directory's key only where the fold names none."""
    try:
        if kind == KIND_MANAGEMENT:
            return signer_key(state, proof_of(decode_body(signed.body)))
    except ModelError:
        return keys.get(actor, b"")
    member = None if state is None else state.members.get(actor)
    return member.sign_pk if member is not None else keys.get(actor, b"")


def _folded(
    state: Membership | None, signed: SignedEvent, head: chainmod.Head
) -> Membership | None:
    """The membership after a verified `mgmt` event (unchanged if the fold refuses it: that is
    reported by the signature or chain checks, or by rebuild-projections)."""
    try:
        body = decode_body(signed.body)
        return apply(state, proof_of(body), head, actor_id=body.actor_id)
    except ModelError:
        return state


def _check_row(
    collab_id: str,
    head: chainmod.Head,
    seq: int,
    eid: bytes,
    actor: str,
    kind: str,
    ts: int,
    signed: SignedEvent,
    chain: bytes,
    key: bytes,
) -> str | None:
    if event_id(signed) != eid:
        return "event id is not the hash of the stored event"
    try:
        chainmod.advance(head, seq, eid, chain)
        body = decode_body(signed.body)
        if (body.collab_id, body.actor_id, body.kind, body.ts) != (collab_id, actor, kind, ts):
            return "routing columns disagree with the signed body"
        verify_event(signed, key)
    except ModelError as exc:
        return str(exc)
    return None
