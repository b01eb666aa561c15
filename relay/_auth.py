"""Accounts and sessions: Argon2id password hashes (argon2-cffi) and HS256 JWTs (PyJWT).

Both hashing and verification are slow on purpose; the relay runs them in worker threads.
Unknown handles are verified against a dummy hash so a login attempt takes about as long and
answers exactly the same whether or not the handle exists.
"""

from __future__ import annotations

import re
import time
from typing import Final, NamedTuple

import argon2
import jwt

HANDLE_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_.-]{2,31}$")
MIN_PASSWORD_CHARS: Final = 12
ISSUER: Final = "cozylabs-relay"

_hasher = argon2.PasswordHasher()
_DUMMY_HASH: Final = _hasher.hash("cozylabs dummy password for timing equalisation")


class AuthError(Exception):
    """Credentials or token refused. The message is safe to show the client; `reason` is a
    fixed word for metrics (`expired_token`, `invalid_token`, `invalid_signup`)."""

    def __init__(self, message: str, *, reason: str = "invalid_signup") -> None:
        super().__init__(message)
        self.reason = reason


def check_signup(handle: str, password: str) -> None:
    if not HANDLE_RE.fullmatch(handle):
        raise AuthError("handles are 3-32 characters: lowercase letters, digits, '_', '.', '-'")
    if len(password) < MIN_PASSWORD_CHARS:
        raise AuthError(f"login passwords need at least {MIN_PASSWORD_CHARS} characters")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches `password_hash`.

    Always costs exactly one Argon2id verification: with no hash (an unknown handle, or an
    account without a password such as an agent's) or a stored value that is not an Argon2
    hash, the password is verified against a dummy hash and the answer is False. So neither
    the answer nor the time tells those cases from a wrong password.
    """
    usable = password_hash if password_hash is not None and _is_argon2_hash(password_hash) else None
    try:
        ok = _hasher.verify(usable or _DUMMY_HASH, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
    return ok and usable is not None


def _is_argon2_hash(value: str) -> bool:
    try:
        argon2.extract_parameters(value)
    except (argon2.exceptions.InvalidHashError, ValueError):
        return False
    return True


def needs_rehash(password_hash: str) -> bool:
    """True when a (verified) hash was made with other Argon2id parameters than ours today."""
    return _hasher.check_needs_rehash(password_hash)


AGENT_TOKEN_TTL: Final = 90 * 24 * 3600


class Claims(NamedTuple):
    account_id: str
    expires: int
    agent_generation: int | None  # set for agent tokens: must equal the account's generation
    # A person's session tokens: the account's session generation when issued (0 for tokens
    # from before generations existed); ending sessions moves the account's on.
    session_generation: int = 0


def issue_token(
    key: bytes,
    account_id: str,
    ttl_seconds: int,
    now: float | None = None,
    *,
    agent_generation: int | None = None,
    session_generation: int = 0,
) -> tuple[str, int]:
    """A person's session token under `session_generation`, or with `agent_generation` an
    agent token (long-lived, revocable). Both are refused once the account's generation moved.
    """
    issued = int(time.time() if now is None else now)
    expires = issued + ttl_seconds
    claims: dict[str, object] = {
        "sub": account_id, "iat": issued, "exp": expires, "iss": ISSUER, "typ": "session",
        "gen": session_generation,
    }  # fmt: skip
    if agent_generation is not None:
        claims |= {"typ": "agent", "gen": agent_generation}
    return jwt.encode(claims, key, algorithm="HS256"), expires


def verify_token(key: bytes, token: str) -> Claims:
    """What a valid session or agent token says. Raises `AuthError`."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            issuer=ISSUER,
            options={"require": ["sub", "exp", "iat", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("session expired: log in again", reason="expired_token") from None
    except jwt.InvalidTokenError:
        raise AuthError("session token is invalid: log in again", reason="invalid_token") from None
    typ, sub = claims.get("typ"), claims.get("sub")
    # Session tokens from before session generations carry none: generation 0.
    gen = claims.get("gen", 0 if typ == "session" else None)
    if not isinstance(sub, str) or typ not in ("session", "agent"):
        raise AuthError("session token is invalid: log in again", reason="invalid_token")
    if not isinstance(gen, int) or isinstance(gen, bool):
        if typ == "agent":
            raise AuthError(
                "agent token is invalid: ask its creator for a new credential file",
                reason="invalid_token",
            )
        raise AuthError("session token is invalid: log in again", reason="invalid_token")
    if typ == "agent":
        return Claims(sub, int(claims["exp"]), gen)
    return Claims(sub, int(claims["exp"]), None, gen)
