"""Measure the padding's cost on chat-like content (ADR-0016).

Run ``.venv/bin/python -m tests.measure_padding``. Not a test: it prints figures and asserts
nothing. Message lengths are log-normal (median 60 characters, a long tail to 16,000), each
sealed the way `cozy post` seals it, with its evidence.
"""

from __future__ import annotations

import random
import statistics
import time

from model import content as contentmod
from model import padding
from model.envelope import decode_body, seal_event
from model.ids import new_id
from tests.helpers import TS0, new_actor, new_collab_key

TAG = 16


def main() -> None:
    rng = random.Random(13)  # reproducible figures, not secrets
    actor, key, collab = new_actor("a"), new_collab_key(), new_id("c")
    evidence = contentmod.Evidence("dev-" + "x" * 20, 1234, b"\1" * 32, 5678, b"\2" * 32, TS0)
    lengths = [min(16_000, max(1, int(rng.lognormvariate(4.1, 1.1)))) for _ in range(20_000)]
    raw = padded = 0
    ratios = []
    body_raw = body_padded = 0
    for i, n in enumerate(lengths):
        data = contentmod.encode_content(contentmod.Message("a" * n), evidence)
        size = padding.bucket_size(len(data) + 2)
        raw += len(data) + TAG
        padded += size + TAG
        ratios.append((size + TAG) / (len(data) + TAG))
        if i < 2_000:
            signed = seal_event(
                signing_key=actor.signing_key, collab_key=key, collab_id=collab,
                actor_id=actor.account_id, kind="msg", ts=TS0, content=data,
            )  # fmt: skip
            body_padded += len(signed.body)
            body_raw += len(signed.body) - len(decode_body(signed.body).ciphertext) + len(data)
            body_raw += TAG
    deciles = statistics.quantiles(ratios, n=10)
    print(f"messages {len(lengths)}, median {statistics.median(lengths)} characters")
    print(f"ciphertext bytes: {raw} unpadded, {padded} padded: +{100 * (padded / raw - 1):.1f} %")
    print(
        f"per message: median x{statistics.median(ratios):.2f},"
        f" p90 x{deciles[-1]:.2f}, worst x{max(ratios):.2f}"
    )
    print(
        f"event bodies: {body_raw} unpadded, {body_padded} padded:"
        f" +{100 * (body_padded / body_raw - 1):.1f} %"
    )
    data = b"x" * 1000
    start = time.perf_counter()
    for _ in range(20_000):
        padding.unpad(padding.pad(data, limit=65_000))
    print(f"pad + unpad of 1 KB: {(time.perf_counter() - start) / 20_000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
