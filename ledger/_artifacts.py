"""Stored artifacts: uploads in progress, their sealed pieces, and the index of finished ones.

`Artifacts` is a mixin of `ledger.Ledger`; each method blocks, runs one transaction and raises
only `ledger.errors`. The relay checks membership and the content hash; this module stores,
counts bytes against the uploader's quota, and deletes what must not stay.

Life of an upload: `start_upload` files it under its owner (an `uploads` row), each
`put_upload_piece` adds one piece and its bytes — refused with `QuotaExceeded` when the owner's
stored bytes would pass the quota — and `finish_artifact` turns it into an `artifacts` row.
Everything else ends in `drop_upload` (a refusal, a disconnect) or, when no relay is left to
say so (a crash), `sweep_idle_uploads`: either way its pieces are deleted, so a refused or
abandoned upload leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec

from ledger._db import _translated
from ledger.errors import AlreadyExists, QuotaExceeded, UnknownReference

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool

# One advisory-lock namespace for quota checks, so two uploads of one account (on any relay)
# are counted one after the other instead of both passing the check.
_QUOTA_LOCK_CLASS = 0x71756F74  # "quot"


class ArtifactRow(msgspec.Struct, frozen=True):
    upload: str
    size: int
    pieces: int


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep deleted: idle uploads and the pieces that belonged to nothing."""

    uploads: int = 0
    pieces: int = 0


class Artifacts:
    _pool: ConnectionPool[psycopg.Connection[TupleRow]]

    def start_upload(self, upload: str, account_id: str, collab_id: str) -> None:
        """File a new upload under its owner. Raises `AlreadyExists` when the id is in use,
        by an upload in progress or a finished artifact (whoever's): nothing is written then."""
        with _translated(), self._pool.connection() as conn:
            taken = conn.execute(
                "SELECT 1 FROM artifacts WHERE upload = %s"
                " UNION ALL SELECT 1 FROM artifact_pieces WHERE upload = %s LIMIT 1",
                (upload, upload),
            ).fetchone()
            if taken is not None:
                raise AlreadyExists("that upload id is in use")
            conn.execute(
                "INSERT INTO uploads (upload, account_id, collab_id) VALUES (%s, %s, %s)",
                (upload, account_id, collab_id),
            )

    def put_upload_piece(
        self, upload: str, account_id: str, index: int, data: bytes, *, quota: int
    ) -> int:
        """Store one piece of `account_id`'s upload; returns the account's stored bytes after.

        Raises `QuotaExceeded` (nothing written) when the account's finished artifacts plus
        its uploads in progress would hold more than `quota` bytes, and `UnknownReference` when
        the upload is not this account's or is gone (swept as idle): start again.
        """
        with _translated(), self._pool.connection() as conn:
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_QUOTA_LOCK_CLASS, account_id)
            )
            r = conn.execute(
                "UPDATE uploads SET bytes = bytes + %s, touched_at = now()"
                " WHERE upload = %s AND account_id = %s RETURNING bytes",
                (len(data), upload, account_id),
            ).fetchone()
            if r is None:
                raise UnknownReference("no such upload in progress for this account")
            used = _stored_bytes(conn, account_id)
            if used > quota:  # raising rolls the byte count back: nothing is written
                raise QuotaExceeded(used - len(data), quota)
            conn.execute(
                "INSERT INTO artifact_pieces (upload, idx, data) VALUES (%s, %s, %s)",
                (upload, index, data),
            )
        return used

    def stored_bytes(self, account_id: str) -> int:
        """Bytes the account holds: finished artifacts plus uploads in progress."""
        with _translated(), self._pool.connection() as conn:
            return _stored_bytes(conn, account_id)

    def finish_artifact(
        self, collab_id: str, ref: str, upload: str, uploader: str, size: int, pieces: int
    ) -> bool:
        """Record a complete upload under its ref. False (and the new pieces dropped) when the
        collab already holds that ref — the same bytes were uploaded before."""
        with _translated(), self._pool.connection() as conn:
            owned = conn.execute(
                "DELETE FROM uploads WHERE upload = %s AND account_id = %s RETURNING 1",
                (upload, uploader),
            ).fetchone()
            if owned is None:
                raise UnknownReference("no such upload in progress for this account")
            inserted = conn.execute(
                "INSERT INTO artifacts (collab_id, ref, upload, uploader, size, pieces)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (collab_id, ref) DO NOTHING",
                (collab_id, ref, upload, uploader, size, pieces),
            ).rowcount
            if not inserted:
                conn.execute("DELETE FROM artifact_pieces WHERE upload = %s", (upload,))
        return bool(inserted)

    def drop_upload(self, upload: str, account_id: str) -> int:
        """Delete `account_id`'s unfinished upload and all its pieces; returns the pieces
        deleted. Another account's upload and finished artifacts are never touched."""
        with _translated(), self._pool.connection() as conn:
            owned = conn.execute(
                "DELETE FROM uploads WHERE upload = %s AND account_id = %s RETURNING 1",
                (upload, account_id),
            ).fetchone()
            if owned is None:
                return 0
            return conn.execute("DELETE FROM artifact_pieces WHERE upload = %s", (upload,)).rowcount

    def sweep_idle_uploads(self, idle_seconds: float, *, orphans: bool = False) -> SweepReport:
        """Delete uploads that got no piece for `idle_seconds` (their connection is gone: a
        live one would have been dropped with it, so these were left by a crash or by a relay
        that lost its database mid-way), with their pieces.

        With `orphans`, also delete pieces that belong to no upload and no artifact at all. That
        scans every piece, so the relay does it once at start-up, not on every sweep. Safe
        beside running uploads: a piece is only written under its `uploads` row, and a
        finished upload's `artifacts` row is committed in the transaction that drops that row.
        """
        with _translated(), self._pool.connection() as conn:
            gone = [
                str(r[0])
                for r in conn.execute(
                    "DELETE FROM uploads WHERE touched_at < now() - %s RETURNING upload",
                    (timedelta(seconds=idle_seconds),),
                ).fetchall()
            ]
            pieces = 0
            if gone:
                pieces = conn.execute(
                    "DELETE FROM artifact_pieces WHERE upload = ANY(%s)", (gone,)
                ).rowcount
            if orphans:
                pieces += conn.execute(
                    "DELETE FROM artifact_pieces p"
                    " WHERE NOT EXISTS (SELECT 1 FROM uploads u WHERE u.upload = p.upload)"
                    " AND NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.upload = p.upload)"
                ).rowcount
        return SweepReport(len(gone), pieces)

    def artifact(self, collab_id: str, ref: str) -> ArtifactRow | None:
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT upload, size, pieces FROM artifacts WHERE collab_id = %s AND ref = %s",
                (collab_id, ref),
            ).fetchone()
        return None if r is None else ArtifactRow(r[0], r[1], r[2])

    def artifact_pieces(
        self, upload: str, from_index: int, limit: int, max_bytes: int
    ) -> list[bytes]:
        """Pieces from `from_index` on, in order: at most `limit` of them and no more than fit
        in `max_bytes`, except that the first is always included. A download holds one such
        page while its client reads, so the bound is in bytes whatever size the uploader
        chose for its pieces; only the page's own pieces are fetched (sizes come from a
        running sum, which Postgres reads without the data)."""
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT p.data FROM artifact_pieces p JOIN ("
                "  SELECT idx, row_number() OVER w AS rn, sum(octet_length(data)) OVER w AS run"
                "  FROM artifact_pieces WHERE upload = %(upload)s AND idx >= %(from)s"
                "  WINDOW w AS (ORDER BY idx ROWS UNBOUNDED PRECEDING)"
                "  ORDER BY idx LIMIT %(limit)s"
                " ) AS page ON p.upload = %(upload)s AND p.idx = page.idx"
                " WHERE page.rn = 1 OR page.run <= %(bytes)s"
                " ORDER BY p.idx",
                {"upload": upload, "from": from_index, "limit": limit, "bytes": max_bytes},
            ).fetchall()
        return [bytes(r[0]) for r in rows]


def _stored_bytes(conn: psycopg.Connection[TupleRow], account_id: str) -> int:
    r = conn.execute(
        "SELECT (SELECT coalesce(sum(size), 0) FROM artifacts WHERE uploader = %s)"
        " + (SELECT coalesce(sum(bytes), 0) FROM uploads WHERE account_id = %s)",
        (account_id, account_id),
    ).fetchone()
    assert r is not None
    return int(r[0])
