"""The verify stage's work on one batch of appends: signatures checked in the crypto pool (its
worker processes, its threads, or the loop for a small batch while it is idle), the rest of
`verify_event` (the event id, the decoded body) on the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from model import wire
from model.envelope import VerifiedEvent, signature_check, verify_event
from model.errors import BadSignature, InvalidEvent

if TYPE_CHECKING:
    from collections.abc import Sequence

    from relay._cryptopool import CryptoPool
    from relay._sequencer import Submission

# While the crypto pool is idle, a batch this small is checked on the Trio loop (~70 µs per
# signature here): the pool's round trip (a task wakeup, a hop each way) costs more loop time
# than the work, and as much latency again (docs/performance.md, "Where the latency goes"). A
# busy pool gets it, so that its round runs it on every core.
INLINE_VERIFY: Final = 8

_NOT_YOURS: Final = "event signature does not verify with your account key; nothing was stored"

Verdict = VerifiedEvent | tuple[wire.ErrorCode, str]


async def verify_appends(crypto: CryptoPool, batch: Sequence[Submission]) -> list[Verdict]:
    """Each append of `batch` verified, or the error to answer it with, in order."""
    checks = [signature_check(s.event, s.author_pk, decoded=s.body) for s in batch]
    held = await crypto.check_signatures(checks, small=len(batch) <= INLINE_VERIFY)
    return verdicts(batch, held)


def verdicts(batch: Sequence[Submission], held: Sequence[bool]) -> list[Verdict]:
    """`batch` verified given the pool's verdicts on its signatures (`held`, in order): a
    signature is checked once, so a forgery costs the relay one check, not a second on the
    loop."""
    out: list[Verdict] = []
    for sub, ok in zip(batch, held, strict=True):
        try:
            out.append(verify_event(sub.event, sub.author_pk, decoded=sub.body, held=ok))
        except BadSignature:
            out.append((wire.ErrorCode.BAD_SIGNATURE, _NOT_YOURS))
        except InvalidEvent as exc:
            out.append((wire.ErrorCode.INVALID_EVENT, f"{exc}; nothing was stored"))
    return out
