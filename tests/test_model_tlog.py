"""Checkpoints, cosignatures and the witness decision (model/tlog.py), and interop with two
independent implementations of the C2SP specs.

- `metamorphic-log` (Rust, a dev dependency) verifies the checkpoints we sign and the inclusion
  and consistency proofs we make. It has no cosignature (0x04) support.
- `aics-tlog` / `aics-witness` (Python >= 3.12, so not installable here) were run once by
  tests/data/tlog_vectors_gen.py; tests/data/tlog_vectors.json holds what they produced. Every
  signature is deterministic, so we recompute ours for the same keys and inputs and compare
  bytes, and feed their requests and replies to our parsers and our witness.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import metamorphic_log as ml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import merkle
from model.merkle import EMPTY_ROOT, leaf_hash, tree_root
from model.note import (
    ALG_COSIGNATURE_V1,
    MalformedNote,
    NoteError,
    NoteSignatureInvalid,
    NoteSigner,
    NoteUnverified,
    NoteVerifier,
    b64decode_strict,
    b64encode,
    open_note,
    parse_note,
)
from model.tlog import (
    SIZE_CONTENT_TYPE,
    AddCheckpointRequest,
    Checkpoint,
    MalformedCheckpoint,
    MalformedWitnessMessage,
    QuorumNotMet,
    WrongOrigin,
    add_signatures,
    cosign_checkpoint,
    encode_cosignature_reply,
    encode_size_body,
    open_checkpoint,
    parse_add_checkpoint_request,
    parse_checkpoint,
    parse_cosignature_reply,
    parse_size_body,
    sign_checkpoint,
    witness_add_checkpoint,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "tlog_vectors.json").read_text()
)
ORIGIN = "relay.example/collab/0123abcd"
LOG = NoteSigner(ORIGIN, bytes(range(32)))
W1 = NoteSigner("witness.example/w1", bytes(range(100, 132)), ALG_COSIGNATURE_V1)
W2 = NoteSigner("witness.example/w2", bytes(range(1, 33)), ALG_COSIGNATURE_V1)
LEAVES = [leaf_hash(f"event-{i}".encode()) for i in range(21)]
NOW = 1_767_000_000


def checkpoint(n: int) -> Checkpoint:
    return Checkpoint(ORIGIN, n, tree_root(LEAVES[:n]))


# --- Checkpoint bodies ---------------------------------------------------------------------------


def test_a_checkpoint_body_is_byte_exact() -> None:
    cp = Checkpoint(ORIGIN, 13, bytes(range(32)), ("ext one",))
    body = f"{ORIGIN}\n13\n{b64encode(bytes(range(32)))}\next one\n"
    assert cp.body() == body
    assert parse_checkpoint(body) == cp
    assert Checkpoint(ORIGIN, 0, EMPTY_ROOT).body().split("\n")[1] == "0"


@pytest.mark.parametrize(
    "body",
    [
        "",
        f"{ORIGIN}\n13\n",  # two lines
        f"{ORIGIN}\n013\n{b64encode(bytes(32))}\n",  # leading zero
        f"{ORIGIN}\n+13\n{b64encode(bytes(32))}\n",
        f"{ORIGIN}\n1_3\n{b64encode(bytes(32))}\n",  # Python's int() would take it
        f"{ORIGIN}\n\u0661\u0663\n{b64encode(bytes(32))}\n",  # so would these (Arabic-Indic digits)
        f"{ORIGIN}\n{2**63}\n{b64encode(bytes(32))}\n",
        f"{ORIGIN}\n13\n{b64encode(bytes(31))}\n",  # short root
        f"{ORIGIN}\n13\n{b64encode(bytes(32))[:-1]}\n",  # base64 without padding
        f"{ORIGIN}\n13\n{b64encode(bytes(32))}",  # no final newline
        f"{ORIGIN}\n13\n{b64encode(bytes(32))}\n\n",  # an empty extension line
        f"\n13\n{b64encode(bytes(32))}\n",  # empty origin
        f"{ORIGIN}\n0\n{b64encode(bytes(32))}\n",  # size 0 with a root that is not empty's
        f"{ORIGIN}\r\n13\n{b64encode(bytes(32))}\n",
    ],
)
def test_malformed_checkpoint_bodies_are_refused(body: str) -> None:
    with pytest.raises(MalformedCheckpoint):
        parse_checkpoint(body)


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(0, 2**63 - 1),
    root=st.binary(min_size=32, max_size=32),
    # Text a note can carry: UTF-8 (no lone surrogates), no control characters or newlines.
    extensions=st.lists(
        st.text(st.characters(min_codepoint=32, exclude_categories=("Cs",)), min_size=1),
        max_size=3,
    ),
)
def test_checkpoints_round_trip(size: int, root: bytes, extensions: list[str]) -> None:
    if size == 0:
        root = EMPTY_ROOT
    cp = Checkpoint(ORIGIN, size, root, tuple(extensions))
    assert parse_checkpoint(cp.body()) == cp
    assert open_checkpoint(sign_checkpoint(cp, LOG), LOG.verifier).checkpoint == cp


# --- Opening checkpoints with a witness quorum ---------------------------------------------------


def cosigned(n: int, *witnesses: NoteSigner) -> bytes:
    cp = checkpoint(n)
    lines = [cosign_checkpoint(cp, w, NOW + i) for i, w in enumerate(witnesses)]
    return add_signatures(sign_checkpoint(cp, LOG), lines)


def test_a_quorum_of_witnesses_is_counted_by_distinct_trusted_witness() -> None:
    note = cosigned(13, W1, W2)
    opened = open_checkpoint(note, LOG.verifier, witnesses=[W1.verifier, W2.verifier], quorum=2)
    assert opened.checkpoint == checkpoint(13)
    assert opened.cosigned_at == {W1.name: NOW, W2.name: NOW + 1}
    with pytest.raises(QuorumNotMet):
        open_checkpoint(
            cosigned(13, W1, W1), LOG.verifier, witnesses=[W1.verifier, W2.verifier], quorum=2
        )
    with pytest.raises(QuorumNotMet):  # a cosigner we do not trust counts for nothing
        open_checkpoint(cosigned(13, W2), LOG.verifier, witnesses=[W1.verifier], quorum=1)


@pytest.mark.objective("SO-4")
def test_a_checkpoint_is_refused_without_the_logs_own_signature_or_for_another_origin() -> None:
    cp = checkpoint(13)
    only_witness = (cp.body() + "\n" + cosign_checkpoint(cp, W1, NOW).line()).encode()
    with pytest.raises(NoteUnverified):
        open_checkpoint(only_witness, LOG.verifier, witnesses=[W1.verifier], quorum=1)
    other = Checkpoint("relay.example/collab/other", 13, cp.root)
    with pytest.raises(WrongOrigin):
        open_checkpoint(sign_checkpoint(other, LOG), LOG.verifier)
    with pytest.raises(NoteSignatureInvalid):  # a cosignature moved onto another checkpoint
        moved = cosign_checkpoint(checkpoint(12), W1, NOW)
        open_checkpoint(
            add_signatures(sign_checkpoint(cp, LOG), [moved]),
            LOG.verifier,
            witnesses=[W1.verifier],
        )


@pytest.mark.objective("SO-4")
def test_a_cosignature_with_another_timestamp_is_refused() -> None:
    """The timestamp is signed: a relay cannot make an old cosignature look fresh."""
    cp = checkpoint(13)
    line = cosign_checkpoint(cp, W1, NOW)
    fresher = type(line)(
        line.name, line.key_id, (NOW + 3600).to_bytes(8, "big") + line.signature[8:]
    )
    with pytest.raises(NoteSignatureInvalid):
        open_checkpoint(
            add_signatures(sign_checkpoint(cp, LOG), [fresher]),
            LOG.verifier,
            witnesses=[W1.verifier],
        )


# --- Witness protocol bodies ---------------------------------------------------------------------


def test_witness_bodies_round_trip_and_refuse_junk() -> None:
    req = AddCheckpointRequest(
        13, merkle.consistency_proof(LEAVES, 13), sign_checkpoint(checkpoint(21), LOG)
    )
    assert parse_add_checkpoint_request(req.encode()) == req
    assert parse_size_body(encode_size_body(13)) == 13
    line = cosign_checkpoint(checkpoint(21), W1, NOW)
    assert parse_cosignature_reply(encode_cosignature_reply([line])) == (line,)
    for junk in (
        b"old 013\n\n" + req.checkpoint,
        b"old 1\nAAAA\n\n" + req.checkpoint,  # a proof line that is not 32 bytes
        b"old 1\n"
        + b"".join(b64encode(bytes(32)).encode() + b"\n" for _ in range(64))
        + b"\n"
        + req.checkpoint,  # 64 proof lines
        b"new 1\n\n" + req.checkpoint,
        b"old 1\n",
        b"old 1\n\n",
    ):
        with pytest.raises(MalformedWitnessMessage):
            parse_add_checkpoint_request(junk)
    for junk in (b"13", b"013\n", b"-1\n", b"13\n\n"):
        with pytest.raises(MalformedWitnessMessage):
            parse_size_body(junk)
    with pytest.raises(MalformedWitnessMessage):
        parse_cosignature_reply(b"")


# --- The witness decision -------------------------------------------------------------------------


def decide(req: AddCheckpointRequest | bytes, latest: dict[str, Checkpoint]) -> Any:
    body = req if isinstance(req, bytes) else req.encode()
    return witness_add_checkpoint(
        body, logs={ORIGIN: [LOG.verifier]}, latest=latest, cosigner=W1, now=NOW
    )


@pytest.mark.objective("SO-4")
def test_the_witness_cosigns_only_consistent_growth() -> None:
    """The tlog-witness status table, driven as a relay and a forking relay would."""
    first = decide(AddCheckpointRequest(0, (), sign_checkpoint(checkpoint(13), LOG)), {})
    assert first.status == 200
    assert first.cosigned == checkpoint(13)
    (line,) = parse_cosignature_reply(first.body)
    opened = open_checkpoint(
        add_signatures(sign_checkpoint(checkpoint(13), LOG), [line]),
        LOG.verifier,
        witnesses=[W1.verifier],
        quorum=1,
    )
    assert opened.cosigned_at == {W1.name: NOW}

    state = {ORIGIN: checkpoint(13)}
    grow = AddCheckpointRequest(
        13, merkle.consistency_proof(LEAVES, 13), sign_checkpoint(checkpoint(21), LOG)
    )
    assert decide(grow, state).status == 200
    assert decide(grow, state).cosigned == checkpoint(21)

    stale = decide(AddCheckpointRequest(5, (), grow.checkpoint), state)
    assert (stale.status, stale.body, stale.content_type) == (409, b"13\n", SIZE_CONTENT_TYPE)

    forked_leaves = [*LEAVES[:3], leaf_hash(b"rewritten"), *LEAVES[4:]]
    fork = Checkpoint(ORIGIN, 21, tree_root(forked_leaves))
    forged = AddCheckpointRequest(
        13, merkle.consistency_proof(forked_leaves, 13), sign_checkpoint(fork, LOG)
    )
    refused = decide(forged, state)
    assert refused.status == 422
    assert refused.cosigned is None

    same_size_other_root = Checkpoint(ORIGIN, 13, tree_root(forked_leaves[:13]))
    assert (
        decide(
            AddCheckpointRequest(13, (), sign_checkpoint(same_size_other_root, LOG)), state
        ).status
        == 409
    )

    shrink = AddCheckpointRequest(21, (), sign_checkpoint(checkpoint(13), LOG))
    assert decide(shrink, {ORIGIN: checkpoint(21)}).status == 400

    stranger = NoteSigner(ORIGIN, bytes(32))
    assert (
        decide(
            AddCheckpointRequest(13, (), sign_checkpoint(checkpoint(21), stranger)), state
        ).status
        == 403
    )
    tampered = bytearray(grow.encode())
    tampered[-10] ^= 1
    assert decide(bytes(tampered), state).status in (400, 403)

    unknown = Checkpoint("relay.example/collab/unknown", 13, checkpoint(13).root)
    assert decide(AddCheckpointRequest(0, (), sign_checkpoint(unknown, LOG)), {}).status == 404
    assert decide(b"old 0\n\nnot a note", {}).status == 400


# --- Interop: metamorphic-log (live) ---------------------------------------------------------------


def test_metamorphic_log_verifies_our_checkpoints_and_proofs() -> None:
    note = sign_checkpoint(checkpoint(21), LOG).decode()
    head = ml.checkpoint_verify(note, [LOG.verifier.vkey()])
    assert (head.origin, head.size, head.root) == (ORIGIN, 21, checkpoint(21).root)
    assert ml.verify_signed_note(note, [LOG.verifier.vkey()]) == 1
    for i in range(21):
        ml.checkpoint_verify_inclusion(
            note, [LOG.verifier.vkey()], i, LEAVES[i], list(merkle.inclusion_proof(LEAVES, i))
        )
    older = sign_checkpoint(checkpoint(13), LOG).decode()
    ml.checkpoint_verify_consistency(
        older, note, [LOG.verifier.vkey()], list(merkle.consistency_proof(LEAVES, 13))
    )
    tampered = list(merkle.consistency_proof(LEAVES, 13))
    tampered[0] = bytes(32)
    with pytest.raises(ml.VerifyError):
        ml.checkpoint_verify_consistency(older, note, [LOG.verifier.vkey()], tampered)
    forged = note.replace("\n21\n", "\n22\n")
    with pytest.raises(ml.VerifyError):
        ml.checkpoint_verify(forged, [LOG.verifier.vkey()])


# --- Interop: aics-tlog / aics-witness (recorded) --------------------------------------------------


def test_our_tree_matches_aics_tlog() -> None:
    leaves = [leaf_hash(x.encode()) for x in VECTORS["leaves"]]
    for n, root in VECTORS["roots"].items():
        assert b64encode(tree_root(leaves[: int(n)])) == root
    for case in VECTORS["inclusion"]:
        proof = merkle.inclusion_proof(leaves[: case["size"]], case["index"])
        assert [b64encode(p) for p in proof] == case["proof"]
    for case in VECTORS["consistency"]:
        proof = merkle.consistency_proof(leaves[: case["new"]], case["old"])
        assert [b64encode(p) for p in proof] == case["proof"]


def test_our_keys_checkpoints_and_cosignatures_equal_aics_byte_for_byte() -> None:
    log = NoteSigner(ORIGIN, bytes.fromhex(VECTORS["log_seed_hex"]))
    wit = NoteSigner(
        "witness.example/w1", bytes.fromhex(VECTORS["witness_seed_hex"]), ALG_COSIGNATURE_V1
    )
    assert log.verifier.vkey() == VECTORS["log_vkey"]
    assert wit.verifier.vkey() == VECTORS["witness_vkey"]
    assert NoteVerifier.from_vkey(VECTORS["witness_vkey"]) == wit.verifier
    for n, their_note in VECTORS["checkpoints"].items():
        cp = checkpoint(int(n)) if int(n) else Checkpoint(ORIGIN, 0, EMPTY_ROOT)
        assert sign_checkpoint(cp, log).decode() == their_note
        assert open_checkpoint(their_note.encode(), log.verifier).checkpoint == cp
    cos = VECTORS["cosignature_21"]
    assert cosign_checkpoint(checkpoint(21), wit, cos["timestamp"]).line() == cos["line"]


def test_aics_witness_cosigned_our_requests_and_we_verify_its_cosignatures() -> None:
    """Their witness, fed requests our code built: same statuses as ours, and its cosignatures
    verify under our opener with its verifier key."""
    their_witness = NoteVerifier.from_vkey(VECTORS["witness_vkey"])
    state: dict[str, Checkpoint] = {}
    for step in VECTORS["their_witness_on_our_requests"]:
        body = step["request"].encode()
        ours = witness_add_checkpoint(
            body,
            logs={ORIGIN: [LOG.verifier]},
            latest=state,
            cosigner=NoteSigner(
                W1.name, bytes.fromhex(VECTORS["witness_seed_hex"]), ALG_COSIGNATURE_V1
            ),
            now=NOW,
        )
        assert ours.status == step["status"], step["label"]
        if step["status"] == 409:
            assert parse_size_body(step["body"].encode()) == parse_size_body(ours.body)
        if step["status"] == 200:
            assert ours.body.decode() == step["body"]  # deterministic: the very same line
            request = parse_add_checkpoint_request(body)
            full = add_signatures(
                request.checkpoint, parse_cosignature_reply(step["body"].encode())
            )
            opened = open_checkpoint(full, LOG.verifier, witnesses=[their_witness], quorum=1)
            assert ours.cosigned == opened.checkpoint
            state = {ORIGIN: opened.checkpoint}


def test_our_witness_cosigns_aics_requests() -> None:
    """A request aics built for its own signed checkpoint; our witness cosigns it."""
    body = VECTORS["their_request_13_21"].encode()
    reply = witness_add_checkpoint(
        body, logs={ORIGIN: [LOG.verifier]}, latest={ORIGIN: checkpoint(13)}, cosigner=W1, now=NOW
    )
    assert reply.status == 200
    request = parse_add_checkpoint_request(body)
    full = add_signatures(request.checkpoint, parse_cosignature_reply(reply.body))
    assert open_checkpoint(
        full, LOG.verifier, witnesses=[W1.verifier], quorum=1
    ).checkpoint == checkpoint(21)


def test_an_unparseable_note_inside_a_request_is_malformed() -> None:
    with pytest.raises(MalformedNote):
        parse_note(parse_add_checkpoint_request(b"old 0\n\nno signatures\n").checkpoint)
    assert b64decode_strict(b64encode(b"x")) == b"x"


# --- Hostile bytes: typed errors only --------------------------------------------------------------


def near_valid_inputs() -> st.SearchStrategy[bytes]:
    """Valid bodies with a few bytes changed, cut or inserted, and plain random bytes."""
    valid = [
        AddCheckpointRequest(
            13,
            merkle.consistency_proof(LEAVES, 13),
            add_signatures(
                sign_checkpoint(checkpoint(21), LOG), [cosign_checkpoint(checkpoint(21), W1, NOW)]
            ),
        ).encode(),
        sign_checkpoint(checkpoint(21), LOG),
        LOG.verifier.vkey().encode(),
    ]

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(valid)))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip" and at < len(data):
                data[at] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del data[at : at + draw(st.integers(1, 8))]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=4))
        return bytes(data)

    return st.one_of(mutate(), st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(body=near_valid_inputs())
def test_hostile_bytes_raise_only_typed_errors_and_the_witness_always_answers(body: bytes) -> None:
    for parse in (
        parse_note,
        parse_add_checkpoint_request,
        parse_cosignature_reply,
        parse_size_body,
        lambda b: open_note(b, [LOG.verifier, W1.verifier]),
        lambda b: open_checkpoint(b, LOG.verifier, witnesses=[W1.verifier], quorum=1),
        lambda b: parse_checkpoint(b.decode("utf-8", "surrogateescape")),
        lambda b: NoteVerifier.from_vkey(b.decode("utf-8", "surrogateescape")),
    ):
        with contextlib.suppress(NoteError):
            parse(body)
    reply = witness_add_checkpoint(
        body, logs={ORIGIN: [LOG.verifier]}, latest={ORIGIN: checkpoint(13)}, cosigner=W2, now=NOW
    )
    assert reply.status in (200, 400, 403, 404, 409, 422)
    if reply.status == 200:  # only ever for the one consistent checkpoint the log signed
        assert reply.cosigned == checkpoint(21)


@pytest.mark.objective("SO-4")
@settings(max_examples=120, deadline=None)
@given(
    fork_at=st.integers(0, 12),
    steps=st.lists(
        st.tuples(st.sampled_from("ab"), st.integers(1, 24), st.integers(0, 24)),
        min_size=1,
        max_size=12,
    ),
)
def test_a_forking_relay_never_gets_two_inconsistent_checkpoints_cosigned(
    fork_at: int, steps: list[tuple[str, int, int]]
) -> None:
    """A relay keeps two branches that share `fork_at` events and submits checkpoints of either
    branch in any order, each with a correct proof (within its branch) from whatever old size it
    claims, retrying with the witness's size after a 409. However it interleaves them, every pair of checkpoints the witness cosigned is a prefix pair: a split
    view can never carry the same witness's cosignature on both sides."""
    branch = {
        "a": [leaf_hash(f"a{i}".encode()) if i >= fork_at else LEAVES[i] for i in range(24)],
        "b": [leaf_hash(f"b{i}".encode()) if i >= fork_at else LEAVES[i] for i in range(24)],
    }
    latest: dict[str, Checkpoint] = {}
    cosigned: list[tuple[str, Checkpoint]] = []
    for name, size, claimed_old in steps:
        leaves = branch[name][:size]
        old = min(claimed_old, size)
        cp = Checkpoint(ORIGIN, size, tree_root(leaves))
        request = AddCheckpointRequest(
            old, merkle.consistency_proof(leaves, old), sign_checkpoint(cp, LOG)
        )
        reply = decide(request, latest)
        if reply.status == 409:  # as a real relay does: learn the witness's size, try again
            old = parse_size_body(reply.body)
            if old <= size:
                proof = merkle.consistency_proof(leaves, old)
                reply = decide(AddCheckpointRequest(old, proof, request.checkpoint), latest)
        if reply.status == 200:
            assert reply.cosigned == cp
            latest = {ORIGIN: cp}
            cosigned.append((name, cp))
    for _, small in cosigned:
        for name, big in cosigned:
            if small.size <= big.size:
                assert tree_root(branch[name][: small.size]) == small.root
