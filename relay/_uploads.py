"""Storage hygiene: refused and abandoned uploads leave nothing behind, and old throttle state
goes (issue 13, items 7 and 10).

An upload's pieces are written to the ledger as they arrive (no upload is held in memory
whole), so every way an upload can end without becoming an artifact must delete them:

- a refusal (out of order, over the size limit, over the quota, a hash that does not match):
  the relay calls `drop_upload` before it answers;
- the connection closing (the client vanished, the relay shut down): `drop_connection_uploads`
  from the connection's last `finally`, shielded from the cancellation that ends it;
- a relay that died without doing either (kill -9, power loss) — or a connection of another
  relay on the same database: nobody is left to ask, so `Housekeeping` deletes every upload
  that has had no piece for `upload_idle_seconds`, at start-up and then periodically, and at
  start-up also any piece that belongs to no upload and no artifact.

The same task prunes login-failure records that no longer throttle anything (older than the
lockout window), so the table holds only recent state.

Everything blocking runs in worker threads through the caller's `db` runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar, TypeVarTuple, Unpack

import structlog
import trio

from ledger import LedgerError
from relay import _throttle

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ledger import Ledger, SweepReport
    from relay._connection import ArtifactUpload
    from relay.config import RelayConfig

log = structlog.get_logger("cozy.relay")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
DROP_TIMEOUT = 10.0  # seconds a closing connection may spend deleting its uploads


class DbRunner(Protocol):
    async def __call__(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T: ...


async def drop_upload(db: DbRunner, ledger: Ledger, upload: str, owner: ArtifactUpload) -> None:
    """Delete one unfinished upload's pieces (a refusal). A failure is logged, not raised: the
    refusal stands, and the idle sweep deletes what is left."""
    try:
        pieces = await db(ledger.drop_upload, upload, owner.account_id)
    except LedgerError as exc:
        log.warning("upload_drop_failed", error=type(exc).__name__)
        return
    log.info("upload_dropped", collab_id=owner.collab_id, pieces=pieces, size=owner.size)


async def drop_connection_uploads(
    db: DbRunner, ledger: Ledger, uploads: Iterable[tuple[str, ArtifactUpload]]
) -> None:
    """A closing connection's unfinished uploads: delete them all, even while the connection
    is being cancelled (shielded, bounded by DROP_TIMEOUT)."""
    pending = list(uploads)
    if not pending:
        return
    with trio.move_on_after(DROP_TIMEOUT, shield=True):
        for upload, owner in pending:
            await drop_upload(db, ledger, upload, owner)


class Housekeeping:
    """The periodic sweep. `run` sweeps at once (orphan pieces included), then every
    `housekeeping_seconds`; it runs until cancelled. `statistics()` says what it deleted."""

    def __init__(self, ledger: Ledger, config: RelayConfig, db: DbRunner) -> None:
        self._ledger = ledger
        self._config = config
        self._db = db
        self.sweeps = 0
        self.uploads_swept = 0
        self.pieces_swept = 0
        self.login_records_pruned = 0
        self._swept = trio.Event()

    async def wait_swept(self) -> None:
        """Return once the first sweep (the start-up one) has finished."""
        await self._swept.wait()

    async def run(self) -> None:
        first = True
        while True:
            await self.sweep_once(orphans=first)
            first = False
            await trio.sleep(self._config.housekeeping_seconds)

    async def sweep_once(self, *, orphans: bool = False) -> None:
        """One sweep. A ledger failure is logged and retried at the next one."""
        try:
            report = await self._db(
                _sweep, self._ledger, float(self._config.upload_idle_seconds), orphans
            )
            pruned = await self._db(_prune, self._ledger)
        except LedgerError as exc:
            log.warning("housekeeping_failed", error=type(exc).__name__)
            return
        self.sweeps += 1
        self.uploads_swept += report.uploads
        self.pieces_swept += report.pieces
        self.login_records_pruned += pruned
        self._swept.set()
        if report.uploads or report.pieces or pruned:
            log.info(
                "housekeeping_swept",
                uploads=report.uploads,
                pieces=report.pieces,
                login_records=pruned,
            )


def _sweep(ledger: Ledger, idle: float, orphans: bool) -> SweepReport:
    return ledger.sweep_idle_uploads(idle, orphans=orphans)


def _prune(ledger: Ledger) -> int:
    return ledger.prune_login_failures(policy=_throttle.LOGIN_POLICY)
