"""Collabs and their membership as projected from the ledger.

`Collabs` is a mixin of `ledger.Ledger`; each method blocks, runs one transaction and raises
only `ledger.errors`. A collab is created from its verified genesis event together with the
projection rows (`ledger._projection`); lookups answer from those rows, `membership` folds the
events themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import psycopg.errors

from ledger._db import _translated
from ledger._events import _copy_events, _event_row
from ledger._projection import _collab_ids_in, _fold_membership, _write_projection
from ledger.errors import AlreadyExists
from model import chain as chainmod

if TYPE_CHECKING:
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool

    from model.envelope import VerifiedEvent
    from model.membership import Membership


class Collabs:
    _pool: ConnectionPool[psycopg.Connection[TupleRow]]

    def create_collab(self, genesis: VerifiedEvent, membership: Membership) -> chainmod.Head:
        """Create a collab from its verified genesis `mgmt` event (seq 1) and its folded
        membership, in one transaction. Raises `AlreadyExists` if the collab exists."""
        collab_id = genesis.body.collab_id
        head = chainmod.start_of(collab_id)
        chain = chainmod.next_head(head.chain, genesis.event_id)
        with _translated(), self._pool.connection() as conn:
            try:
                conn.execute(
                    "INSERT INTO collabs (collab_id, created_by) VALUES (%s, %s)",
                    (collab_id, genesis.body.actor_id),
                )
            except psycopg.errors.UniqueViolation as exc:
                raise AlreadyExists("that collab exists already") from exc
            _copy_events(conn, [_event_row(collab_id, 1, genesis, chain)])
            _write_projection(conn, membership)
        return chainmod.Head(1, chain)

    def member(self, collab_id: str, account_id: str) -> tuple[str, tuple[str, ...]] | None:
        """(kind, capabilities) of a member as projected, None if not a member."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT kind, caps FROM collab_members WHERE collab_id = %s AND account_id = %s",
                (collab_id, account_id),
            ).fetchone()
        return None if r is None else (str(r[0]), tuple(r[1]))

    def members(self, collab_id: str) -> tuple[int, dict[str, tuple[str, str]]] | None:
        """The projected (epoch, {account: (role, kind)}) of a collab, None if it does not exist."""
        with _translated(), self._pool.connection() as conn:
            r = conn.execute("SELECT epoch FROM collabs WHERE collab_id = %s", (collab_id,))
            row = r.fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT account_id, role, kind FROM collab_members WHERE collab_id = %s",
                (collab_id,),
            ).fetchall()
        return int(row[0]), {a: (role, kind) for a, role, kind in rows}

    def collab_ids(self) -> list[str]:
        with _translated(), self._pool.connection() as conn:
            return _collab_ids_in(conn)

    def membership(self, collab_id: str) -> Membership | None:
        """Fold the collab's `mgmt` events from the ledger (None if it has none)."""
        with _translated(), self._pool.connection() as conn:
            return _fold_membership(conn, collab_id)

    def collabs_of(self, account_id: str) -> list[str]:
        """The collabs the account is a member of, as projected from the ledger."""
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT collab_id FROM collab_members WHERE account_id = %s ORDER BY 1",
                (account_id,),
            ).fetchall()
        return [str(r[0]) for r in rows]
