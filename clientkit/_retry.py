"""The pause before a retry: jittered exponential backoff, written once for the client kit.

Appends and subscribes refused with `overloaded`, and the bot kit's reconnects, all wait
`start · 2^attempt` seconds capped at `cap`, times a uniform draw from [0.5, 1) so that many
clients shed at the same moment do not come back at the same moment.
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]

# 2**62 times any sane `start` is far above any cap, and still a finite float.
_MAX_EXPONENT = 62


def backoff_delay(attempt: int, *, start: float, cap: float) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry): at most
    `min(cap, start · 2^attempt)`, at least half of it."""
    ceiling = min(cap, start * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))
    return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 — jitter, not crypto
