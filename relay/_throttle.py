"""The relay's login-throttling policy (SO-6; SPEC §4). Operators: docs/operator-guide.md.

Failures are counted per handle *string* (stored only as a keyed hash, `HandleKeyer`), the
same way whether or not an account has that handle, and a locked handle gets the same answer
either way, so throttling never reveals which handles exist. While a handle is locked its logins are refused before the password verifier
runs. The bookkeeping lives in the ledger (`ledger.LoginThrottle`, on the database clock).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
from dataclasses import dataclass, field
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


# --- rate budgets: sign-ups and handle lookups (ADR-0018) -----------------------------------


class Throttled(Exception):
    """A request was refused because a rate budget ran out. The message says what ran out and
    how long to wait; it never depends on whether a handle exists (wire code `rate_limited`)."""

    def __init__(self, message: str, *, wait: float) -> None:
        super().__init__(message)
        self.message = message
        self.wait = wait


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class RateBudget:
    """Token buckets of `per_hour` tokens each, refilled at `per_hour` per hour: one per caller
    and one shared by every caller. Pure: the caller passes the (monotonic) time.

    `spend` takes one token from the caller's bucket *and* the shared one, or from neither.
    A refused attempt stores nothing, so the table holds only callers that spent within the
    last hour (those with a full bucket are dropped): its size is bounded by what the shared
    budget lets through, however many addresses an attacker has.
    """

    per_caller_per_hour: int
    per_hour: int
    _callers: dict[str, _Bucket] = field(default_factory=dict)
    _shared: _Bucket | None = None
    _prune_at: int = 1024

    def _level(self, bucket: _Bucket | None, size: int, now: float) -> float:
        if bucket is None:
            return float(size)
        return min(float(size), bucket.tokens + (now - bucket.at) * size / 3600.0)

    def spend(self, caller: str, now: float) -> float:
        """0.0 when one token was spent; else the seconds until the refusing bucket has one."""
        mine = self._level(self._callers.get(caller), self.per_caller_per_hour, now)
        shared = self._level(self._shared, self.per_hour, now)
        if mine < 1.0:
            return (1.0 - mine) * 3600.0 / self.per_caller_per_hour
        if shared < 1.0:
            return (1.0 - shared) * 3600.0 / self.per_hour
        self._callers[caller] = _Bucket(mine - 1.0, now)
        self._shared = _Bucket(shared - 1.0, now)
        if len(self._callers) > self._prune_at:  # amortised: at most once per doubling
            self._forget_full(now)
            self._prune_at = max(1024, 2 * len(self._callers))
        return 0.0

    def caller_refused(self, caller: str, now: float) -> bool:
        """True when `caller`'s own bucket (not the shared one) has no token left."""
        return self._level(self._callers.get(caller), self.per_caller_per_hour, now) < 1.0

    def _forget_full(self, now: float) -> None:
        size = self.per_caller_per_hour
        for key in [k for k, b in self._callers.items() if self._level(b, size, now) >= size]:
            del self._callers[key]

    def tracked_callers(self) -> int:
        return len(self._callers)


def caller_key(access_subject: str | None, remote: object) -> str:
    """Whom rate budgets charge for a connection: its Cloudflare Access identity when the relay
    checks Access, else its peer address (an IPv6 peer by its /64, which one host usually
    holds whole). Behind a proxy without Access every client shares the proxy's address."""
    if access_subject is not None:
        return f"access:{access_subject}"
    host = getattr(remote, "address", None)  # trio-websocket's Endpoint: an ip_address
    try:
        ip = ipaddress.ip_address(host) if isinstance(host, str) else host
    except ValueError:
        return f"peer:{host}"
    if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return "peer:local"  # a Unix socket: every client is a local process
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"peer:{ip.ipv4_mapped}"
        return f"peer:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"peer:{ip}"


_HANDLE_KEY_DOMAIN: Final = b"cozylabs/v1/login-failures/handle-key\x00"


class HandleKeyer:
    """Makes the key a handle's `login_failures` row is stored under: a keyed BLAKE2b of the
    handle, so the table never holds the strings people typed (SO-2/SO-6, docs/threat-model.md).

    Its key is derived from the relay's JWT signing key (HMAC-SHA256 under a label of its own,
    so it is never the signing key itself) and is never written to the database: a thief with
    only the database can neither read the handles nor test guesses against them. Every relay
    sharing a database shares the JWT key, so they agree on every row. Rotating the JWT key
    (`cozy relay rotate-jwt-key`) changes every handle key: running lockouts and failure counts
    are forgotten, like the sessions it kills, and the old rows age out (`prune_login_failures`).
    """

    __slots__ = ("_key",)

    def __init__(self, jwt_signing_key: bytes) -> None:
        self._key = hmac.new(jwt_signing_key, _HANDLE_KEY_DOMAIN, hashlib.sha256).digest()

    def __call__(self, handle: str) -> bytes:
        return hashlib.blake2b(
            handle.encode("utf-8", "surrogatepass"), key=self._key, digest_size=32
        ).digest()

    def __repr__(self) -> str:
        return "HandleKeyer(<key redacted>)"
