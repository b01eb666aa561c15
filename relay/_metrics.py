"""The relay's Prometheus metrics, served by the operations listener at `/metrics` (relay/_ops.py).

One `CollectorRegistry` per relay, never the process-global one. Most values are read at scrape
time from the actors' `statistics()` snapshots (`RelayCollector`), so the sequencer and fan-out
loops pay nothing for them; the two histograms are observed once per ledger commit. Counters
the relay bumps itself (`AuthCounters`) are plain attributes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from fanout import FanoutStats
    from relay._server import RelayStats
    from relay._writer import WriterStats

# Events per group-commit transaction: one busy collab sends up to 256 per batch, the writer
# takes up to 4096 per transaction.
COMMIT_EVENT_BUCKETS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 4096)
COMMIT_SECONDS_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


# --- counters the relay bumps -------------------------------------------------------------------


@dataclass
class AuthCounters:
    """Refused logins and tokens, by reason, and lockouts begun. O(1) per refusal.

    Reasons: `invalid_credentials` (wrong password or unknown handle: deliberately one reason,
    as the answer is one), `locked_out` (refused unverified while the handle is locked),
    `expired_token`, `invalid_token`, `revoked_token`.
    """

    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    lockouts: int = 0

    def failed(self, reason: str, *, locked: bool = False) -> None:
        """Count one refusal; `locked` when this failure put the handle under a lock."""
        self.failures[reason] += 1
        if locked:
            self.lockouts += 1


class AccessCounters(Protocol):
    """What the Cloudflare Access gate's `statistics()` offers (relay/_cf_access.py)."""

    @property
    def verified(self) -> int: ...
    @property
    def jwks_fetches(self) -> int: ...
    @property
    def jwks_fetch_failures(self) -> int: ...
    @property
    def refused_by_reason(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class MetricSources:
    """Where `RelayCollector` reads at scrape time: each a cheap snapshot on the Trio loop."""

    relay: Callable[[], RelayStats]
    writer: Callable[[], WriterStats | None]
    auth: AuthCounters
    # The Cloudflare Access gate, when one is configured (None: no cf_access metrics).
    cf_access: Callable[[], AccessCounters | None]


# --- metrics --------------------------------------------------------------------------------------


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class RelayCollector(Collector):
    """Turns the actors' `statistics()` snapshots into metric families at scrape time."""

    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self._sources
        relay = s.relay()
        yield _gauge("cozy_connections", "Open WebSocket connections.", relay.connections)
        yield _counter(
            "cozy_connections_accepted",
            "WebSocket connections accepted since start.",
            relay.accepted_total,
        )
        yield _counter(
            "cozy_connection_limit_refusals",
            "Connections refused because the relay held its maximum.",
            relay.connection_limit_refusals,
        )
        yield _gauge(
            "cozy_outbox_queued_frames",
            "Frames queued in all connections' outboxes, not yet written to their sockets.",
            relay.outbox_frames,
        )
        yield _gauge(
            "cozy_outbox_queued_bytes",
            "Bytes queued in all connections' outboxes.",
            relay.outbox_bytes,
        )
        yield _gauge(
            "cozy_outbox_queued_frames_max",
            "The fullest connection outbox, in frames: a subscriber this far behind is cut as"
            " lagging when its outbox fills.",
            relay.outbox_frames_max,
        )
        yield _gauge(
            "cozy_appends_in_flight",
            "Appends received and not yet acknowledged or refused.",
            relay.appends_in_flight,
        )
        yield _counter(
            "cozy_overloaded_refusals",
            "Requests refused with `overloaded` because a bound was reached.",
            relay.overloaded_total,
        )
        writer = s.writer()
        if writer is not None:
            yield _counter(
                "cozy_events_appended",
                "Events newly written to the ledger (retried duplicates not counted).",
                writer.events - writer.duplicates,
            )
            yield _counter(
                "cozy_append_duplicates",
                "Retried appends answered with the seq they already had.",
                writer.duplicates,
            )
            yield _counter(
                "cozy_ledger_commits", "Group-commit transactions committed.", writer.transactions
            )
            yield _counter(
                "cozy_ledger_commit_failures",
                "Group-commit transactions that failed; nothing of them was written.",
                writer.failed_transactions,
            )
            yield _counter(
                "cozy_ledger_stalled_groups",
                "Group commits the writer stopped waiting for after writer_stall_ms (a commit in"
                " doubt); later groups were written beside them.",
                writer.stalled_groups,
            )
        yield _gauge(
            "cozy_signature_workers_ready",
            "Signature-check worker processes ready (none until the first burst of appends).",
            relay.signature_workers_ready,
        )
        yield _counter(
            "cozy_signature_workers_lost",
            "Signature-check workers that died, hung or answered out of step and were replaced;"
            " the crypto threads checked their batches.",
            relay.signature_workers_lost,
        )
        yield _counter(
            "cozy_signature_checks_in_workers",
            "Append signatures checked in the worker processes (the others in the crypto"
            " threads or on the loop).",
            relay.signature_checks_in_workers,
        )
        fan = relay.fanout
        if fan is not None:
            yield from _fanout_metrics(fan)
        yield _counter(
            "cozy_sequencer_failures",
            "Sequencer actors that failed with an unexpected exception and were dropped (their"
            " appends refused with `overloaded`; the collab's next append starts a fresh one).",
            relay.sequencer_failures,
        )
        actors = relay.sequencers
        yield _gauge(
            "cozy_sequencers", "Active sequencer actors (one per busy collab).", len(actors)
        )
        yield _gauge(
            "cozy_sequencer_inbox_submissions",
            "Appends waiting in sequencer inboxes.",
            sum(a.inbox for a in actors),
        )
        auth = CounterMetricFamily(
            "cozy_auth_failures", "Refused logins and session tokens, by reason.", labels=["reason"]
        )
        for reason, count in sorted(s.auth.failures.items()):
            auth.add_metric([reason], count)
        yield auth
        yield _counter(
            "cozy_lockouts",
            "Login lockouts begun (a failure that put its handle under a lock).",
            s.auth.lockouts,
        )
        access = s.cf_access()
        if access is not None:
            yield from _access_metrics(access)


def _fanout_metrics(fan: FanoutStats) -> Iterator[Metric]:
    subs = GaugeMetricFamily(
        "cozy_subscriptions",
        "Following subscriptions, by state (catching up from the ledger, or live).",
        labels=["state"],
    )
    subs.add_metric(["live"], fan.live_subscriptions)
    subs.add_metric(["catching_up"], fan.subscriptions - fan.live_subscriptions)
    yield subs
    yield _counter(
        "cozy_fanout_published_events",
        "Committed events handed to the fan-out.",
        fan.published_events,
    )
    yield _counter(
        "cozy_fanout_deliveries", "Live event frames queued to subscribers.", fan.deliveries
    )
    yield _counter(
        "cozy_subscriber_lag_disconnects",
        "Subscribers disconnected for lagging (they resume from the ledger).",
        fan.lagging_disconnects,
    )
    yield GaugeMetricFamily(
        "cozy_catchups", "Catch-ups from the ledger running now (capped).", value=fan.catchups
    )
    yield _counter(
        "cozy_catchup_refusals",
        "Subscribes refused with `overloaded` because a catch-up cap was reached.",
        fan.catchup_refusals,
    )
    yield _counter(
        "cozy_catchup_stalls",
        "Catch-ups disconnected after finding no room in their outbox for the stall time.",
        fan.catchup_stalls,
    )
    yield _counter(
        "cozy_catchup_reads_dropped",
        "Catch-up pages read ahead at a guessed seq that proved wrong (read again).",
        fan.catchup_reads_dropped,
    )


def _access_metrics(access: AccessCounters) -> Iterator[Metric]:
    yield _counter(
        "cozy_cf_access_verified",
        "WebSocket upgrades whose Cloudflare Access token verified.",
        access.verified,
    )
    refused = CounterMetricFamily(
        "cozy_cf_access_refused",
        "WebSocket upgrades refused by the Cloudflare Access check, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted(access.refused_by_reason.items()):
        refused.add_metric([reason], count)
    yield refused
    yield _counter(
        "cozy_cf_access_jwks_fetches", "Fetches of the Access signing keys.", access.jwks_fetches
    )
    yield _counter(
        "cozy_cf_access_jwks_fetch_failures",
        "Failed fetches of the Access signing keys.",
        access.jwks_fetch_failures,
    )


class RelayMetrics:
    """One relay's registry: its collector and the two commit histograms.

    A registry per relay (never `prometheus_client.REGISTRY`), so several relays in one process
    — tests — each report their own numbers.
    """

    def __init__(self, sources: MetricSources) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(RelayCollector(sources))
        self._commit_events = prometheus_client.Histogram(
            "cozy_ledger_commit_events",
            "Events written per group-commit transaction.",
            buckets=COMMIT_EVENT_BUCKETS,
            registry=self.registry,
        )
        self._commit_seconds = prometheus_client.Histogram(
            "cozy_ledger_commit_seconds",
            "Time of one group-commit transaction (assign, COPY, commit), in seconds.",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=self.registry,
        )

    def observe_commit(self, events: int, seconds: float) -> None:
        """Called by the LedgerWriter's thread after each commit (prometheus_client locks)."""
        self._commit_events.observe(events)
        self._commit_seconds.observe(seconds)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
