"""The collab hash chain and relay receipts.

``head_0 = H(genesis ‖ collab_id)`` and ``head_n = H(head_{n-1} ‖ event_id_n)``. Binding the
collab into the genesis makes every collab's chain distinct, so an event spliced in from another
collab breaks the chain even if its id were reused. A client that recomputes the chain from a head
it trusts knows it holds the same history as everyone else who reached the same head.

A receipt is the relay's signed statement "event E sits at seq n of collab C and the chain head
after it is h". Two receipts that disagree about a position are transferable evidence that the
relay equivocated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import msgspec

from model import _crypto
from model.errors import ChainMismatch

if TYPE_CHECKING:
    import nacl.signing

DOMAIN_GENESIS: Final = b"cozylabs/v1/chain-genesis\x00"
DOMAIN_CHAIN: Final = b"cozylabs/v1/chain-link\x00"
DOMAIN_RECEIPT: Final = b"cozylabs/v1/relay-receipt\x00"


def genesis_head(collab_id: str) -> bytes:
    return _crypto.domain_hash(DOMAIN_GENESIS, collab_id.encode())


def next_head(previous_head: bytes, event_id: bytes) -> bytes:
    return _crypto.domain_hash(DOMAIN_CHAIN, previous_head, event_id)


class Head(msgspec.Struct, frozen=True):
    """A position in a collab's history: the last seq and the chain hash after it."""

    seq: int
    chain: bytes


def start_of(collab_id: str) -> Head:
    return Head(seq=0, chain=genesis_head(collab_id))


def advance(head: Head, seq: int, event_id: bytes, claimed_chain: bytes) -> Head:
    """Check that `seq`/`claimed_chain` extend `head` by `event_id`; return the new head.

    Raises `ChainMismatch` if the seq is not the next one or the chain hash is not the
    recomputed one — the two ways a relay could rewrite history under a client.
    """
    if seq != head.seq + 1:
        raise ChainMismatch(f"expected seq {head.seq + 1}, got {seq}")
    expected = next_head(head.chain, event_id)
    if not _crypto.constant_time_equal(expected, claimed_chain):
        raise ChainMismatch(f"chain hash at seq {seq} does not extend the verified head")
    return Head(seq=seq, chain=expected)


class Receipt(msgspec.Struct, frozen=True, array_like=True):
    """The relay's signed promise about one event's position."""

    collab_id: str
    seq: int
    event_id: bytes
    chain: bytes


_receipt_encoder = msgspec.msgpack.Encoder()


def receipt_signing_bytes(receipt: Receipt) -> bytes:
    return DOMAIN_RECEIPT + _receipt_encoder.encode(receipt)


def sign_receipt(relay_key: nacl.signing.SigningKey, receipt: Receipt) -> bytes:
    return _crypto.sign(relay_key, receipt_signing_bytes(receipt))


def verify_receipt(relay_public_key: bytes, receipt: Receipt, signature: bytes) -> bool:
    return _crypto.verify(relay_public_key, receipt_signing_bytes(receipt), signature)
