"""Encrypted artifacts: uploads in ordered pieces, checked against their content-hash ref at the
end, and downloads streamed a page at a time, paced by the client's socket.

The relay sees ciphertext only (model/artifacts.py): it checks that the pieces hash to the ref
the client claims, never what they say. An upload belongs to the session that started it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

import structlog
from trio_websocket import ConnectionClosed

from ledger import AlreadyExists
from model import wire
from model.artifacts import RefHasher
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
DOWNLOAD_PAGE: Final = 16  # pieces read from the ledger at a time


class Artifacts:
    def __init__(self, services: Services, sessions: Sessions) -> None:
        self._s = services
        self._sessions = sessions

    async def put_chunk(self, conn: Connection, req: wire.PutArtifactChunk) -> None:
        """Store one piece of an upload; on the final piece check the whole upload's hash.

        Pieces go to the ledger as they arrive, so no upload is ever held in memory whole.
        """
        account_id = self._sessions.account_of(conn)
        upload = conn.uploads.get(req.upload)
        if req.index == 0 and upload is None:
            if not UPLOAD_ID_RE.fullmatch(req.upload) or len(conn.uploads) >= MAX_UPLOADS:
                raise RequestRefused(
                    wire.ErrorCode.INVALID_REQUEST,
                    f"upload ids are 16-64 letters, digits, '_' or '-'; at most {MAX_UPLOADS} uploads at once",
                )
            upload = conn.uploads[req.upload] = ArtifactUpload(req.collab_id, RefHasher())
        if upload is None or upload.collab_id != req.collab_id or req.index != upload.next_index:
            conn.uploads.pop(req.upload, None)
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "artifact pieces must arrive in order, from 0; start again",
            )
        upload.size += len(req.data)
        if upload.size > self._s.config.max_artifact_bytes:
            conn.uploads.pop(req.upload, None)
            raise RequestRefused(
                wire.ErrorCode.FRAME_TOO_LARGE,
                f"artifacts are limited to {self._s.config.max_artifact_bytes} bytes on this relay",
            )
        upload.hasher.update(req.data)
        try:
            await self._s.db(self._s.ledger.put_artifact_piece, req.upload, req.index, req.data)
        except AlreadyExists:
            conn.uploads.pop(req.upload, None)
            raise RequestRefused(
                wire.ErrorCode.INVALID_REQUEST,
                "that upload id is in use; start again with a new random one",
            ) from None
        upload.next_index += 1
        if not req.final:
            conn.reply(wire.ArtifactChunkStored(rid=req.rid, index=req.index))
            return
        del conn.uploads[req.upload]
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
        log.info("artifact_stored", collab_id=req.collab_id, size=upload.size)
        conn.reply(wire.ArtifactStored(rid=req.rid, ref=req.ref, size=upload.size))

    def abandon(self, conn: Connection) -> None:
        """The session (or the connection) ended: its uploads in progress are dropped."""
        conn.uploads.clear()

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
                    self._s.ledger.artifact_pieces, found.upload, index, DOWNLOAD_PAGE
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
