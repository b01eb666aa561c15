"""`Client` calls that upload and download artifacts, one piece at a time."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import trio

from clientkit._connection import ClientCore
from clientkit.errors import ConnectionLost, RelayRefused
from model import wire
from model.artifacts import RefHasher

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable


class ArtifactCalls(ClientCore):
    """Artifact uploads and downloads."""

    async def upload_artifact(self, collab_id: str, sealed: Iterable[bytes]) -> wire.ArtifactStored:
        """Upload the pieces `model.artifacts.seal_stream` made, one acknowledged piece at a
        time (nothing is held whole), each signed with the key from `use_key`; returns the
        relay's confirmation with the ref."""
        upload = secrets.token_urlsafe(24)
        hasher = RefHasher()
        pieces = iter(sealed)
        current = next(pieces)
        index = 0
        while True:
            following = next(pieces, None)
            hasher.update(current)
            final = following is None
            build = self.signed(
                partial(
                    wire.PutArtifactChunk,
                    collab_id=collab_id,
                    upload=upload,
                    index=index,
                    data=current,
                    final=final,
                    ref=hasher.ref() if final else "",
                )
            )
            if final:
                return await self.request(build, wire.ArtifactStored)
            await self.request(build, wire.ArtifactChunkStored)
            assert following is not None
            current, index = following, index + 1

    @asynccontextmanager
    async def download_artifact(
        self, collab_id: str, ref: str
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The stored pieces of an artifact, in order, as the relay sends them.

        Use as ``async with client.download_artifact(c, ref) as pieces: async for p in
        pieces: …``. The pieces are unverified: pass them through `model.artifacts.check_ref`
        and `open_stream`. Leaving the block early is fine; later pieces are dropped.
        """
        if self._closed is not None:
            raise self._closed
        rid = next(self._rids)
        send, recv = trio.open_memory_channel[wire.Reply](64)
        self._streams[rid] = send
        try:
            await self._send(wire.encode(wire.GetArtifact(rid=rid, collab_id=collab_id, ref=ref)))
            async with recv:
                yield _ArtifactPieces(self, recv)
        finally:
            self._streams.pop(rid, None)


class _ArtifactPieces:
    """Async iterator over a download's pieces; ends after the piece marked final."""

    def __init__(self, client: ClientCore, frames: trio.MemoryReceiveChannel[wire.Reply]) -> None:
        self._client = client
        self._frames = frames
        self._done = False

    def __aiter__(self) -> _ArtifactPieces:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            frame = await self._frames.receive()
        except trio.EndOfChannel:
            raise self._client._closed or ConnectionLost() from None
        if isinstance(frame, wire.Error):
            raise RelayRefused(frame.code, frame.message)
        if not isinstance(frame, wire.ArtifactData):
            raise RelayRefused(wire.ErrorCode.INTERNAL, f"unexpected reply {type(frame).__name__}")
        self._done = frame.final
        return frame.data
