"""Recovery codes: 160 random bits a person can copy down, read back and type with mistakes.

Shown once at sign-up, never sent to the relay. The code is Crockford base32 in groups of four
(``7KQ2-M9XD-…``) followed by a two-symbol check group that catches every single mistyped
symbol and every swap of neighbours (in the codes issued: see `new_recovery_code`) before any
unsealing is tried. Parsing is forgiving the way Crockford base32 is: case does not matter,
spaces and dashes are ignored, ``O`` reads as ``0`` and ``I``/``L`` as ``1``. Because the code
is high-entropy, the wrapping key is a plain domain-separated hash of it — no slow KDF needed.
"""

from __future__ import annotations

from typing import Final

from model._crypto import domain_hash, random_bytes

CODE_BYTES: Final = 20
_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_READ_AS: Final = {"O": "0", "I": "1", "L": "1"}
DOMAIN_RECOVERY_KEY: Final = b"cozylabs/v1/recovery-wrap\x00"


class InvalidRecoveryCode(ValueError):
    """The text is not a recovery code (wrong length, characters or checksum)."""


def new_recovery_code() -> str:
    """A fresh code, formatted for display.

    The weighted sum gives the last body symbol weight 32, i.e. none, so swapping it with the
    first check symbol is seen by the plain sum alone, which misses it when the two differ by
    exactly 16. Such codes (1 in 32) are never issued: drawing again costs 0.05 of 160 bits,
    and keeps every code issued before this rule valid, which a new check format would not.
    """
    while True:
        secret = random_bytes(CODE_BYTES)
        body = _b32(secret)
        if (_ALPHABET.index(body[-1]) - _ALPHABET.index(_check(body)[0])) % 32 != 16:
            return format_code(secret)


def format_code(secret: bytes) -> str:
    body = _b32(secret)
    groups = [body[i : i + 4] for i in range(0, len(body), 4)]
    return "-".join([*groups, _check(body)])


def _check(body: str) -> str:
    """Two check symbols: a plain sum (catches every single mistyped symbol) and a
    position-weighted sum (catches every swap of two neighbouring symbols), both mod 32."""
    values = [_ALPHABET.index(c) for c in body]
    plain = sum(values) % 32
    weighted = sum((i + 1) * v for i, v in enumerate(values)) % 32
    return _ALPHABET[plain] + _ALPHABET[weighted]


def parse_code(text: str) -> bytes:
    """The secret behind a typed code. Raises `InvalidRecoveryCode` saying what looks wrong."""
    chars = [_READ_AS.get(c, c) for c in text.upper() if c not in " -\t\n"]
    bad = sorted({c for c in chars if c not in _ALPHABET})
    if bad:
        raise InvalidRecoveryCode(f"a recovery code has no {''.join(bad)!r}: check what you typed")
    expected = len(_b32(bytes(CODE_BYTES))) + 2
    if len(chars) != expected:
        raise InvalidRecoveryCode(
            f"a recovery code has {expected} characters (without dashes); this has {len(chars)}"
        )
    body = "".join(chars[:-2])
    secret = _unb32(body)
    if _check(body) != "".join(chars[-2:]):
        raise InvalidRecoveryCode("the recovery code's checksum does not match: look for a typo")
    return secret


def recovery_key(secret: bytes) -> bytes:
    """The 32-byte key that wraps the keystore key."""
    return domain_hash(DOMAIN_RECOVERY_KEY, secret)


def _b32(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    bits = len(data) * 8
    width = -(-bits // 5)
    n <<= width * 5 - bits
    return "".join(_ALPHABET[(n >> (5 * (width - 1 - i))) & 31] for i in range(width))


def _unb32(text: str) -> bytes:
    n = 0
    for c in text:
        n = (n << 5) | _ALPHABET.index(c)
    pad = len(text) * 5 - CODE_BYTES * 8
    return (n >> pad).to_bytes(CODE_BYTES, "big")
