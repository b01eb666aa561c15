"""Stored artifacts: sealed pieces as uploaded, and the index of finished uploads.

`Artifacts` is a mixin of `ledger.Ledger`; each method blocks, runs one transaction and raises
only `ledger.errors`. The relay checks membership and the content hash; this module only stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from ledger._db import _translated

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool


class ArtifactRow(msgspec.Struct, frozen=True):
    upload: str
    size: int
    pieces: int


class Artifacts:
    _pool: ConnectionPool[psycopg.Connection[TupleRow]]

    def put_artifact_piece(self, upload: str, index: int, data: bytes) -> None:
        with _translated(), self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO artifact_pieces (upload, idx, data) VALUES (%s, %s, %s)",
                (upload, index, data),
            )

    def finish_artifact(
        self, collab_id: str, ref: str, upload: str, uploader: str, size: int, pieces: int
    ) -> bool:
        """Record a complete upload under its ref. False (and the new pieces dropped) when the
        collab already holds that ref — the same bytes were uploaded before."""
        with _translated(), self._pool.connection() as conn:
            inserted = conn.execute(
                "INSERT INTO artifacts (collab_id, ref, upload, uploader, size, pieces)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (collab_id, ref) DO NOTHING",
                (collab_id, ref, upload, uploader, size, pieces),
            ).rowcount
            if not inserted:
                conn.execute("DELETE FROM artifact_pieces WHERE upload = %s", (upload,))
        return bool(inserted)

    def artifact(self, collab_id: str, ref: str) -> ArtifactRow | None:
        with _translated(), self._pool.connection() as conn:
            r = conn.execute(
                "SELECT upload, size, pieces FROM artifacts WHERE collab_id = %s AND ref = %s",
                (collab_id, ref),
            ).fetchone()
        return None if r is None else ArtifactRow(r[0], r[1], r[2])

    def artifact_pieces(self, upload: str, from_index: int, limit: int) -> list[bytes]:
        with _translated(), self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT data FROM artifact_pieces WHERE upload = %s AND idx >= %s"
                " ORDER BY idx LIMIT %s",
                (upload, from_index, limit),
            ).fetchall()
        return [bytes(r[0]) for r in rows]
