"""The membership projection: each collab's members and epoch as the ledger's `mgmt` events
fold them (`model.membership`), and the `collabs.epoch` / `collab_members` rows that hold the
fold for fast lookups.

Helpers that run inside a caller's transaction; shared by collab creation (`ledger._collabs`),
appends that change membership (`ledger._events`) and the projection rebuild
(`ledger._integrity`). No transaction is opened or committed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model import chain as chainmod
from model.envelope import SignedEvent, decode_body, verify_event
from model.membership import Membership, apply, proof_of, signer_key

if TYPE_CHECKING:
    import psycopg


def _fold_membership(conn: psycopg.Connection[Any], collab_id: str) -> Membership | None:
    rows = conn.execute(
        "SELECT e.seq, e.body, e.sig, p.seq, p.chain FROM events e"
        " LEFT JOIN events p ON p.collab_id = e.collab_id AND p.seq = e.seq - 1"
        " WHERE e.collab_id = %s AND e.kind = 'mgmt' ORDER BY e.seq",
        (collab_id,),
    ).fetchall()
    state: Membership | None = None
    for _seq, body, sig, prev_seq, prev_chain in rows:
        placed_after = (
            chainmod.start_of(collab_id)
            if prev_seq is None
            else chainmod.Head(int(prev_seq), bytes(prev_chain))
        )
        signed = SignedEvent(bytes(body), bytes(sig))
        decoded = decode_body(signed.body)
        proof = proof_of(decoded)
        verify_event(signed, signer_key(state, proof), decoded=decoded)
        state = apply(state, proof, placed_after, actor_id=decoded.actor_id)
    return state


Projection = tuple[int, dict[str, tuple[str, str, tuple[str, ...]]]]


def _projection_of(m: Membership) -> Projection:
    return m.epoch, {a: (x.role.value, x.kind.value, x.caps) for a, x in m.members.items()}


def _read_projection(conn: psycopg.Connection[Any], collab_id: str) -> Projection:
    r = conn.execute("SELECT epoch FROM collabs WHERE collab_id = %s", (collab_id,)).fetchone()
    rows = conn.execute(
        "SELECT account_id, role, kind, caps FROM collab_members WHERE collab_id = %s",
        (collab_id,),
    ).fetchall()
    return (0 if r is None else int(r[0])), {
        str(a): (str(ro), str(k), tuple(c)) for a, ro, k, c in rows
    }


def _write_projection(conn: psycopg.Connection[Any], m: Membership) -> None:
    conn.execute("UPDATE collabs SET epoch = %s WHERE collab_id = %s", (m.epoch, m.collab_id))
    conn.execute("DELETE FROM collab_members WHERE collab_id = %s", (m.collab_id,))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO collab_members (collab_id, account_id, role, kind, caps)"
            " VALUES (%s, %s, %s, %s, %s)",
            [
                (m.collab_id, x.account_id, x.role.value, x.kind.value, list(x.caps))
                for x in m.members.values()
            ],
        )


def _collab_ids_in(conn: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in conn.execute("SELECT collab_id FROM collabs ORDER BY 1")]
