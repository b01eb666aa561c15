"""Same-run references for the relay's figures: what the naive design and the machine give.

- `per_event_commit`: the same events written straight to the same Postgres with psycopg, one
  INSERT and one commit each (``synchronous_commit=on``, as the relay) into a table shaped like
  the ledger's. The relay's throughput over this is its group-commit ratio; the per-commit
  latencies are the floor under any "acked means durable" append.
- `verify_ceiling`: Ed25519 verifications per second of the same events' signatures on one
  thread (PyNaCl, the relay's own primitive): the relay verifies every event, so one core's
  verify rate is the machine's ceiling for a single-threaded verifier.

Both run in worker threads (they block).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import psycopg

from cozy.bench._common import percentiles
from model import _crypto
from model.envelope import DOMAIN_EVENT, decode_body, event_id

if TYPE_CHECKING:
    from collections.abc import Sequence

    from model.envelope import SignedEvent

_TABLE = "bench_per_event_commit"


DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")


def database_settings(database_url: str) -> dict[str, str]:
    """The Postgres settings that decide what a commit costs, as the bench's sessions see them."""
    with psycopg.connect(database_url) as conn:
        return {
            name: str(conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0])  # type: ignore[index]
            for name in DURABILITY_SETTINGS
        }


def per_event_commit(database_url: str, events: Sequence[SignedEvent]) -> dict[str, Any]:
    """INSERT + COMMIT per event; events/s and the per-commit latency percentiles."""
    rows = []
    for i, ev in enumerate(events, 1):
        body = decode_body(ev.body)
        rows.append(
            (body.collab_id, i, event_id(ev), body.actor_id, body.kind, body.ts, ev.body, ev.sig)
        )
    with psycopg.connect(database_url) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {_TABLE}")
        conn.execute(
            f"CREATE TABLE {_TABLE} (collab_id text NOT NULL, seq bigint NOT NULL,"
            " event_id bytea NOT NULL UNIQUE, actor_id text NOT NULL, kind text NOT NULL,"
            " ts bigint NOT NULL, body bytea NOT NULL, sig bytea NOT NULL,"
            " PRIMARY KEY (collab_id, seq))"
        )
        conn.commit()
        took: list[float] = []
        started = time.perf_counter()
        for row in rows:
            t = time.perf_counter()
            conn.execute(
                f"INSERT INTO {_TABLE} (collab_id, seq, event_id, actor_id, kind, ts, body, sig)"  # noqa: S608 — constant table name
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                row,
            )
            conn.commit()
            took.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        conn.execute(f"DROP TABLE {_TABLE}")
        conn.commit()
    return {
        "events": len(rows),
        "events_per_s": round(len(rows) / elapsed, 1),
        "commit": percentiles(took),
    }


def verify_ceiling(events: Sequence[SignedEvent], public_key: bytes) -> dict[str, Any]:
    """Ed25519 verifications/s of `events` on one thread, repeated to at least 0.5 s."""
    messages = [(DOMAIN_EVENT + ev.body, ev.sig) for ev in events]
    done = 0
    started = time.perf_counter()
    while True:
        for message, sig in messages:
            if not _crypto.verify(public_key, message, sig):
                raise AssertionError("a bench event failed to verify")
        done += len(messages)
        elapsed = time.perf_counter() - started
        if elapsed >= 0.5:
            break
    return {
        "verifications": done,
        "per_s": round(done / elapsed, 1),
        "us_each": round(elapsed / done * 1e6, 2),
    }
