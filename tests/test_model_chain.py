"""The collab hash chain and relay receipts (SO-4: clients catch a relay that rewrites history)."""

from __future__ import annotations

import hashlib

import msgspec
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import chain
from model.chain import Head, Receipt
from model.errors import ChainMismatch
from model.ids import new_id

COLLAB = new_id("c")
RELAY_KEY = nacl.signing.SigningKey.generate()
RELAY_PK = bytes(RELAY_KEY.verify_key)


def eid(n: int) -> bytes:
    """A stand-in event id (the chain treats ids as opaque 32-byte values)."""
    return hashlib.sha256(n.to_bytes(8, "big")).digest()


def honest_history(collab_id: str, ids: list[bytes]) -> list[tuple[int, bytes, bytes]]:
    """What an honest relay delivers: (seq, event_id, chain) for each event, in order."""
    out = []
    head = chain.genesis_head(collab_id)
    for seq, event_id in enumerate(ids, start=1):
        head = chain.next_head(head, event_id)
        out.append((seq, event_id, head))
    return out


def replay(collab_id: str, delivered: list[tuple[int, bytes, bytes]]) -> Head:
    """What a client does: advance a head it trusts over each delivered event."""
    head = chain.start_of(collab_id)
    for seq, event_id, claimed in delivered:
        head = chain.advance(head, seq, event_id, claimed)
    return head


histories = st.lists(st.integers(0, 10**6), min_size=2, max_size=30, unique=True).map(
    lambda ns: [eid(n) for n in ns]
)


def test_genesis_is_deterministic_and_differs_per_collab() -> None:
    assert chain.genesis_head(COLLAB) == chain.genesis_head(COLLAB)
    assert len(chain.genesis_head(COLLAB)) == 32
    assert chain.genesis_head(COLLAB) != chain.genesis_head(new_id("c"))
    assert chain.start_of(COLLAB) == Head(seq=0, chain=chain.genesis_head(COLLAB))


@pytest.mark.objective("SO-4")
@settings(max_examples=50, deadline=None)
@given(ids=histories)
def test_honest_history_replays_without_alarm(ids: list[bytes]) -> None:
    delivered = honest_history(COLLAB, ids)
    head = replay(COLLAB, delivered)
    assert head == Head(seq=len(ids), chain=delivered[-1][2])


@pytest.mark.objective("SO-4")
@settings(max_examples=50, deadline=None)
@given(ids=histories, data=st.data())
def test_withheld_event_is_detected(ids: list[bytes], data: st.DataObject) -> None:
    delivered = honest_history(COLLAB, ids)
    dropped = data.draw(st.integers(0, len(delivered) - 2), label="dropped")
    with pytest.raises(ChainMismatch, match="expected seq"):
        replay(COLLAB, delivered[:dropped] + delivered[dropped + 1 :])


@pytest.mark.objective("SO-4")
@settings(max_examples=50, deadline=None)
@given(ids=histories, data=st.data())
def test_reordered_events_are_detected(ids: list[bytes], data: st.DataObject) -> None:
    delivered = honest_history(COLLAB, ids)
    i = data.draw(st.integers(0, len(delivered) - 2), label="i")
    j = data.draw(st.integers(i + 1, len(delivered) - 1), label="j")
    # Swap two events but keep the seqs and chain values where they were: the ids no longer fit.
    swapped = list(delivered)
    swapped[i] = (delivered[i][0], delivered[j][1], delivered[i][2])
    swapped[j] = (delivered[j][0], delivered[i][1], delivered[j][2])
    with pytest.raises(ChainMismatch):
        replay(COLLAB, swapped)
    # Swapping whole deliveries breaks the seq order instead.
    moved = list(delivered)
    moved[i], moved[j] = moved[j], moved[i]
    with pytest.raises(ChainMismatch):
        replay(COLLAB, moved)


@pytest.mark.objective("SO-4")
@settings(max_examples=50, deadline=None)
@given(ids=histories, data=st.data())
def test_replayed_or_duplicated_event_is_detected(ids: list[bytes], data: st.DataObject) -> None:
    delivered = honest_history(COLLAB, ids)
    k = data.draw(st.integers(0, len(delivered) - 1), label="k")
    with pytest.raises(ChainMismatch):
        replay(COLLAB, [*delivered[: k + 1], delivered[k], *delivered[k + 1 :]])
    # A replayed *id* at a fresh seq, with a chain value the relay made up, fails too.
    head = replay(COLLAB, delivered)
    with pytest.raises(ChainMismatch):
        chain.advance(head, head.seq + 1, delivered[k][1], delivered[k][2])


@pytest.mark.objective("SO-4")
@settings(max_examples=50, deadline=None)
@given(ids=histories, data=st.data())
def test_substituted_event_or_chain_is_detected(ids: list[bytes], data: st.DataObject) -> None:
    delivered = honest_history(COLLAB, ids)
    k = data.draw(st.integers(0, len(delivered) - 1), label="k")
    seq, event_id, claimed = delivered[k]
    forged_id = hashlib.sha256(b"forged" + event_id).digest()
    with pytest.raises(ChainMismatch):
        replay(COLLAB, [*delivered[:k], (seq, forged_id, claimed), *delivered[k + 1 :]])
    flipped = bytes([claimed[0] ^ 1]) + claimed[1:]
    with pytest.raises(ChainMismatch):
        replay(COLLAB, [*delivered[:k], (seq, event_id, flipped), *delivered[k + 1 :]])


@pytest.mark.objective("SO-4")
def test_history_from_another_collab_does_not_replay() -> None:
    ids = [eid(n) for n in range(5)]
    other = new_id("c")
    with pytest.raises(ChainMismatch):
        replay(COLLAB, honest_history(other, ids))


@pytest.mark.objective("SO-4")
def test_forked_histories_never_reach_the_same_head() -> None:
    # Two members shown different histories end at different heads, so comparing heads (or any
    # later event's seen-head) exposes the fork.
    common = [eid(n) for n in range(3)]
    a = replay(COLLAB, honest_history(COLLAB, [*common, eid(100), eid(101)]))
    b = replay(COLLAB, honest_history(COLLAB, [*common, eid(101), eid(100)]))
    c = replay(COLLAB, honest_history(COLLAB, [*common, eid(100)]))
    assert a.seq == b.seq
    assert len({a.chain, b.chain, c.chain}) == 3


def test_advance_rejects_wrong_seqs() -> None:
    head = chain.start_of(COLLAB)
    good = chain.next_head(head.chain, eid(1))
    for seq in (0, 2, -1, 10**9):
        with pytest.raises(ChainMismatch, match="expected seq 1"):
            chain.advance(head, seq, eid(1), good)
    assert chain.advance(head, 1, eid(1), good) == Head(1, good)


def test_chain_hash_is_domain_separated_and_length_prefixed() -> None:
    head = chain.genesis_head(COLLAB)
    assert chain.next_head(head, eid(1)) != hashlib.sha256(head + eid(1)).digest()
    # Moving a byte across the boundary between the two inputs changes the hash.
    assert chain.next_head(head, eid(1)) != chain.next_head(head + eid(1)[:1], eid(1)[1:])
    assert chain.genesis_head(COLLAB) != chain.next_head(b"", COLLAB.encode())


# --- receipts -------------------------------------------------------------------------------


def _receipt(seq: int = 7, n: int = 7) -> Receipt:
    return Receipt(collab_id=COLLAB, seq=seq, event_id=eid(n), chain=eid(1000 + n))


@pytest.mark.objective("SO-4")
def test_receipt_signs_and_verifies() -> None:
    receipt = _receipt()
    sig = chain.sign_receipt(RELAY_KEY, receipt)
    assert len(sig) == 64
    assert chain.verify_receipt(RELAY_PK, receipt, sig)
    # Receipts survive transit as plain msgpack (clients keep them as evidence).
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(receipt), type=Receipt)
    assert chain.verify_receipt(RELAY_PK, back, sig)


@pytest.mark.objective("SO-4")
@pytest.mark.parametrize(
    "tampered",
    [
        Receipt(collab_id=new_id("c"), seq=7, event_id=eid(7), chain=eid(1007)),
        Receipt(collab_id=COLLAB, seq=8, event_id=eid(7), chain=eid(1007)),
        Receipt(collab_id=COLLAB, seq=7, event_id=eid(8), chain=eid(1007)),
        Receipt(collab_id=COLLAB, seq=7, event_id=eid(7), chain=eid(1008)),
    ],
    ids=["collab_id", "seq", "event_id", "chain"],
)
def test_receipt_fails_on_any_tampered_field(tampered: Receipt) -> None:
    sig = chain.sign_receipt(RELAY_KEY, _receipt())
    assert not chain.verify_receipt(RELAY_PK, tampered, sig)


@pytest.mark.objective("SO-4")
@settings(max_examples=80, deadline=None)
@given(pos=st.integers(0, 63), mask=st.integers(1, 255))
def test_receipt_fails_on_any_flipped_signature_byte(pos: int, mask: int) -> None:
    receipt = _receipt()
    sig = bytearray(chain.sign_receipt(RELAY_KEY, receipt))
    sig[pos] ^= mask
    assert not chain.verify_receipt(RELAY_PK, receipt, bytes(sig))


@pytest.mark.objective("SO-4")
def test_receipt_fails_under_another_relay_key_or_malformed_signature() -> None:
    receipt = _receipt()
    sig = chain.sign_receipt(RELAY_KEY, receipt)
    other = bytes(nacl.signing.SigningKey.generate().verify_key)
    assert not chain.verify_receipt(other, receipt, sig)
    for bad_sig in (b"", sig[:-1], sig + b"\x00", bytes(64)):
        assert not chain.verify_receipt(RELAY_PK, receipt, bad_sig)
    for bad_pk in (b"", RELAY_PK[:-1], bytes(32)):
        assert not chain.verify_receipt(bad_pk, receipt, sig)


@pytest.mark.objective("SO-4")
def test_equivocating_receipts_are_transferable_evidence() -> None:
    # The relay tells two members different events sit at seq 7. Both receipts verify under the
    # relay's key, so anyone holding both can prove the relay lied about one position.
    first = _receipt(seq=7, n=7)
    second = _receipt(seq=7, n=8)
    sig1 = chain.sign_receipt(RELAY_KEY, first)
    sig2 = chain.sign_receipt(RELAY_KEY, second)
    assert chain.verify_receipt(RELAY_PK, first, sig1)
    assert chain.verify_receipt(RELAY_PK, second, sig2)
    assert (first.collab_id, first.seq) == (second.collab_id, second.seq)
    assert first.event_id != second.event_id
    # Neither signature can be passed off for the other statement.
    assert not chain.verify_receipt(RELAY_PK, first, sig2)
    assert not chain.verify_receipt(RELAY_PK, second, sig1)


@pytest.mark.objective("SO-4")
def test_receipt_signature_is_domain_separated() -> None:
    receipt = _receipt()
    bare = RELAY_KEY.sign(msgspec.msgpack.encode(receipt)).signature
    assert not chain.verify_receipt(RELAY_PK, receipt, bare)
    assert chain.receipt_signing_bytes(receipt).startswith(chain.DOMAIN_RECEIPT)
