"""Keeping credential values out of anything an agent may see (SO-9): the pure half.

The broker resolves a tool's secret, makes the call, and then must make sure the secret does not
come back — in the upstream's answer, in an error that echoes the request, in a redirect URL.
Echoes are rarely verbatim: upstreams base64 an Authorization header, percent-encode a query,
JSON-escape a body (Go's encoder writes ``<`` as ``\\u003c``), wrap base64 at 76 columns, answer
in UTF-16, or HTML-escape a page. What lives here, in the order the broker applies it:

1. `decode_body` turns the answer's bytes into text the way its sender declared: a byte-order
   mark first, then the ``charset`` of its Content-Type, UTF-8 otherwise.
2. `scrub` replaces the forms of each secret that upstreams commonly echo — raw, percent-encoded
   (either hex case), JSON-escaped (Python's and Go's way, with or without ``\\/``), HTML-escaped,
   hex, and the part of its base64 that depends on the secret alone — with `MARKER`, so an answer
   that merely echoes a header stays useful.
3. `inspect` then canonicalises what is left: it peels layers of encoding off one at a time, in
   every order, up to `ScrubLimits.max_layers` deep, and reports the first decoding that still
   holds a secret. `clean_answer` runs all three and raises `SecretWithheld` for such an answer:
   the broker withholds it whole rather than guess which part to cut.

The layers `inspect` peels (each name is what `Finding.layers` reports):

- ``percent``: ``%XX`` escapes in either case, and form encoding's ``+`` for a space;
- ``json``: JSON and JavaScript string escapes — ``\\"``, ``\\/``, ``\\n``…, ``\\u00XX`` with
  surrogate pairs, ``\\xXX`` — anywhere in the text, not only in well-formed JSON;
- ``html``: HTML character references, named, decimal and hex (HTML5 rules);
- ``quoted-printable``: ``=XX`` escapes and soft line breaks;
- ``base64``: standard and URL-safe alphabets, padded or not, at every offset, with whitespace
  anywhere inside a run (MIME's 76-column lines with CRLF or LF, PEM's 64, or any other);
- ``hex``: either case, runs of digits with whitespace or colons between them;
- readings of bytes as text: UTF-8, and UTF-16 (LE or BE, either alignment) when the bytes are
  dense with NULs; for non-ASCII secrets also text read as Latin-1 or cp1252 that was UTF-8.

Every text and every byte string met on the way is searched for each secret's UTF-8 form and
its UTF-16 forms (LE and BE, so UTF-16 read as 8-bit text, or byte-swapped, is caught).

What is deliberately out of reach: an upstream that transforms the secret some other way —
hashes, compresses, encrypts, reverses or splits it. Checking costs work proportional to the
answer; `ScrubLimits` bounds it, and an answer that would need more is withheld too (fail
closed), never passed unchecked.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from model.errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

MARKER: Final = "[REDACTED]"
MIN_SECRET_BYTES: Final = 4  # shorter values would match everywhere; refuse them as secrets


class WeakSecret(ValueError):
    """A secret too short to scrub reliably (it would match ordinary text)."""


@dataclass(frozen=True)
class ScrubLimits:
    """How hard `inspect` looks. `max_layers`: encodings peeled off one inside another.
    `work_per_char` and `min_work`: characters and bytes of decoded text it may examine, per
    character of the answer and at least; an answer that needs more is reported, not passed."""

    max_layers: int = 6
    work_per_char: int = 64
    min_work: int = 1 << 22


@dataclass(frozen=True)
class Finding:
    """Where a secret was still found: the layers peeled off, outermost first (``()`` when the
    text holds it as is). `exhausted` means the check ran out of `ScrubLimits` work first."""

    layers: tuple[str, ...]
    exhausted: bool = False

    def describe(self) -> str:
        if self.exhausted:
            return "the answer is encoded too deeply to be checked"
        if not self.layers:
            return "the answer holds the credential as plain text"
        return "the answer holds the credential under " + " → ".join(self.layers)


class SecretWithheld(ModelError):
    """An answer still held a secret after scrubbing, so none of it may be shown. The message
    names the encoding layers (never the value) and what to do next."""

    def __init__(self, finding: Finding) -> None:
        self.finding = finding
        super().__init__(
            f"{finding.describe()}; it was withheld. Ask the relay operator to point this tool at "
            "an endpoint that does not echo its credential"
        )


# --- the forms scrub() replaces -------------------------------------------------------------------


def _base64_cores(secret: bytes) -> set[str]:
    """For each offset the secret can have inside a longer base64 stream, the characters made
    from the secret's bits alone (its first and last characters mix with its neighbours')."""
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


_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028"}


def _go_json(escaped: str) -> str:
    for char, escape in _GO_ESCAPES.items():
        escaped = escaped.replace(char, escape)
    return escaped.replace("\u2029", "\\u2029")


def encodings(secret: str) -> set[str]:
    """Every form of `secret` that `scrub` replaces (longest first when applied)."""
    raw = secret.encode()
    if len(raw) < MIN_SECRET_BYTES:
        raise WeakSecret(f"secrets must be at least {MIN_SECRET_BYTES} bytes to be scrubbed")
    percent = {
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        urllib.parse.quote(secret),
    }
    percent |= {_PERCENT_ESCAPE.sub(lambda m: m.group().lower(), p) for p in percent}
    escaped = {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    escaped |= {_go_json(e) for e in escaped}
    escaped |= {e.replace("/", "\\/") for e in escaped}
    forms = {
        secret,
        *percent,
        *escaped,
        html.escape(secret),
        html.escape(secret, quote=False),
        raw.hex(),
        raw.hex().upper(),
    }
    forms |= _base64_cores(raw)
    return forms


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every form in `encodings` of every secret replaced by `MARKER`. What this
    misses, `inspect` finds; use `clean_answer` for anything an agent will see."""
    forms: set[str] = set()
    for secret in secrets:
        forms |= encodings(secret)
    # Longest first, so a form that contains a shorter one is removed whole.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MARKER)
    return text


# --- decoding an answer's bytes ------------------------------------------------------------------

_CHARSET = re.compile(r"""charset\s*=\s*["']?([A-Za-z0-9._:-]+)""", re.IGNORECASE)
_BOMS: Final = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


def decode_body(data: bytes, content_type: str | None) -> str:
    """The answer as text: by its byte-order mark (which is dropped), else by the ``charset`` of
    `content_type`, else as UTF-8. Undecodable bytes become U+FFFD; an unknown or non-text
    charset counts as UTF-8. ``utf-16`` without a mark is read in the byte order its NULs show
    (big-endian when they show none, as RFC 2781 says)."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(codec, errors="replace")
    match = _CHARSET.search(content_type or "")
    charset = match.group(1).lower() if match else "utf-8"
    if charset in ("utf-16", "utf16", "ucs-2"):
        charset = "utf-16-le" if data[1::2].count(0) > data[0::2].count(0) else "utf-16-be"
    elif charset in ("utf-32", "utf32"):
        charset = "utf-32-le" if data[:1] != b"\x00" else "utf-32-be"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:  # unknown, or a bytes-to-bytes codec such as base64
        return data.decode("utf-8", errors="replace")


def clean_answer(
    data: bytes,
    content_type: str | None,
    secrets: Iterable[str],
    limits: ScrubLimits | None = None,
) -> str:
    """What an agent may see of an upstream's answer: decoded (`decode_body`), scrubbed
    (`scrub`) and then checked (`inspect`). Raises `SecretWithheld` when any decoding of the
    scrubbed text still recovers a secret, or the check would exceed `limits`."""
    secrets = list(secrets)
    text = scrub(decode_body(data, content_type), secrets)
    found = inspect(text, secrets, limits)
    if found is not None:
        raise SecretWithheld(found)
    return text


# --- canonicalising: peeling layers off ----------------------------------------------------------


@dataclass(frozen=True)
class _Needles:
    texts: tuple[str, ...]
    utf8: tuple[bytes, ...]
    wide: tuple[bytes, ...]  # UTF-16 LE and BE forms
    shortest: int  # characters in the shortest secret: no decoding lengthens text
    non_ascii: bool  # some secret is not ASCII, so mojibake can hide it

    @classmethod
    def of(cls, secrets: Iterable[str]) -> _Needles:
        texts = tuple(dict.fromkeys(secrets))
        for secret in texts:
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise WeakSecret(
                    f"secrets must be at least {MIN_SECRET_BYTES} bytes to be scrubbed"
                )
        if not texts:
            raise ValueError("inspect needs at least one secret")
        be = tuple(s.encode("utf-16-be", "surrogatepass") for s in texts)
        le = tuple(s.encode("utf-16-le", "surrogatepass") for s in texts)
        return cls(
            texts=texts,
            utf8=tuple(s.encode("utf-8", "surrogatepass") for s in texts),
            wide=le + be,
            shortest=min(len(s) for s in texts),
            non_ascii=any(not s.isascii() for s in texts),
        )

    def in_text(self, text: str) -> str | None:
        """None, or the reading under which `text` holds a secret."""
        if any(s in text for s in self.texts):
            return ""
        as_bytes = text.encode("utf-8", "surrogatepass")
        if any(w in as_bytes for w in self.wide):
            return "utf-16"
        return None

    def in_bytes(self, data: bytes) -> str | None:
        if any(n in data for n in self.utf8):
            return ""
        if any(w in data for w in self.wide):
            return "utf-16"
        return None


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{6,}")
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{8,}")
_URLSAFE = str.maketrans("-_", "+/")
_QP_ESCAPE = re.compile(r"=(?:[0-9A-Fa-f]{2}|\r?\n)")
_JSON_ESCAPE = re.compile(r"""\\(?:u([0-9A-Fa-f]{4})|x([0-9A-Fa-f]{2})|(["'\\/bfnrt]))""")
_JSON_SIMPLE: Final = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_SURROGATE = re.compile("[\ud800-\udfff]")
_MOJIBAKE_LEAD = re.compile("[\u00c2-\u00f4]")


def _json_unescape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        code = m.group(1) or m.group(2)
        return chr(int(code, 16)) if code else _JSON_SIMPLE[m.group(3)]

    out = _JSON_ESCAPE.sub(one, text)
    if _SURROGATE.search(out):  # \ud83d\ude00 → one character; a lone half → U+FFFD
        out = out.encode("utf-16-le", "surrogatepass").decode("utf-16-le", errors="replace")
    return out


def _readable(piece: bytes) -> bool:
    """Whether decoded bytes look like text worth peeling further (UTF-8 with at most a few
    broken characters at its edges, or UTF-16), rather than binary or a misaligned decoding."""
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        if piece.count(0) * 4 > len(piece):
            return True
        return piece.decode("utf-8", errors="replace").count("\ufffd") <= 4 + len(piece) // 32
    return True


def _joined(pieces: list[bytes]) -> tuple[bytes, bytes]:
    """All pieces (to search) and the readable ones (to peel further), newline-separated."""
    return b"\n".join(pieces), b"\n".join(p for p in pieces if _readable(p))


def _base64_decodings(text: str, shortest: int) -> list[tuple[bytes, bytes]]:
    """Each run of base64 characters (whitespace inside removed) decoded from each of the four
    offsets it may start at, both alphabets folded together. Runs too short to decode to
    `shortest` characters are skipped: no later layer lengthens text."""
    packed = "".join(text.split())
    runs = [
        run.translate(_URLSAFE)
        for run in _BASE64_RUN.findall(packed)
        if len(run) * 3 // 4 >= shortest
    ]
    out = []
    for start in range(4 if runs else 0):
        pieces = []
        for run in runs:
            chunk = run[start:]
            rest = len(chunk) % 4
            chunk = chunk[:-1] if rest == 1 else chunk + "=" * ((4 - rest) % 4)
            pieces.append(binascii.a2b_base64(chunk))
        out.append(_joined(pieces))
    return out


def _hex_decodings(text: str, shortest: int) -> list[tuple[bytes, bytes]]:
    packed = "".join(text.split()).replace(":", "")
    runs = [run for run in _HEX_RUN.findall(packed) if len(run) // 2 >= shortest]
    return [
        _joined([bytes.fromhex(run[start : start + (len(run) - start) // 2 * 2]) for run in runs])
        for start in range(2 if runs else 0)
    ]


def _text_layers(text: str, needles: _Needles) -> Iterator[tuple[str, str | tuple[bytes, bytes]]]:
    """(layer name, what peeling that layer off `text` gives), only for layers present. Bytes
    come as (all of them, to search; the part that reads as text, to peel further)."""
    if "\\" in text:
        yield "json", _json_unescape(text)
    if "&" in text:
        yield "html", html.unescape(text)
    if "%" in text:
        decoded = urllib.parse.unquote_to_bytes(text)
        yield "percent", (decoded, decoded)
    if "+" in text:  # form encoding: '+' is a space (inside the secret or any layer around it)
        decoded = urllib.parse.unquote_to_bytes(text.replace("+", " "))
        yield "percent", (decoded, decoded)
    if "=" in text and _QP_ESCAPE.search(text):
        decoded = binascii.a2b_qp(text.encode("utf-8", "surrogatepass"))
        yield "quoted-printable", (decoded, decoded)
    for pair in _base64_decodings(text, needles.shortest):
        yield "base64", pair
    for pair in _hex_decodings(text, needles.shortest):
        yield "hex", pair
    if "\x00" in text:  # UTF-16 read as 8-bit text: read its bytes again
        decoded = text.encode("utf-8", "surrogatepass")
        yield "utf-16", (decoded, decoded)
    if needles.non_ascii and not text.isascii() and _MOJIBAKE_LEAD.search(text):
        for codec in ("latin-1", "cp1252"):
            decoded = text.encode(codec, errors="replace")
            yield codec, (decoded, decoded)


def _readings(data: bytes) -> Iterator[tuple[str, str]]:
    """Ways to read bytes as text: UTF-8, and UTF-16 at both alignments when NULs say so."""
    if not data:
        return
    yield "", data.decode("utf-8", errors="replace")
    threshold = len(data) // 8
    if threshold and data.count(0) > threshold:
        if data[1::2].count(0) > threshold:  # ASCII in UTF-16LE from an even offset
            yield "utf-16le", data.decode("utf-16-le", errors="replace")
            yield "utf-16be", data[1:].decode("utf-16-be", errors="replace")
        if data[0::2].count(0) > threshold:
            yield "utf-16be", data.decode("utf-16-be", errors="replace")
            yield "utf-16le", data[1:].decode("utf-16-le", errors="replace")


def inspect(text: str, secrets: Iterable[str], limits: ScrubLimits | None = None) -> Finding | None:
    """The first decoding of `text` (layers peeled in any order, up to `limits.max_layers`) that
    holds any secret, or None when none does. Reports ``exhausted`` instead when checking would
    take more than `limits` allows — callers treat that as found (fail closed).

    Breadth first, so each distinct text is met at the fewest layers that reach it and is
    peeled from there once."""
    limits = limits or ScrubLimits()
    needles = _Needles.of(secrets)
    work = max(limits.min_work, limits.work_per_char * len(text))
    seen: set[int] = set()
    queue: deque[tuple[str, tuple[str, ...], int]] = deque([(text, (), 0)])
    while queue:
        node, path, depth = queue.popleft()
        work -= len(node)
        if work < 0:
            return Finding((), exhausted=True)
        reading = needles.in_text(node)
        if reading is not None:
            return Finding((*path, reading) if reading else path)
        if depth >= limits.max_layers:
            continue
        for layer, peeled in _text_layers(node, needles):
            if isinstance(peeled, str):
                texts = [("", peeled)]
            else:
                searched, readable = peeled
                work -= len(searched)
                reading = needles.in_bytes(searched)
                if reading is not None:
                    return Finding((*path, layer, reading) if reading else (*path, layer))
                texts = list(_readings(readable)) if depth + 1 < limits.max_layers else []
            for name, child in texts:
                key = hash(child)
                if key not in seen and child != node:
                    seen.add(key)
                    where = (*path, layer, name) if name else (*path, layer)
                    queue.append((child, where, depth + 1))
    return None
