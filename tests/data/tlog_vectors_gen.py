"""Regenerate tests/data/tlog_vectors.json from aics-tlog / aics-witness 0.2.1 / 0.1.0.

Those packages are an independent Python implementation of the C2SP specs, but they require
Python >= 3.12 while this project is pinned to 3.11, so they cannot be dev dependencies. Their
outputs are recorded here instead: every signature is deterministic (Ed25519, fixed seeds and
timestamps), so tests/test_model_tlog_interop.py recomputes OUR bytes for the same inputs and
compares them with THEIR recorded bytes, and feeds their requests and replies to our parsers.

Run (from the repository root, with both wheels unpacked under $AICS):
    PYTHONPATH=$AICS/aics_tlog:$AICS/aics_witness:. .venv/bin/python tests/data/tlog_vectors_gen.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import aics_tlog as a  # type: ignore[import-not-found]
from aics_witness.config import LogConfig  # type: ignore[import-not-found]
from aics_witness.protocol import format_add_checkpoint_request  # type: ignore[import-not-found]
from aics_witness.service import Witness, WitnessError  # type: ignore[import-not-found]
from aics_witness.store import WitnessStore  # type: ignore[import-not-found]
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from model import merkle, note, tlog

LOG_SEED = bytes(range(32))
WITNESS_SEED = bytes(range(100, 132))
ORIGIN = "relay.example/collab/0123abcd"
WITNESS = "witness.example/w1"
LEAVES = [f"event-{i}".encode() for i in range(21)]
TS = 1767000000


def main() -> None:
    out: dict[str, object] = {"generator": "aics-tlog 0.2.1, aics-witness 0.1.0", "origin": ORIGIN}
    log_key = Ed25519PrivateKey.from_private_bytes(LOG_SEED)
    wit_key = Ed25519PrivateKey.from_private_bytes(WITNESS_SEED)
    out["log_seed_hex"] = LOG_SEED.hex()
    out["witness_seed_hex"] = WITNESS_SEED.hex()
    out["leaves"] = [x.decode() for x in LEAVES]

    # Their tree: roots, proofs.
    tree = a.MerkleTree(LEAVES)
    b64 = note.b64encode
    out["roots"] = {str(n): b64(tree.root(n)) for n in range(len(LEAVES) + 1)}
    out["inclusion"] = [
        {"index": i, "size": n, "proof": [b64(p) for p in tree.inclusion_proof(i, n)]}
        for n in (1, 7, 8, 13, 21)
        for i in range(n)
    ]
    out["consistency"] = [
        {"old": m, "new": n, "proof": [b64(p) for p in tree.consistency_proof(m, n)]}
        for n in (8, 13, 21)
        for m in range(1, n)
    ]

    # Their signed checkpoints and keys.
    out["log_vkey"] = a.format_vkey(a.vkey_from_ed25519(ORIGIN, log_key.public_key()))
    out["witness_vkey"] = a.format_vkey(a.cosignature_vkey(WITNESS, wit_key.public_key()))
    cps = {}
    for n in (0, 13, 21):
        cp = a.Checkpoint(ORIGIN, n, tree.root(n))
        cps[str(n)] = a.sign_checkpoint(cp, log_key, ORIGIN).serialise()
    out["checkpoints"] = cps
    _, cos = a.sign_cosignature(wit_key, WITNESS, TS, ORIGIN, 21, tree.root(21))
    out["cosignature_21"] = {
        "timestamp": TS,
        "line": a.Note(text="", signatures=(cos,)).serialise()[1:],
    }

    # Their witness answering requests that OUR code builds.
    ours_log = note.NoteSigner(ORIGIN, LOG_SEED)
    leaf_hashes = [merkle.leaf_hash(x) for x in LEAVES]

    def our_cp(n: int) -> bytes:
        return tlog.sign_checkpoint(
            tlog.Checkpoint(ORIGIN, n, merkle.tree_root(leaf_hashes[:n])), ours_log
        )

    replies = []
    with tempfile.TemporaryDirectory() as tmp:
        store = WitnessStore(Path(tmp) / "w.db", create=True)
        vk = a.vkey_from_ed25519(ORIGIN, log_key.public_key())
        wit = Witness(WITNESS, wit_key, store, [LogConfig(ORIGIN, (vk,))], clock=lambda: TS)
        bad_proof = [bytes(32)] * len(merkle.consistency_proof(leaf_hashes[:21], 13))
        steps = [
            ("first from zero", tlog.AddCheckpointRequest(0, (), our_cp(13))),
            ("wrong old size", tlog.AddCheckpointRequest(5, (), our_cp(21))),
            ("bad proof", tlog.AddCheckpointRequest(13, tuple(bad_proof), our_cp(21))),
            (
                "grow 13 to 21",
                tlog.AddCheckpointRequest(
                    13, merkle.consistency_proof(leaf_hashes[:21], 13), our_cp(21)
                ),
            ),
        ]
        for label, req in steps:
            body = req.encode()
            try:
                reply = wit.add_checkpoint(body)
                replies.append(
                    {
                        "label": label,
                        "request": body.decode(),
                        "status": 200,
                        "body": reply.decode(),
                    }
                )
            except WitnessError as e:
                replies.append(
                    {
                        "label": label,
                        "request": body.decode(),
                        "status": e.status,
                        "body": (e.body or b"").decode() if isinstance(e.body, bytes) else "",
                    }
                )
    out["their_witness_on_our_requests"] = replies

    # Their request format, for our witness.
    their_req = format_add_checkpoint_request(
        13, tree.consistency_proof(13, 21), cps["21"].encode()
    )
    out["their_request_13_21"] = their_req.decode()
    Path(__file__).with_name("tlog_vectors.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
