"""Artifacts end to end: sealed on the client, stored in pieces, checked against their ref."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import psycopg
import pytest
import trio

from clientkit import RelayRefused
from model import artifacts, wire
from model._crypto import random_bytes
from tests.cli_harness import client_env, cozy
from tests.relay_harness import session, sign_up

if TYPE_CHECKING:
    from pathlib import Path

    from clientkit import Client
    from relay._server import Relay


@pytest.mark.objective("SO-3")
async def test_attach_tail_and_fetch_round_trip_and_a_tampered_piece_is_caught(
    relay: Relay, tmp_path: Path, database_url: str
) -> None:
    env = client_env(tmp_path / "jody")
    await cozy("account", "signup", "--relay", relay.url, "--handle", "jody", env=env)
    collab = (await cozy("collab", "create", "files", env=env)).stdout.decode().strip()
    original = tmp_path / "report.bin"
    original.write_bytes(os.urandom(3 * artifacts.CHUNK_BYTES + 123))
    ref = (await cozy("attach", collab, str(original), env=env)).stdout.decode().strip()
    assert ref.startswith("b2:")
    tail = (await cozy("tail", collab, env=env)).stdout.decode()
    assert f"[file 'report.bin', {original.stat().st_size} bytes: {ref}]" in tail
    out = tmp_path / "copy.bin"
    fetched = await cozy("fetch", collab, ref, str(out), env=env)
    assert b"verified" in fetched.stdout
    assert out.read_bytes() == original.read_bytes()
    # The stored ciphertext shows nothing of the file.
    with psycopg.connect(database_url) as conn:
        stored = b"".join(bytes(r[0]) for r in conn.execute("SELECT data FROM artifact_pieces"))
        assert original.read_bytes()[:64] not in stored
        # A database thief flips one byte of one stored piece.
        conn.execute(
            "UPDATE artifact_pieces SET data = overlay(data placing '\\x00' from 100) WHERE idx = 2"
        )
    broken = tmp_path / "broken.bin"
    tampered = await cozy("fetch", collab, ref, str(broken), env=env, check=False)
    assert tampered.returncode == 3
    assert b"INTEGRITY ALARM" in tampered.stderr
    assert not broken.exists()
    missing = await cozy("fetch", collab, "b2:" + "0" * 64, str(broken), env=env, check=False)
    assert missing.returncode == 1
    assert b"no attachment you can read" in missing.stderr


async def test_uploads_are_checked_ordered_members_only_and_size_limited(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, mallory = await sign_up(relay.url), await sign_up(relay.url)
    sealed = list(artifacts.seal_stream(alice.collab_key, alice.collab_id, [random_bytes(200_000)]))
    with trio.fail_after(30):
        async with session(relay.url, alice) as client, session(relay.url, mallory) as other:
            stored = await client.upload_artifact(alice.collab_id, sealed)
            assert stored.size == sum(len(p) for p in sealed)
            async with client.download_artifact(alice.collab_id, stored.ref) as pieces:
                got = [p async for p in pieces]
            assert got == sealed
            async with client.download_artifact(alice.collab_id, stored.ref) as pieces:
                first = await pieces.__anext__()  # leave early: the rest is dropped
            assert first == sealed[0]
            await client.request(wire.Ping, wire.Pong)  # the connection still works
            # Not a member: neither upload nor download.
            with pytest.raises(RelayRefused) as no_read:
                async with other.download_artifact(alice.collab_id, stored.ref) as pieces:
                    _ = [p async for p in pieces]
            assert no_read.value.code is wire.ErrorCode.UNAUTHORIZED
            with pytest.raises(RelayRefused) as no_write:
                await other.upload_artifact(alice.collab_id, sealed)
            assert no_write.value.code is wire.ErrorCode.UNAUTHORIZED
            # A claimed ref that the bytes do not hash to is refused; nothing is stored under it.
            bad_ref = await _upload_claiming(client, alice.collab_id, sealed, "b2:" + "1" * 64)
            assert bad_ref.code is wire.ErrorCode.INVALID_REQUEST
            # The refused upload was deleted whole, so its id is free again: reusing it starts
            # afresh, and nothing of the refused attempt is mixed in.
            with pytest.raises(AssertionError, match="accepted an upload"):
                await _upload_claiming(client, alice.collab_id, sealed, stored.ref)
            # Pieces out of order are refused.
            with pytest.raises(RelayRefused) as order:
                await client.request(
                    client.signed(
                        lambda rid: wire.PutArtifactChunk(
                            rid=rid, collab_id=alice.collab_id, upload="u" * 20, index=3, data=b"x"
                        )
                    ),
                    wire.ArtifactChunkStored,
                )
            assert order.value.code is wire.ErrorCode.INVALID_REQUEST
            services = relay._services  # the config the request handlers read
            monkeypatch.setattr(
                services, "config", dataclasses.replace(relay.config, max_artifact_bytes=100_000)
            )
            with pytest.raises(RelayRefused) as too_big:
                await client.upload_artifact(alice.collab_id, sealed)
            assert too_big.value.code is wire.ErrorCode.FRAME_TOO_LARGE


async def _upload_claiming(
    client: Client, collab_id: str, sealed: list[bytes], ref: str
) -> RelayRefused:
    upload = "claim-" + "x" * 20
    for index, piece in enumerate(sealed):
        final = index == len(sealed) - 1
        try:
            await client.request(
                client.signed(
                    lambda rid, i=index, p=piece, f=final: wire.PutArtifactChunk(
                        rid=rid,
                        collab_id=collab_id,
                        upload=upload,
                        index=i,
                        data=p,
                        final=f,
                        ref=ref if f else "",
                    )
                ),
                wire.ArtifactStored if final else wire.ArtifactChunkStored,
            )
        except RelayRefused as exc:
            return exc
    raise AssertionError("the relay accepted an upload under a ref it does not hash to")
