"""Encrypted artifacts: uploads in ordered pieces, checked against their content-hash ref at the
end, and downloads streamed a page at a time, paced by the client's socket.

The relay sees ciphertext only (model/artifacts.py): it checks that the pieces hash to the ref
the client claims, never what they say. An upload belongs to the session that started it,
and nothing of it outlives a refusal, the session or the connection (relay/_uploads.py); what
one account stores is bounded by its quota (`storage_quota_bytes`).
"""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING, Final

import structlog
from trio_websocket import ConnectionClosed

from ledger import AlreadyExists, QuotaExceeded, UnknownReference
from model import wire
from model.artifacts import RefHasher
from relay import _uploads
from relay._connection import ArtifactUpload
from relay._context import RequestRefused

if TYPE_CHECKING:
    from ledger import ArtifactRow
    from relay._connection import Connection
    from relay._context import Services
    from relay._sessions import Sessions

log = structlog.get_logger("cozy.relay")

MAX_UPLOADS: Final = 4  # artifact uploads in progress per connection
UPLOAD_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
# A download reads at most this many pieces, and this many bytes, from the ledger at a time and
# holds them until its client has taken them: with MAX_BACKGROUND_TASKS downloads per connection
# that bounds what a client that stops reading pins, whatever piece size the uploader chose.
DOWNLOAD_PAGE: Final = 16
DOWNLOAD_PAGE_BYTES: Final = 256 * 1024


class Artifacts:
    def __init__(self, services: Services, sessions: Sessions) -> None:
        self._s = services
        self._sessions = sessions

    async def put_chunk(self, conn: Connection, req: wire.PutArtifactChunk) -> None:
        """Store one piece of an upload; on the final piece check the whole upload's hash.

        Pieces go to the ledger as they arrive, so no upload is ever held in memory whole.
        Every refusal of a piece of an upload this connection owns deletes the whole upload's
        pieces before it is answered (relay/_uploads.py): nothing of a refused upload stays.
        """
        account_id = self._sessions.account_of(conn)
        upload = conn.uploads.get(req.upload)
        if req.index == 0 and upload is None:
            if not UPLOAD_ID_RE.fullmatch(req.upload) or len(conn.uploads) >= MAX_UPLOADS:
                raise RequestRefused(
                    wire.ErrorCode.INVALID_REQUEST,
                    f"upload ids are 16-64 letters, digits, '_' or '-'; at most {MAX_UPLOADS} uploads at once",
                )
            try:
                await self._s.db(self._s.ledger.start_upload, req.upload, account_id, req.collab_id)
            except AlreadyExists:
                # Someone's upload or artifact has this id: refused, and theirs left alone.
                raise RequestRefused(
                    wire.ErrorCode.INVALID_REQUEST,
                    "that upload id is in use; start again with a new random one",
                ) from None
            upload = conn.uploads[req.upload] = ArtifactUpload(
                req.collab_id, RefHasher(), account_id=account_id
            )
        try:
            await self._store_piece(conn, req, upload, account_id)
        except RequestRefused:
            if upload is not None:
                if conn.uploads.get(req.upload) is upload:
                    del conn.uploads[req.upload]
                await _uploads.drop_upload(self._s.db, self._s.ledger, req.upload, upload)
            raise

    async def _store_piece(
        self,
        conn: Connection,
        req: wire.PutArtifactChunk,
        upload: ArtifactUpload | None,
        account_id: str,
    ) -> None:
        """One piece of an upload this connection owns; raises `RequestRefused` to end it."""
        if upload is None or upload.collab_id != req.collab_id or req.index != upload.next_index:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "artifact pieces must arrive in order, from 0; start again",
            )
        if upload.account_id != account_id:
            raise RequestRefused(
                wire.ErrorCode.UNAUTHORIZED,
                "this upload was started by another account; start again",
            )
        config = self._s.config
        upload.size += len(req.data)
        if upload.size > config.max_artifact_bytes:
            raise RequestRefused(
                wire.ErrorCode.FRAME_TOO_LARGE,
                f"artifacts are limited to {config.max_artifact_bytes} bytes on this relay;"
                " nothing of this upload was kept",
            )
        upload.hasher.update(req.data)
        try:
            await self._s.db(
                partial(self._s.ledger.put_upload_piece, quota=config.storage_quota_bytes),
                req.upload,
                account_id,
                req.index,
                req.data,
            )
        except QuotaExceeded as exc:
            raise RequestRefused(
                wire.ErrorCode.QUOTA_EXCEEDED,
                f"this account stores {exc.used} bytes and may store {exc.quota}; the upload"
                " was refused and nothing of it kept: ask the relay's operator for more room",
            ) from None
        except (UnknownReference, AlreadyExists):
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "this upload is no longer in progress (it sat idle too long); start again",
            ) from None
        upload.next_index += 1
        if not req.final:
            conn.reply(wire.ArtifactChunkStored(rid=req.rid, index=req.index))
            return
        if upload.hasher.ref() != req.ref:
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "the upload does not hash to the ref it claims; nothing was stored",
            )
        await self._s.db(
            self._s.ledger.finish_artifact,
            req.collab_id,
            req.ref,
            req.upload,
            account_id,
            upload.size,
            upload.next_index,
        )
        del conn.uploads[req.upload]
        log.info("artifact_stored", collab_id=req.collab_id, size=upload.size)
        conn.reply(wire.ArtifactStored(rid=req.rid, ref=req.ref, size=upload.size))

    def abandon(self, conn: Connection) -> None:
        """The session (or the connection) ended: its uploads in progress are dropped, and
        their pieces deleted from the ledger by a task of the connection (shielded, so a
        closing connection still finishes it)."""
        uploads, conn.uploads = list(conn.uploads.items()), {}
        if uploads:
            conn.nursery.start_soon(
                _uploads.drop_connection_uploads, self._s.db, self._s.ledger, uploads
            )

    async def get(self, conn: Connection, req: wire.GetArtifact) -> None:
        found = await self._s.db(self._s.ledger.artifact, req.collab_id, req.ref)
        if found is None:
            raise RequestRefused(wire.ErrorCode.NOT_FOUND, "no such artifact in this collab")
        self._s.start_background(conn, self._send, conn, req.rid, found)

    async def _send(self, conn: Connection, rid: int, found: ArtifactRow) -> None:
        """Stream the stored pieces a page at a time, paced by the client's socket."""
        index = 0
        try:
            while index < found.pieces:
                page = await self._s.db(
                    self._s.ledger.artifact_pieces,
                    found.upload,
                    index,
                    DOWNLOAD_PAGE,
                    DOWNLOAD_PAGE_BYTES,
                )
                if not page:
                    break
                for data in page:
                    final = index == found.pieces - 1
                    await conn.send(
                        wire.encode(wire.ArtifactData(rid=rid, index=index, data=data, final=final))
                    )
                    index += 1
        except ConnectionClosed:
            pass
