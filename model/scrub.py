"""Scrubbing credential values out of anything an agent may see (SO-9).

The broker resolves a tool's secret, makes the call, and then must make sure the secret does not
come back — in the upstream's answer, in an error that echoes the request, in a redirect URL, in
a traceback. Echoes are rarely verbatim: upstreams base64 an Authorization header, URL-encode a
query, JSON-escape a body, hex-dump bytes. `scrub` replaces every occurrence of each secret in
each of those encodings with a fixed marker.

Base64 is the subtle one: a secret inside a longer base64 stream is encoded differently
depending on its offset modulo 3 from the stream's start, and its first and last characters mix
with its neighbours' bits. For each offset the part of the encoding that depends on the secret
alone (its *core*) is computed and removed; what is left of the secret's bits — at most a few
bits at either end — cannot restore it.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable

MARKER: Final = "[REDACTED]"
MIN_SECRET_BYTES: Final = 4  # shorter values would match everywhere; refuse them as secrets


class WeakSecret(ValueError):
    """A secret too short to scrub reliably (it would match ordinary text)."""


def _base64_cores(secret: bytes) -> set[str]:
    cores: set[str] = set()
    n = len(secret)
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            enc = encode(b"\x00" * offset + secret).decode().rstrip("=")
            start = -(-8 * offset // 6)  # first char made only of the secret's bits
            end = 8 * (offset + n) // 6  # one past the last such char
            core = enc[start:end]
            if len(core) >= 4:
                cores.add(core)
    return cores


def encodings(secret: str) -> set[str]:
    """Every form of `secret` the scrubber removes (longest first when applied)."""
    raw = secret.encode()
    if len(raw) < MIN_SECRET_BYTES:
        raise WeakSecret(f"secrets must be at least {MIN_SECRET_BYTES} bytes to be scrubbed")
    forms = {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        urllib.parse.quote(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        raw.hex(),
        raw.hex().upper(),
    }
    forms |= _base64_cores(raw)
    return forms


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every known encoding of every secret replaced by `MARKER`."""
    forms: set[str] = set()
    for secret in secrets:
        forms |= encodings(secret)
    # Longest first, so a form that contains a shorter one is removed whole.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MARKER)
    return text


def contains_secret(text: str, secrets: Iterable[str]) -> bool:
    """Whether any known encoding of any secret is in `text` (for assertions and guards)."""
    return any(form in text for s in secrets for form in encodings(s))
