"""Run a relay from a config: open (or embed) the database, migrate if asked, serve, stop on signals."""

from __future__ import annotations

import gc
import signal
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Final

import structlog
import trio

from ledger import Ledger, migrate
from model._crypto import signing_key_from_seed
from relay._durability import check_durability
from relay._server import Relay
from relay.config import relay_signing_seed
from relay.embedded import embedded_postgres

if TYPE_CHECKING:
    from relay.config import RelayConfig

log = structlog.get_logger("cozy.relay")
YOUNG_GC_THRESHOLD: Final = 10_000  # see `settle_heap`


async def run_relay(
    config: RelayConfig,
    *,
    auto_migrate: bool = True,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGINT/SIGTERM (or `Relay.request_shutdown`), then shut down in order.

    Raises `relay._durability.UnsafeDurability` (a `ConfigError`) before listening when the
    database could lose acknowledged events, unless `config.allow_unsafe_durability`.
    """
    async with AsyncExitStack() as stack:
        url = config.database_url
        if url is None:
            url = await stack.enter_async_context(embedded_postgres(config.data_dir / "postgres"))
            log.info("embedded_postgres", data_dir=str(config.data_dir / "postgres"))
        if auto_migrate:
            applied = await trio.to_thread.run_sync(migrate, url)
            if applied:
                log.info("migrated", versions=applied)
        ledger = Ledger(url)
        await trio.to_thread.run_sync(ledger.open)
        stack.callback(ledger.close)
        settings = await trio.to_thread.run_sync(ledger.durability_settings)
        check_durability(settings, allow_unsafe=config.allow_unsafe_durability)
        if config.allow_test_kdf:
            log.warning(
                "test_kdf_allowed",
                hint="COZY_ALLOW_TEST_KDF is on: keystores sealed with the test Argon2id profile"
                " are stored, and a database thief cracks them at once; test suites only",
            )
        relay = Relay(config, ledger, signing_key_from_seed(relay_signing_seed(config)))
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[str]) -> None:
                await relay.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # also ends the signal watcher

            if handle_signals:  # before listening: a signal from then on stops it in order
                await nursery.start(_stop_on_signal, relay)
            await nursery.start(serve_then_stop)
            task_status.started(relay)


def settle_heap() -> None:
    """Once a relay process serves: freeze what start-up made, for the garbage collector.

    Modules, classes, functions, the config and the pools are some 90,000 objects the cycle
    collector would otherwise walk again in every full collection, with the Trio loop
    stopped: six full collections in a 5-second latency run took up to 68 ms each, the
    largest single pause in an append's path (docs/performance.md, "Where the latency goes").
    None of them ever becomes garbage. Only for `cozy relay serve`'s own process: an
    embedding process (tests, `cozy dev`) owns its heap.
    """
    gc.collect()  # what start-up left behind is freed, not frozen
    gc.freeze()
    # And a young collection every 10,000 net allocations instead of 700: the request path
    # allocates coroutines, frames and lists by the thousand per append, most of them freed by
    # reference counting anyway; collecting every 700 walked the in-flight ones again and
    # again (a 5-second latency run: 824 young collections, 253 ms of collector time with the
    # loop stopped; at 10,000: 168 and 59 ms).
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


async def _stop_on_signal(
    relay: Relay, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("signal_received", signal=signal.Signals(signum).name)
            relay.request_shutdown()
            return
