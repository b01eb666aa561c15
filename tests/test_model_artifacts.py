"""Artifacts (SO-1, SO-3): streamed sealing, content-hash refs, and every way to break them."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from model._crypto import CryptoError, random_bytes
from model.artifacts import (
    CHUNK_BYTES,
    RefHasher,
    RefMismatch,
    check_ref,
    open_stream,
    seal_stream,
)
from model.ids import new_id

KEY = random_bytes(32)
COLLAB = new_id("c")


def _seal(data: bytes, piece: int = 10_000) -> list[bytes]:
    return list(seal_stream(KEY, COLLAB, (data[i : i + piece] for i in range(0, len(data), piece))))


def _ref(sealed: list[bytes]) -> str:
    h = RefHasher()
    for s in sealed:
        h.update(s)
    return h.ref()


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 3 * CHUNK_BYTES + 7), piece=st.integers(1, 100_000))
def test_any_size_round_trips_in_bounded_chunks(size: int, piece: int) -> None:
    data = random_bytes(size) if size else b""
    sealed = _seal(data, piece)
    assert len(sealed) == 2 + size // CHUNK_BYTES - (1 if size and size % CHUNK_BYTES == 0 else 0)
    assert all(len(c) <= CHUNK_BYTES + 17 for c in sealed)
    assert b"".join(open_stream(KEY, COLLAB, check_ref(_ref(sealed), sealed))) == data


@pytest.mark.objective("SO-1")
def test_the_ciphertext_shows_nothing_and_opens_only_with_the_key_and_collab() -> None:
    data = b"CANARY-artifact " * 10_000
    sealed = _seal(data)
    assert not any(b"CANARY" in c for c in sealed)
    with pytest.raises(CryptoError):
        b"".join(open_stream(random_bytes(32), COLLAB, sealed))
    with pytest.raises(CryptoError):
        b"".join(open_stream(KEY, new_id("c"), sealed))  # spliced into another collab


@pytest.mark.objective("SO-3")
@pytest.mark.parametrize("damage", ["flip", "truncate", "reorder", "append", "splice"])
def test_tampering_truncation_and_splicing_fail(damage: str) -> None:
    sealed = _seal(random_bytes(3 * CHUNK_BYTES + 5))
    other = _seal(random_bytes(3 * CHUNK_BYTES + 5))
    if damage == "flip":
        sealed[2] = sealed[2][:-1] + bytes([sealed[2][-1] ^ 1])
    elif damage == "truncate":
        sealed = sealed[:-1]
    elif damage == "reorder":
        sealed[1], sealed[2] = sealed[2], sealed[1]
    elif damage == "append":
        sealed = [*sealed, sealed[-1]]
    else:
        sealed[2] = other[2]
    with pytest.raises(CryptoError):
        b"".join(open_stream(KEY, COLLAB, sealed))


@pytest.mark.objective("SO-3")
def test_a_download_that_does_not_match_its_ref_is_refused() -> None:
    sealed = _seal(b"first version")
    swapped = _seal(b"second version")  # valid ciphertext, but not what the event referenced
    with pytest.raises(RefMismatch):
        b"".join(open_stream(KEY, COLLAB, check_ref(_ref(sealed), swapped)))
    assert _ref(sealed).startswith("b2:")
    assert _ref(sealed) != _ref(swapped)
