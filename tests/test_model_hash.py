"""`domain_hash` is the protocol's hash of record (event ids, chain links, recovery keys): its
output must never change, whichever BLAKE2b implementation computes it."""

from __future__ import annotations

import struct

import nacl.encoding
import nacl.hash
from hypothesis import given, settings
from hypothesis import strategies as st

from model._crypto import domain_hash
from model.chain import DOMAIN_CHAIN, genesis_head
from model.envelope import DOMAIN_EVENT_ID


def _libsodium(domain: bytes, *parts: bytes) -> bytes:
    """The definition: libsodium's BLAKE2b-256 over the label and length-prefixed parts."""
    data = domain + b"".join(struct.pack(">Q", len(p)) + p for p in parts)
    return nacl.hash.blake2b(data, digest_size=32, encoder=nacl.encoding.RawEncoder)


def test_known_answers_stay_fixed() -> None:
    # Pinned once: ids and chains already stored in ledgers depend on these exact values.
    assert (
        domain_hash(DOMAIN_EVENT_ID, b"body", b"sig").hex()
        == "8983090bdcabd5dc1717603a17adfa386ed3132b96be80e71cb17e501fd55784"
    )
    assert genesis_head("c_x") == _libsodium(b"cozylabs/v1/chain-genesis\x00", b"c_x")


@settings(max_examples=200, deadline=None)
@given(
    domain=st.sampled_from([DOMAIN_EVENT_ID, DOMAIN_CHAIN, b""]),
    parts=st.lists(st.binary(max_size=5000), max_size=4),
)
def test_matches_libsodium_generichash(domain: bytes, parts: list[bytes]) -> None:
    assert domain_hash(domain, *parts) == _libsodium(domain, *parts)


def test_parts_are_length_prefixed() -> None:
    # Moving bytes between neighbouring parts changes the hash (the encoding is injective).
    assert domain_hash(DOMAIN_CHAIN, b"ab", b"c") != domain_hash(DOMAIN_CHAIN, b"a", b"bc")
