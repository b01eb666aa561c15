"""Refused and abandoned uploads leave nothing stored, and storage has a per-account quota
(issue 13, item 7). Every test drives a real relay over real WebSockets and then counts rows.

Before the fix, each of these found pieces left in `artifact_pieces`: a refused upload said
"nothing was stored" while every piece before the refusal stayed, and a client that vanished
mid-upload left its pieces for ever, with no quota on any of it.
"""

from __future__ import annotations

import dataclasses
import secrets
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import psycopg
import pytest
import trio

from clientkit import RelayRefused
from ledger import Ledger
from model import artifacts, wire
from model._crypto import random_bytes
from model.artifacts import RefHasher
from relay import _throttle
from tests.relay_harness import relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from clientkit import Client
    from relay._server import Relay
    from tests.relay_harness import User


def _counts(database_url: str) -> tuple[int, int]:
    """(artifact_pieces rows, uploads rows) in the database right now."""
    with psycopg.connect(database_url) as conn:
        pieces = conn.execute("SELECT count(*) FROM artifact_pieces").fetchone()
        uploads = conn.execute("SELECT count(*) FROM uploads").fetchone()
    assert pieces is not None
    assert uploads is not None
    return int(pieces[0]), int(uploads[0])


async def _until_empty(database_url: str) -> None:
    """Wait until no piece and no upload is stored (the relay deletes as it learns of it)."""
    with trio.fail_after(20):
        for _ in range(10_000):  # polls the database: no event to wait on
            if await trio.to_thread.run_sync(_counts, database_url) == (0, 0):
                return
            await trio.sleep(0.05)


async def _send_pieces(
    client: Client, collab_id: str, upload: str, pieces: list[bytes], *, ref: str | None = None
) -> RelayRefused | wire.ArtifactStored | None:
    """Send `pieces` under `upload` in order, the last one final with `ref` (when given; with
    None the upload is left unfinished). Returns the refusal, the confirmation, or None."""
    hasher = RefHasher()
    for index, piece in enumerate(pieces):
        hasher.update(piece)
        final = ref is not None and index == len(pieces) - 1
        try:
            reply = await client.request(
                client.signed(
                    lambda rid, i=index, p=piece, f=final: wire.PutArtifactChunk(
                        rid=rid,
                        collab_id=collab_id,
                        upload=upload,
                        index=i,
                        data=p,
                        final=f,
                        ref=(ref or "") if f else "",
                    )
                ),
                wire.ArtifactStored if final else wire.ArtifactChunkStored,
            )
        except RelayRefused as exc:
            return exc
        if final:
            assert isinstance(reply, wire.ArtifactStored)
            return reply
    return None


def _upload_id() -> str:
    return secrets.token_urlsafe(18)


def _sealed(collab_key: bytes, collab_id: str, size: int) -> list[bytes]:
    return list(artifacts.seal_stream(collab_key, collab_id, [random_bytes(size)]))


@asynccontextmanager
async def _relay_and_user(
    database_url: str, tmp_path: Path, **limits: int
) -> AsyncIterator[tuple[Relay, User]]:
    """A relay with `limits` replacing its configuration's defaults, and one signed-up user."""
    config = dataclasses.replace(relay_config(database_url, tmp_path / "relay"), **limits)
    async with running_relay(config) as relay:
        yield relay, await sign_up(relay.url)


@pytest.mark.objective("SO-6")
async def test_a_refused_upload_leaves_no_piece_whatever_the_refusal(
    database_url: str, tmp_path: Path
) -> None:
    limit = 3 * artifacts.CHUNK_BYTES
    async with _relay_and_user(database_url, tmp_path, max_artifact_bytes=limit) as (relay, alice):
        sealed = _sealed(alice.collab_key, alice.collab_id, 4 * artifacts.CHUNK_BYTES)
        assert len(sealed) >= 5
        within = sealed[:3]  # the header and two chunks: under the size limit
        assert sum(map(len, within)) < limit < sum(map(len, sealed))
        with trio.fail_after(60):
            async with session(relay.url, alice) as client:
                # Every piece stored, then a final one whose bytes do not hash to the claim.
                bad = await _send_pieces(
                    client, alice.collab_id, _upload_id(), within, ref="b2:" + "1" * 64
                )
                assert isinstance(bad, RelayRefused)
                assert bad.code is wire.ErrorCode.INVALID_REQUEST
                assert "nothing was stored" in bad.message
                assert _counts(database_url) == (0, 0)

                # Three pieces stored, then one out of order.
                upload = _upload_id()
                assert await _send_pieces(client, alice.collab_id, upload, within) is None
                assert _counts(database_url) == (3, 1)
                with pytest.raises(RelayRefused) as order:
                    await client.request(
                        client.signed(
                            lambda rid: wire.PutArtifactChunk(
                                rid=rid,
                                collab_id=alice.collab_id,
                                upload=upload,
                                index=7,
                                data=b"x",
                            )
                        ),
                        wire.ArtifactChunkStored,
                    )
                assert order.value.code is wire.ErrorCode.INVALID_REQUEST
                assert _counts(database_url) == (0, 0)

                # Pieces up to the size limit stored, then one over it.
                big = await _send_pieces(client, alice.collab_id, _upload_id(), sealed, ref="b2:x")
                assert isinstance(big, RelayRefused)
                assert big.code is wire.ErrorCode.FRAME_TOO_LARGE
                assert _counts(database_url) == (0, 0)

                # After all that, an honest upload still works, and is all that is stored.
                small = [sealed[0], sealed[-1]]
                hasher = RefHasher()
                for piece in small:
                    hasher.update(piece)
                ok = await _send_pieces(
                    client, alice.collab_id, _upload_id(), small, ref=hasher.ref()
                )
                assert isinstance(ok, wire.ArtifactStored)
                assert _counts(database_url) == (2, 0)


@pytest.mark.objective("SO-6")
async def test_a_reused_upload_id_is_refused_without_touching_the_upload_that_owns_it(
    relay: Relay, database_url: str
) -> None:
    alice, mallory = await sign_up(relay.url), await sign_up(relay.url)
    sealed = _sealed(alice.collab_key, alice.collab_id, 2 * artifacts.CHUNK_BYTES)
    upload = _upload_id()
    with trio.fail_after(60):
        async with session(relay.url, alice) as client, session(relay.url, mallory) as other:
            assert await _send_pieces(client, alice.collab_id, upload, sealed[:2]) is None
            # Mallory, in her own collab, sends a piece 0 under Alice's upload id, then a
            # piece 2 (as if to continue it).
            stolen = await _send_pieces(other, mallory.collab_id, upload, [b"mine"])
            assert isinstance(stolen, RelayRefused)
            assert "in use" in stolen.message
            with pytest.raises(RelayRefused) as continued:
                await other.request(
                    other.signed(
                        lambda rid: wire.PutArtifactChunk(
                            rid=rid, collab_id=mallory.collab_id, upload=upload, index=2, data=b"x"
                        )
                    ),
                    wire.ArtifactChunkStored,
                )
            assert "start again" in continued.value.message, continued.value.message
            assert _counts(database_url) == (2, 1)  # Alice's upload is intact
            hasher = RefHasher()
            for piece in sealed:
                hasher.update(piece)
            rest = await _send_pieces_from(client, alice.collab_id, upload, sealed, 2, hasher.ref())
            assert isinstance(rest, wire.ArtifactStored)
            assert _counts(database_url) == (len(sealed), 0)


async def _send_pieces_from(
    client: Client, collab_id: str, upload: str, pieces: list[bytes], start: int, ref: str
) -> wire.Reply:
    reply: wire.Reply | None = None
    for index in range(start, len(pieces)):
        final = index == len(pieces) - 1
        reply = await client.request(
            client.signed(
                lambda rid, i=index, f=final: wire.PutArtifactChunk(
                    rid=rid,
                    collab_id=collab_id,
                    upload=upload,
                    index=i,
                    data=pieces[i],
                    final=f,
                    ref=ref if f else "",
                )
            ),
            wire.ArtifactStored if final else wire.ArtifactChunkStored,
        )
    assert reply is not None
    return reply


@pytest.mark.objective("SO-6")
async def test_closing_the_socket_mid_upload_leaves_no_piece(
    relay: Relay, database_url: str
) -> None:
    alice = await sign_up(relay.url)
    sealed = _sealed(alice.collab_key, alice.collab_id, 3 * artifacts.CHUNK_BYTES)
    with trio.fail_after(60):
        async with session(relay.url, alice) as client:
            assert await _send_pieces(client, alice.collab_id, _upload_id(), sealed[:3]) is None
            assert await _send_pieces(client, alice.collab_id, _upload_id(), sealed[:1]) is None
            assert _counts(database_url) == (4, 2)
        # The client is gone without a word about its uploads.
        await _until_empty(database_url)


@pytest.mark.objective("SO-6")
async def test_an_upload_past_the_quota_is_refused_and_nothing_of_it_is_kept(
    database_url: str, tmp_path: Path
) -> None:
    quota = 5 * artifacts.CHUNK_BYTES
    async with _relay_and_user(database_url, tmp_path, storage_quota_bytes=quota) as (relay, alice):
        first = _sealed(alice.collab_key, alice.collab_id, 3 * artifacts.CHUNK_BYTES)
        second = _sealed(alice.collab_key, alice.collab_id, 3 * artifacts.CHUNK_BYTES)
        with trio.fail_after(60):
            async with session(relay.url, alice) as client:
                stored = await client.upload_artifact(alice.collab_id, first)
                pieces_before = _counts(database_url)
                # A second connection of the same account shares the same quota.
                async with session(relay.url, alice) as again:
                    refused = await _send_pieces(
                        again, alice.collab_id, _upload_id(), second, ref="b2:whatever"
                    )
                assert isinstance(refused, RelayRefused)
                assert refused.code is wire.ErrorCode.QUOTA_EXCEEDED
                assert "operator" in refused.message  # what to do next
                # Nothing half-written: exactly the first artifact's pieces, no upload row.
                assert _counts(database_url) == pieces_before == (len(first), 0)
                store = Ledger(database_url)
                store.open()
                try:
                    assert store.stored_bytes(alice.account_id) == stored.size
                finally:
                    store.close()
                # Another account has its own quota.
                bob = await sign_up(relay.url)
                async with session(relay.url, bob) as theirs:
                    sealed = _sealed(bob.collab_key, bob.collab_id, artifacts.CHUNK_BYTES)
                    await theirs.upload_artifact(bob.collab_id, sealed)


@pytest.mark.objective("SO-6")
async def test_a_relay_sweeps_what_a_crashed_relay_left_at_start_up(
    database_url: str, tmp_path: Path
) -> None:
    config = relay_config(database_url, tmp_path / "relay")
    async with running_relay(config) as relay:
        alice = await sign_up(relay.url)
    keyer = _throttle.HandleKeyer(config.jwt_signing_key.value)
    with psycopg.connect(database_url) as conn:
        # What a relay killed mid-upload leaves: an upload row untouched for an hour with its
        # pieces, and pieces of an upload from before uploads had rows at all.
        conn.execute(
            "INSERT INTO uploads (upload, account_id, collab_id, bytes, touched_at)"
            " VALUES ('crashed-upload-0001', %s, %s, 8, now() - interval '1 hour')",
            (alice.account_id, alice.collab_id),
        )
        conn.execute(
            "INSERT INTO artifact_pieces (upload, idx, data) VALUES"
            " ('crashed-upload-0001', 0, 'abcd'), ('crashed-upload-0001', 1, 'efgh'),"
            " ('no-owner-at-all-01', 0, 'ijkl')"
        )
        # A recent upload (another relay's live connection) is left alone.
        conn.execute(
            "INSERT INTO uploads (upload, account_id, collab_id, bytes)"
            " VALUES ('live-upload-000001', %s, %s, 4)",
            (alice.account_id, alice.collab_id),
        )
        conn.execute(
            "INSERT INTO artifact_pieces (upload, idx, data) VALUES ('live-upload-000001', 0, 'x')"
        )
        # Failed-login records: one from two hours ago, one from now.
        conn.execute(
            "INSERT INTO login_failures (handle_key, failures, last_failure_at)"
            " VALUES (%s, 3, now() - interval '2 hours'), (%s, 1, now())",
            (keyer("long-ago"), keyer("just-now")),
        )
    async with running_relay(config) as relay:
        with trio.fail_after(20):
            await relay.housekeeping.wait_swept()
        assert relay.housekeeping.uploads_swept == 1
        assert relay.housekeeping.pieces_swept == 3
        with psycopg.connect(database_url) as conn:
            uploads = conn.execute("SELECT upload FROM uploads").fetchall()
            pieces = conn.execute("SELECT upload FROM artifact_pieces").fetchall()
            keys = conn.execute("SELECT handle_key FROM login_failures").fetchall()
        assert uploads == [("live-upload-000001",)]
        assert pieces == [("live-upload-000001",)]
        assert [bytes(k[0]) for k in keys] == [keyer("just-now")]


async def test_an_upload_swept_while_idle_is_refused_on_its_next_piece(
    database_url: str, tmp_path: Path
) -> None:
    async with _relay_and_user(database_url, tmp_path) as (relay, alice):
        sealed = _sealed(alice.collab_key, alice.collab_id, 2 * artifacts.CHUNK_BYTES)
        upload = _upload_id()
        with trio.fail_after(60):
            async with session(relay.url, alice) as client:
                assert await _send_pieces(client, alice.collab_id, upload, sealed[:1]) is None
                with psycopg.connect(database_url) as conn:
                    conn.execute("UPDATE uploads SET touched_at = now() - interval '1 day'")
                await relay.housekeeping.sweep_once()
                assert _counts(database_url) == (0, 0)
                with pytest.raises(RelayRefused) as gone:
                    await _send_pieces_from(client, alice.collab_id, upload, sealed, 1, "b2:x")
                assert "start again" in gone.value.message
                assert _counts(database_url) == (0, 0)


@pytest.mark.objective("SO-6")
async def test_an_upload_ends_with_the_session_that_started_it(
    relay: Relay, database_url: str
) -> None:
    alice, bob = await sign_up(relay.url), await sign_up(relay.url)
    sealed = _sealed(alice.collab_key, alice.collab_id, 2 * artifacts.CHUNK_BYTES)
    upload = _upload_id()
    with trio.fail_after(60):
        async with session(relay.url, alice) as client:
            assert await _send_pieces(client, alice.collab_id, upload, sealed[:2]) is None
            assert _counts(database_url) == (2, 1)
            # The same connection now speaks for Bob: Alice's upload ends, and is deleted.
            await client.authenticate(bob.token)
            client.use_key(bob.signing_key)  # Bob's own signature, not a bad one
            await _until_empty(database_url)
            with pytest.raises(RelayRefused) as by_bob:
                await _send_pieces_from(client, alice.collab_id, upload, sealed, 2, "b2:x")
            assert by_bob.value.code is not wire.ErrorCode.BAD_SIGNATURE, by_bob.value.message
            # Back as Alice, on the same connection: the upload is gone, not resumed.
            await client.authenticate(alice.token)
            client.use_key(alice.signing_key)
            with pytest.raises(RelayRefused) as resumed:
                await _send_pieces_from(client, alice.collab_id, upload, sealed, 2, "b2:x")
            assert "start again" in resumed.value.message, resumed.value.message
            assert _counts(database_url) == (0, 0)
