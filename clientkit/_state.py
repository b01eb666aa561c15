"""Durable client state in COZY_HOME/state.db (SQLite, WAL): what this device has verified.

A relay must not be able to roll a device back or make it forget a promise, so what the device
verified outlives the process: the last verified head per collab (a later history must pass
through it), and every receipt the relay gave for this device's own appends (an inclusion proof
under its signed checkpoint, or, kept from an older relay, a per-event signature: the history
must later show that event at that seq; two receipts for one position that disagree are an
equivocation proof);
the relay's signed checkpoints it holds per collab (clientkit/_checkpoints.py);
a sealed snapshot of its verified fold per collab (`views`, so a read resumes at the head);
and this device's own author streams (`sent`): every event it signs is kept here *before* it is
sent, so a crash or a lost ack is followed by a resend of those same signed bytes, never by a
new event under a counter already used (clientkit/_outbox.py).
Each write is one transaction; WAL keeps readers and a crash from seeing half a write.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from model.chain import Head
from model.envelope import SignedEvent
from model.equivocation import SignedReceipt, disagree

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
    collab_id  TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    event_id   BLOB NOT NULL,
    chain      BLOB NOT NULL,
    sig        BLOB NOT NULL,
    checkpoint BLOB NOT NULL DEFAULT x'',
    inclusion  BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (collab_id, seq, event_id, chain)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    collab_id TEXT PRIMARY KEY,
    held      BLOB,
    top       BLOB
);
CREATE TABLE IF NOT EXISTS views (
    collab_id TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL,
    chain     BLOB NOT NULL,
    sealed    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sent (
    collab_id TEXT NOT NULL,
    device    TEXT NOT NULL,
    counter   INTEGER NOT NULL,
    event_id  BLOB NOT NULL,
    body      BLOB NOT NULL,
    sig       BLOB NOT NULL,
    intent    BLOB NOT NULL,
    source    INTEGER NOT NULL,
    seq       INTEGER,
    PRIMARY KEY (collab_id, device, counter)
);
"""
# `receipts`: a receipt is `checkpoint` (the relay's signed checkpoint note) with `inclusion`
# (the msgpack list of the event's inclusion proof under it), and `sig` empty (ADR-0020); a row
# kept from an older relay has `sig` (its per-event signature, ADR-0007) and empty `checkpoint`.
# A state.db made before receipts became inclusion proofs gets the two columns added on open
# (`_upgrade`), its rows staying old-shape receipts, which are checked as they always were.
# `sent`: one row per event this device signed in a collab's author stream `device`. `seq` is
# NULL while the outcome is unknown (signed, maybe sent, no ack recorded). `intent` is what the
# caller meant by it (a bot: the event handled and the post's number in that handler; the CLI:
# the content), so a replay finds its earlier event. `source` is the seq a bot was handling (0
# otherwise): rows are pruned once acked, superseded by a later counter, and — for a bot —
# behind the committed cursor.


@dataclass(frozen=True)
class SentEvent:
    """One signed event of this device's author stream, as kept in `sent`."""

    collab_id: str
    device: str
    counter: int
    event_id: bytes
    signed: SignedEvent
    intent: bytes
    source: int
    seq: int | None  # None: the relay's answer was never recorded

    def __repr__(self) -> str:
        return f"SentEvent({self.collab_id}, {self.device}, #{self.counter}, seq={self.seq})"


_SENT_COLUMNS = "collab_id, device, counter, event_id, body, sig, intent, source, seq"


def _sent_row(row: tuple[object, ...]) -> SentEvent:
    c, d, n, e, b, g, i, s, q = row
    return SentEvent(
        str(c),
        str(d),
        int(n),  # type: ignore[call-overload]
        bytes(e),  # type: ignore[call-overload]
        SignedEvent(bytes(b), bytes(g)),  # type: ignore[call-overload]
        bytes(i),  # type: ignore[call-overload]
        int(s),  # type: ignore[call-overload]
        None if q is None else int(q),  # type: ignore[call-overload]
    )


# PRAGMA user_version of a state.db whose `receipts` has the inclusion-proof columns.
_VERSION = 1


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a state.db written by an older client up to `_VERSION` (idempotent)."""
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= _VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(receipts)")}
    for column in ("checkpoint", "inclusion"):
        if column not in columns:
            conn.execute(f"ALTER TABLE receipts ADD COLUMN {column} BLOB NOT NULL DEFAULT x''")
    conn.execute(f"PRAGMA user_version = {_VERSION}")
    conn.execute("COMMIT")


_proof_encoder = msgspec.msgpack.Encoder()
_proof_decoder = msgspec.msgpack.Decoder(list[bytes])


def _receipt_row(collab_id: str, row: tuple[object, ...]) -> SignedReceipt:
    s, e, c, g, n, i = row
    return SignedReceipt(
        collab_id,
        int(s),  # type: ignore[call-overload]
        bytes(e),  # type: ignore[call-overload]
        bytes(c),  # type: ignore[call-overload]
        bytes(g),  # type: ignore[call-overload]
        bytes(n),  # type: ignore[call-overload]
        _proof_decoder.decode(bytes(i)) if i else [],  # type: ignore[call-overload]
    )


_RECEIPT_COLUMNS = "seq, event_id, chain, sig, checkpoint, inclusion"


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
        _upgrade(conn)
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
            # The replies to what is now behind the cursor are never looked up again; only
            # each stream's last event stays (the next counter follows it).
            conn.execute(
                "DELETE FROM sent WHERE collab_id = ? AND seq IS NOT NULL AND source <= ?"
                " AND counter < (SELECT MAX(counter) FROM sent AS last"
                " WHERE last.collab_id = sent.collab_id AND last.device = sent.device)",
                (collab_id, head.seq),
            )
            conn.execute("COMMIT")

    def add_receipt(self, receipt: SignedReceipt) -> SignedReceipt | None:
        """Keep a receipt; return an earlier one for the same position that disagrees with it
        (`model.equivocation.disagree`: the two are then an equivocation proof)."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE collab_id = ? AND seq = ?",  # noqa: S608 — constant columns
                (receipt.collab_id, receipt.seq),
            ).fetchall()
            conn.execute(
                f"INSERT OR IGNORE INTO receipts (collab_id, {_RECEIPT_COLUMNS})"  # noqa: S608 — constant columns
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    receipt.collab_id,
                    receipt.seq,
                    receipt.event_id,
                    receipt.chain,
                    receipt.sig,
                    receipt.checkpoint,
                    _proof_encoder.encode(receipt.inclusion) if receipt.checkpoint else b"",
                ),
            )
            conn.execute("COMMIT")
        for row in rows:
            earlier = _receipt_row(receipt.collab_id, row)
            if disagree(earlier, receipt):
                return earlier
        return None

    def receipts(self, collab_id: str) -> dict[int, SignedReceipt]:
        with closing(self._connect()) as conn:
            rows = conn.execute(
                f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE collab_id = ?",  # noqa: S608 — constant columns
                (collab_id,),
            ).fetchall()
        return {int(row[0]): _receipt_row(collab_id, row) for row in rows}

    # --- this device's verified fold per collab (model/view.py `CollabView.seal`) -------------

    def view(self, collab_id: str) -> tuple[Head, bytes] | None:
        """The sealed snapshot of the collab's fold kept here and the head it was made at;
        None when there is none, or when it is not on the saved head's path (ahead of it, or
        another chain at the same seq): such a row is not this device's last verified work."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT v.seq, v.chain, v.sealed, h.seq, h.chain FROM views AS v"
                " JOIN heads AS h USING (collab_id) WHERE collab_id = ?",
                (collab_id,),
            ).fetchone()
        if row is None:
            return None
        seq, chain, sealed, head_seq, head_chain = row
        if seq > head_seq or (seq == head_seq and bytes(chain) != bytes(head_chain)):
            return None
        return Head(int(seq), bytes(chain)), bytes(sealed)

    def save_view(self, collab_id: str, head: Head, sealed: bytes) -> None:
        """Keep a sealed snapshot of the fold at `head` (a head this device verified and
        saved), replacing the one before."""
        with closing(self._connect()) as conn:
            conn.execute(
                "INSERT INTO views (collab_id, seq, chain, sealed) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (collab_id) DO UPDATE SET seq = excluded.seq,"
                " chain = excluded.chain, sealed = excluded.sealed",
                (collab_id, head.seq, head.chain, sealed),
            )

    # --- the relay's signed checkpoints (clientkit/_checkpoints.py) ---------------------------

    def checkpoints(self, collab_id: str) -> tuple[bytes | None, bytes | None]:
        """The checkpoint notes kept for a collab: (held, top)."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT held, top FROM checkpoints WHERE collab_id = ?", (collab_id,)
            ).fetchone()
        if row is None:
            return None, None
        return (
            None if row[0] is None else bytes(row[0]),
            None if row[1] is None else bytes(row[1]),
        )

    def save_checkpoints(self, collab_id: str, held: bytes | None, top: bytes | None) -> None:
        with closing(self._connect()) as conn:
            conn.execute(
                "INSERT INTO checkpoints (collab_id, held, top) VALUES (?, ?, ?)"
                " ON CONFLICT (collab_id) DO UPDATE SET held = excluded.held, top = excluded.top",
                (collab_id, held, top),
            )
            conn.commit()

    # --- this device's author streams (clientkit/_outbox.py) -----------------------------------

    def last_sent(self, collab_id: str, device: str) -> SentEvent | None:
        """The event with the highest counter this device signed in the stream, stored or not."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                f"SELECT {_SENT_COLUMNS} FROM sent WHERE collab_id = ? AND device = ?"  # noqa: S608 — constant columns
                " ORDER BY counter DESC LIMIT 1",
                (collab_id, device),
            ).fetchone()
        return None if row is None else _sent_row(row)

    def unacked(self, collab_id: str, device: str) -> list[SentEvent]:
        """The stream's signed events whose outcome was never recorded, in counter order."""
        with closing(self._connect()) as conn:
            rows = conn.execute(
                f"SELECT {_SENT_COLUMNS} FROM sent WHERE collab_id = ? AND device = ?"  # noqa: S608 — constant columns
                " AND seq IS NULL ORDER BY counter",
                (collab_id, device),
            ).fetchall()
        return [_sent_row(r) for r in rows]

    def sent_for(self, collab_id: str, device: str, intent: bytes) -> SentEvent | None:
        """The latest event signed for `intent` in the stream, if it is still kept."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                f"SELECT {_SENT_COLUMNS} FROM sent WHERE collab_id = ? AND device = ?"  # noqa: S608 — constant columns
                " AND intent = ? ORDER BY counter DESC LIMIT 1",
                (collab_id, device, intent),
            ).fetchone()
        return None if row is None else _sent_row(row)

    def keep_signed(self, event: SentEvent) -> None:
        """Record a signed event before it is sent (durably: FULL synchronous WAL).
        Raises `sqlite3.IntegrityError` if its counter is taken in the stream."""
        with closing(self._connect()) as conn:
            conn.execute(
                f"INSERT INTO sent ({_SENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",  # noqa: S608 — constant columns
                (
                    event.collab_id,
                    event.device,
                    event.counter,
                    event.event_id,
                    event.signed.body,
                    event.signed.sig,
                    event.intent,
                    event.source,
                ),
            )

    def mark_stored(self, collab_id: str, device: str, counter: int, seq: int) -> None:
        """The relay acked the stream's event `counter` at `seq`; acked events of the stream
        before it that no bot cursor still needs are dropped."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE sent SET seq = ? WHERE collab_id = ? AND device = ? AND counter = ?",
                (seq, collab_id, device, counter),
            )
            cursor = conn.execute(
                "SELECT seq FROM cursors WHERE collab_id = ?", (collab_id,)
            ).fetchone()
            conn.execute(
                "DELETE FROM sent WHERE collab_id = ? AND device = ? AND counter < ?"
                " AND seq IS NOT NULL AND source <= ?",
                (collab_id, device, counter, 0 if cursor is None else int(cursor[0])),
            )
            conn.execute("COMMIT")

    def forget_signed(self, collab_id: str, device: str, counter: int) -> None:
        """The relay refused the stream's event `counter` for good (it is not stored and never
        will be): its counter is free again."""
        with closing(self._connect()) as conn:
            conn.execute(
                "DELETE FROM sent WHERE collab_id = ? AND device = ? AND counter = ?"
                " AND seq IS NULL",
                (collab_id, device, counter),
            )
