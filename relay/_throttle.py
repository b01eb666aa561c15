"""The relay's login-throttling policy (SO-6; SPEC §4). Operators: docs/operator-guide.md.

Failures are counted per handle *string*, the same way whether or not an account has that
handle, and a locked handle gets the same answer either way, so throttling never reveals which
handles exist. While a handle is locked its logins are refused before the password verifier
runs. The bookkeeping lives in the ledger (`ledger.LoginThrottle`, on the database clock).
"""

from __future__ import annotations

import math
from typing import Final

from ledger import LoginPolicy

FREE_FAILURES: Final = 5
"""Consecutive failures that cost nothing extra."""
BASE_DELAY_SECONDS: Final = 1.0
"""The 6th consecutive failure locks the handle this long; each further one doubles it."""
MAX_DELAY_SECONDS: Final = 15 * 60.0
"""The doubling stops here."""
HOURLY_CAP: Final = 100
"""Failed attempts per handle per hour that reach the verifier (ASVS); then locked to the
hour's end."""
WINDOW_SECONDS: Final = 60 * 60.0

# Read by the relay at every login (tests swap in one with shorter delays).
LOGIN_POLICY = LoginPolicy(
    free_failures=FREE_FAILURES,
    base_delay=BASE_DELAY_SECONDS,
    max_delay=MAX_DELAY_SECONDS,
    window_cap=HOURLY_CAP,
    window_seconds=WINDOW_SECONDS,
)


def lockout_message(wait: float) -> str:
    """The refusal for a locked handle: it depends on nothing but the time left."""
    return f"too many failed logins for this handle; try again in {max(1, math.ceil(wait))} s"
