"""Cloudflare Access at the origin (SO-6): the `Cf-Access-Jwt-Assertion` gate.

Cloudflare Access sits in front of the relay and adds a signed JWT to every request it lets
through. A tunnel can still be reached around Access (a misrouted hostname, a leaked origin
address, a second tunnel), so when it is configured the relay checks that JWT itself, on the
WebSocket upgrade, before a single frame is read. A request that fails is answered with a plain
HTTP refusal and never reaches any other surface.

What is checked, in this order (cheap and key-free checks first):

1. exactly one header, of sane size, that parses as a JWS;
2. the header's `alg` is exactly RS256 — before any key is looked up, so `none`, HS256 with
   the public key as the secret (alg confusion) and every other algorithm are refused without
   touching the key cache;
3. the `kid` names a key of the team's JWKS (unknown kids may trigger one refetch, see
   `JwksCache`);
4. the RS256 signature (PyJWT, pinned to RS256 and to that key);
5. `aud` contains one of the configured AUD tags, `iss` is the team domain, `exp` and `nbf`
   hold within the leeway, and `exp`, `iat`, `iss`, `aud` are present;
6. the token names someone: an identity token (`sub`, usually `email`) or a service token
   (`common_name`, empty `sub`).

PyJWT checks the signature before any claim, so the specific refusal reasons after step 4 are
only ever reported for tokens Cloudflare really signed: they help an operator debug a
misconfigured AUD tag and tell an attacker nothing. Tokens never reach logs, errors or reprs.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Final, Literal

import jwt
import structlog
import trio
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from relay.broker import NoRedirects

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

log = structlog.get_logger("cozy.relay.cf_access")

HEADER: Final = "cf-access-jwt-assertion"
ALGORITHM: Final = "RS256"
MAX_TOKEN_BYTES: Final = 16 * 1024  # Cloudflare's tokens are ~1 KiB; anything huge is junk
MAX_JWKS_BYTES: Final = 256 * 1024
MIN_RSA_BITS: Final = 2048
DEFAULT_LEEWAY_SECONDS: Final = 30
DEFAULT_JWKS_TTL_SECONDS: Final = 3600.0
DEFAULT_REFETCH_FLOOR_SECONDS: Final = 30.0
DEFAULT_FETCH_TIMEOUT_SECONDS: Final = 5.0
# Claims every accepted token must carry (PyJWT's `require`); `nbf` is checked when present.
REQUIRED_CLAIMS: Final = ("exp", "iat", "iss", "aud")

_TEAM_HOST_RE: Final = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"
)
_TEAM_NAME_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_AUD_RE: Final = re.compile(r"^[A-Za-z0-9._:/-]{1,256}$")
_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})  # urlsplit drops [ ]


class AccessConfigError(ValueError):
    """A Cloudflare Access setting is unusable; the message names it and the fix."""


@dataclass(frozen=True)
class AccessPolicy:
    """What the relay accepts: the team's issuer and JWKS, the application's AUD tags.

    Build it with `AccessPolicy.for_team`, which normalises and validates the settings.
    """

    issuer: str
    audiences: tuple[str, ...]
    certs_url: str
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS
    jwks_ttl_seconds: float = DEFAULT_JWKS_TTL_SECONDS
    refetch_floor_seconds: float = DEFAULT_REFETCH_FLOOR_SECONDS
    fetch_timeout_seconds: float = DEFAULT_FETCH_TIMEOUT_SECONDS

    @classmethod
    def for_team(
        cls,
        team_domain: str,
        audiences: str | Iterable[str],
        *,
        certs_url: str | None = None,
        leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
        refetch_floor_seconds: float = DEFAULT_REFETCH_FLOOR_SECONDS,
    ) -> AccessPolicy:
        """Policy for a team (`myteam`, `myteam.cloudflareaccess.com` or its https URL) and
        one or more AUD tags (a list, or one comma-separated string).

        Raises `AccessConfigError` naming the setting. `certs_url` overrides where the JWKS
        is fetched from (https, or http on a loopback address for tests).
        """
        host = _team_host(team_domain)
        auds = _audiences(audiences)
        if not 0 <= leeway_seconds <= 300:
            raise AccessConfigError("CF_ACCESS_LEEWAY must be between 0 and 300 seconds")
        url = f"https://{host}/cdn-cgi/access/certs" if certs_url is None else certs_url
        _check_certs_url(url)
        return cls(
            issuer=f"https://{host}",
            audiences=auds,
            certs_url=url,
            leeway_seconds=leeway_seconds,
            refetch_floor_seconds=refetch_floor_seconds,
        )


class AccessKind(Enum):
    IDENTITY = "identity"  # a person who signed in through Access
    SERVICE = "service"  # a service token (a machine, e.g. a bot's host)


@dataclass(frozen=True)
class AccessIdentity:
    """Who Cloudflare Access let through. Only `AccessVerifier.verify` constructs it.

    `subject` is the identity's `sub` or the service token's `common_name` (its client id),
    so it is never empty. `expires_at` is the token's `exp` (Unix seconds).
    """

    kind: AccessKind
    subject: str
    email: str | None
    common_name: str | None
    expires_at: int

    def log_fields(self) -> dict[str, str]:
        """What a log line may say about this identity (never the token)."""
        fields = {"access_kind": self.kind.value, "access_subject": self.subject}
        if self.email is not None:
            fields["access_email"] = self.email
        return fields


RefusalReason = Literal[
    "missing",
    "malformed",
    "algorithm",
    "unknown_key",
    "signature",
    "audience",
    "issuer",
    "expired",
    "not_yet_valid",
    "claims",
    "keys_unavailable",
]

_HINTS: Final[Mapping[str, str]] = {
    "missing": "the Cf-Access-Jwt-Assertion header is missing: reach this relay through its "
    "Cloudflare Access application (people sign in; machines send a service token)",
    "malformed": "the Cf-Access-Jwt-Assertion header is not a single well-formed token",
    "algorithm": "the access token is not signed with RS256",
    "unknown_key": "the access token is signed with a key this team does not publish",
    "signature": "the access token's signature does not verify",
    "audience": "the access token is for another Access application (AUD tag)",
    "issuer": "the access token was issued by another Cloudflare Access team",
    "expired": "the access token has expired: sign in through Cloudflare Access again",
    "not_yet_valid": "the access token is not valid yet (check this machine's clock)",
    "claims": "the access token lacks required claims (exp, iat, iss, aud and sub or common_name)",
    "keys_unavailable": "the relay cannot fetch its Cloudflare Access keys right now; retry "
    "shortly (operators: see the relay's cf_access_jwks_unavailable log lines)",
}


class AccessDenied(Exception):
    """The request is refused. `status` is the HTTP status (403, or 503 while the relay has
    no keys at all), `reason` a fixed code for logs and metrics, and str() a short message
    for the client that never quotes the token."""

    def __init__(self, reason: RefusalReason) -> None:
        self.reason: RefusalReason = reason
        self.status = 503 if reason == "keys_unavailable" else 403
        super().__init__(f"Cloudflare Access: {_HINTS[reason]}")


class JwksUnavailable(Exception):
    """The JWKS could not be fetched or holds no usable RS256 key. The message names the URL
    and what went wrong (never a response body)."""


@dataclass
class AccessStats:
    """Counters since start, for metrics (`AccessVerifier.statistics`)."""

    verified: int = 0
    refused: int = 0
    jwks_fetches: int = 0  # successful fetches
    jwks_fetch_failures: int = 0
    keys: int = 0  # keys in the current set
    refused_by_reason: dict[str, int] = field(default_factory=dict)


def fetch_jwks(url: str, timeout: float, max_bytes: int = MAX_JWKS_BYTES) -> dict[str, jwt.PyJWK]:
    """GET the JWKS (blocking: run it in a worker thread) and return its usable keys by kid.

    Usable means RSA, at least 2048 bits, for signing with RS256 (or unmarked), with a kid;
    other members are skipped. No redirects are followed. Raises `JwksUnavailable`.
    """
    try:
        _check_certs_url(url)
    except AccessConfigError as exc:
        raise JwksUnavailable(str(exc)) from None
    opener = urllib.request.build_opener(NoRedirects)
    # S310: the scheme was just checked (https, or http on loopback); no file: or custom ones.
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response's socket
        raise JwksUnavailable(f"{url} answered HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
        raise JwksUnavailable(f"{url} is unreachable ({type(exc).__name__})") from None
    if len(body) > max_bytes:
        raise JwksUnavailable(f"{url} sent more than {max_bytes} bytes")
    try:
        document = json.loads(body)
    except ValueError:
        raise JwksUnavailable(f"{url} did not send JSON") from None
    members = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(members, list):
        raise JwksUnavailable(f"{url} sent no JWKS (no 'keys' list)")
    keys: dict[str, jwt.PyJWK] = {}
    for member in members:
        key = _usable_key(member)
        if key is not None and key.key_id is not None:
            keys[key.key_id] = key
    if not keys:
        raise JwksUnavailable(f"{url} publishes no usable RS256 key")
    return keys


def _usable_key(member: object) -> jwt.PyJWK | None:
    if not isinstance(member, dict) or member.get("kty") != "RSA":
        return None
    if member.get("alg", ALGORITHM) != ALGORITHM or member.get("use", "sig") != "sig":
        return None
    if not isinstance(member.get("kid"), str) or not member["kid"]:
        return None
    try:
        key = jwt.PyJWK(member, algorithm=ALGORITHM)
    except jwt.PyJWTError:
        return None
    if not isinstance(key.key, RSAPublicKey) or key.key.key_size < MIN_RSA_BITS:
        return None
    return key


class JwksCache:
    """The team's current keys, fetched off the Trio loop and shared by every request.

    Contract:
    - every key of the last successful fetch is honoured (Cloudflare publishes the current and
      the previous key, so tokens signed before a rotation keep working while both are listed);
    - after `ttl` seconds the set is refreshed on the next lookup; an unknown kid also triggers
      a refresh, so a rotation is picked up by the first token signed with the new key;
    - a refresh is attempted at most once per `floor` seconds, whatever the outcome, and
      concurrent lookups wait for the one in-flight fetch (a `trio.Lock`) instead of starting
      their own: a storm of tokens with made-up kids costs at most one fetch per floor;
    - a failed fetch keeps the previous keys (and is logged as `cf_access_jwks_unavailable`).

    Time is `clock()` (monotonic seconds, `trio.current_time` by default) so tests can move it.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float = DEFAULT_JWKS_TTL_SECONDS,
        floor: float = DEFAULT_REFETCH_FLOOR_SECONDS,
        timeout: float = DEFAULT_FETCH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.url = url
        self._ttl = ttl
        self._floor = floor
        self._timeout = timeout
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last success
        self._attempted_at: float | None = None  # last attempt, success or not
        self._lock = trio.Lock()
        self.fetches = 0
        self.fetch_failures = 0

    @property
    def has_keys(self) -> bool:
        return bool(self._keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the set now unless one was attempted within the floor (or `force`). Returns
        True when this call replaced the keys. Never raises `JwksUnavailable`."""
        async with self._lock:
            now = self._clock()
            if (
                not force
                and self._attempted_at is not None
                and now - self._attempted_at < self._floor
            ):
                return False  # someone just tried (perhaps while we waited for the lock)
            self._attempted_at = now
            try:
                keys = await trio.to_thread.run_sync(fetch_jwks, self.url, self._timeout)
            except JwksUnavailable as exc:
                self.fetch_failures += 1
                log.warning(
                    "cf_access_jwks_unavailable",
                    error=str(exc),
                    keeping=len(self._keys),
                    hint="check CF_ACCESS_TEAM_DOMAIN (or CF_ACCESS_CERTS_URL) and egress to it",
                )
                return False
            self.fetches += 1
            self._fetched_at = self._clock()
            if set(keys) != set(self._keys):
                log.info("cf_access_keys_loaded", url=self.url, kids=sorted(keys))
            self._keys = keys
            return True

    async def key_for(self, kid: str) -> jwt.PyJWK | None:
        """The key named `kid`, refreshing first when the set is stale or lacks it."""
        stale = self._fetched_at is None or self._clock() - self._fetched_at >= self._ttl
        if stale or kid not in self._keys:
            await self.refresh()
        return self._keys.get(kid)


class AccessVerifier:
    """Checks the `Cf-Access-Jwt-Assertion` header of a WebSocket upgrade against a policy."""

    def __init__(
        self, policy: AccessPolicy, *, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.policy = policy
        self.jwks = JwksCache(
            policy.certs_url,
            ttl=policy.jwks_ttl_seconds,
            floor=policy.refetch_floor_seconds,
            timeout=policy.fetch_timeout_seconds,
            clock=clock,
        )
        self._verified = 0
        self._refused: dict[str, int] = {}

    def statistics(self) -> AccessStats:
        return AccessStats(
            verified=self._verified,
            refused=sum(self._refused.values()),
            jwks_fetches=self.jwks.fetches,
            jwks_fetch_failures=self.jwks.fetch_failures,
            keys=len(self.jwks.key_ids),
            refused_by_reason=dict(self._refused),
        )

    async def start(self) -> None:
        """Fetch the keys once at startup, so a wrong team domain shows in the first log
        lines. A failure is logged, not raised: requests get 503 until a fetch succeeds."""
        await self.jwks.refresh(force=True)

    async def verify_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> AccessIdentity:
        """Verify the request's headers (as trio-websocket gives them). Raises `AccessDenied`."""
        values = [value for name, value in headers if name.lower() == HEADER.encode()]
        if not values:
            raise self._denied("missing")
        if len(values) > 1 or len(values[0]) > MAX_TOKEN_BYTES:
            raise self._denied("malformed")
        try:
            token = values[0].decode("ascii").strip()
        except UnicodeDecodeError:
            raise self._denied("malformed") from None
        return await self.verify(token)

    async def verify(self, token: str) -> AccessIdentity:
        """Verify one token. Returns who it names; raises `AccessDenied`."""
        if not token:
            raise self._denied("missing")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise self._denied("malformed") from None
        if header.get("alg") != ALGORITHM:  # before any key lookup: no alg=none, no confusion
            raise self._denied("algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise self._denied("malformed")
        key = await self.jwks.key_for(kid)
        if key is None:
            raise self._denied("unknown_key" if self.jwks.has_keys else "keys_unavailable")
        # One RS256 verification (~50 µs) is cheaper than a thread hop, so it runs inline.
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                audience=list(self.policy.audiences),
                issuer=self.policy.issuer,
                leeway=self.policy.leeway_seconds,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
            )
        except jwt.PyJWTError as exc:
            raise self._denied(_reason_of(exc)) from None
        identity = _identity_of(claims)
        if identity is None:
            raise self._denied("claims")
        self._verified += 1
        return identity

    def _denied(self, reason: RefusalReason) -> AccessDenied:
        """Count a refusal and build the error to raise."""
        self._refused[reason] = self._refused.get(reason, 0) + 1
        return AccessDenied(reason)


def _reason_of(exc: jwt.PyJWTError) -> RefusalReason:
    # Subclasses before their bases: ExpiredSignatureError etc. derive from InvalidTokenError.
    match exc:
        case jwt.ExpiredSignatureError():
            return "expired"
        case jwt.ImmatureSignatureError():
            return "not_yet_valid"
        case jwt.InvalidAudienceError():
            return "audience"
        case jwt.InvalidIssuerError():
            return "issuer"
        case jwt.MissingRequiredClaimError() | jwt.InvalidIssuedAtError():
            return "claims"
        case jwt.InvalidSignatureError():
            return "signature"
        case jwt.InvalidAlgorithmError():
            return "algorithm"
        case _:
            return "malformed"


def _identity_of(claims: Mapping[str, object]) -> AccessIdentity | None:
    exp = claims["exp"]
    expires_at = int(exp) if isinstance(exp, int | float) else 0
    sub = claims.get("sub")
    email = claims.get("email")
    common_name = claims.get("common_name")
    if isinstance(common_name, str) and common_name and not sub:
        return AccessIdentity(AccessKind.SERVICE, common_name, None, common_name, expires_at)
    if isinstance(sub, str) and sub:
        return AccessIdentity(
            AccessKind.IDENTITY,
            sub,
            email if isinstance(email, str) and email else None,
            None,
            expires_at,
        )
    return None


def _team_host(raw: str) -> str:
    value = raw.strip().lower().removeprefix("https://").rstrip("/")
    if _TEAM_NAME_RE.fullmatch(value):
        value = f"{value}.cloudflareaccess.com"
    if not _TEAM_HOST_RE.fullmatch(value):
        raise AccessConfigError(
            "CF_ACCESS_TEAM_DOMAIN must be your team name or its domain, like "
            f"'myteam' or 'myteam.cloudflareaccess.com', got {raw!r}"
        )
    return value


def _audiences(raw: str | Iterable[str]) -> tuple[str, ...]:
    parts = raw.split(",") if isinstance(raw, str) else list(raw)
    auds = tuple(str(p).strip() for p in parts if str(p).strip())
    if not auds:
        raise AccessConfigError(
            "CF_ACCESS_AUD must name at least one Application Audience (AUD) tag; "
            "copy it from the Access application's overview page"
        )
    for aud in auds:
        if not _AUD_RE.fullmatch(aud):
            raise AccessConfigError(
                "CF_ACCESS_AUD holds a value that is not an AUD tag (letters, digits, '-', "
                "'_', '.', ':' or '/'; separate several with commas)"
            )
    return auds


def _check_certs_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return  # a local JWKS for tests and development
    raise AccessConfigError(
        f"CF_ACCESS_CERTS_URL must be an https URL (http only on a loopback address), got {url!r}"
    )
