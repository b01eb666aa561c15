"""Durable client state in COZY_HOME/state.db (SQLite, WAL): what this device has verified.

A relay must not be able to roll a device back or make it forget a promise, so what the device
verified outlives the process: the last verified head per collab (a later history must pass
through it), and every receipt the relay signed for this device's own appends (the history must
later show that event at that seq; two receipts for one position are an equivocation proof).
Each write is one transaction; WAL keeps readers and a crash from seeing half a write.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import TYPE_CHECKING

from model.chain import Head
from model.equivocation import SignedReceipt

if TYPE_CHECKING:
    from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (
    collab_id TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL,
    chain     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    collab_id TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts (
    collab_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    event_id  BLOB NOT NULL,
    chain     BLOB NOT NULL,
    sig       BLOB NOT NULL,
    PRIMARY KEY (collab_id, seq, event_id, chain)
);
"""


class ClientState:
    def __init__(self, path: Path) -> None:
        self._path = path

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=10)
        self._path.chmod(0o600)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return conn

    def head(self, collab_id: str) -> Head | None:
        with closing(self._connect()) as conn:
            r = conn.execute("SELECT seq, chain FROM heads WHERE collab_id = ?", (collab_id,))
            row = r.fetchone()
        return None if row is None else Head(int(row[0]), bytes(row[1]))

    def collabs(self) -> list[str]:
        """Every collab this device has verified a head of."""
        with closing(self._connect()) as conn:
            return [str(r[0]) for r in conn.execute("SELECT collab_id FROM heads ORDER BY 1")]

    def save_head(self, collab_id: str, head: Head) -> None:
        """Record a verified head; never moves a collab's head backwards."""
        with closing(self._connect()) as conn:
            conn.execute(
                "INSERT INTO heads (collab_id, seq, chain) VALUES (?, ?, ?)"
                " ON CONFLICT (collab_id) DO UPDATE SET seq = excluded.seq, chain = excluded.chain"
                " WHERE excluded.seq > heads.seq",
                (collab_id, head.seq, head.chain),
            )

    def cursor(self, collab_id: str) -> int:
        """The last seq a bot's handlers finished (0 when none)."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT seq FROM cursors WHERE collab_id = ?", (collab_id,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def commit_cursor(self, collab_id: str, head: Head) -> None:
        """After a handler finished: the cursor and the verified head move together (one
        transaction), so a restart neither skips nor repeats what was handled."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO cursors (collab_id, seq) VALUES (?, ?) ON CONFLICT (collab_id)"
                " DO UPDATE SET seq = excluded.seq WHERE excluded.seq > cursors.seq",
                (collab_id, head.seq),
            )
            conn.execute(
                "INSERT INTO heads (collab_id, seq, chain) VALUES (?, ?, ?)"
                " ON CONFLICT (collab_id) DO UPDATE SET seq = excluded.seq, chain = excluded.chain"
                " WHERE excluded.seq > heads.seq",
                (collab_id, head.seq, head.chain),
            )
            conn.execute("COMMIT")

    def add_receipt(self, receipt: SignedReceipt) -> SignedReceipt | None:
        """Keep a receipt; return an earlier one for the same position that disagrees."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            other = conn.execute(
                "SELECT event_id, chain, sig FROM receipts WHERE collab_id = ? AND seq = ?"
                " AND (event_id != ? OR chain != ?) LIMIT 1",
                (receipt.collab_id, receipt.seq, receipt.event_id, receipt.chain),
            ).fetchone()
            conn.execute(
                "INSERT OR IGNORE INTO receipts (collab_id, seq, event_id, chain, sig)"
                " VALUES (?, ?, ?, ?, ?)",
                (receipt.collab_id, receipt.seq, receipt.event_id, receipt.chain, receipt.sig),
            )
            conn.execute("COMMIT")
        if other is None:
            return None
        return SignedReceipt(
            receipt.collab_id, receipt.seq, bytes(other[0]), bytes(other[1]), bytes(other[2])
        )

    def receipts(self, collab_id: str) -> dict[int, SignedReceipt]:
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT seq, event_id, chain, sig FROM receipts WHERE collab_id = ?", (collab_id,)
            ).fetchall()
        return {
            int(s): SignedReceipt(collab_id, int(s), bytes(e), bytes(c), bytes(g))
            for s, e, c, g in rows
        }
