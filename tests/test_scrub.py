"""The scrubber (SO-9): no encoding of a secret survives, checked by decoding, not by
re-encoding (an oracle independent of the scrubber's own list of forms)."""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import json
import quopri
import re
import urllib.parse
from typing import TYPE_CHECKING

import hypothesis.strategies as st
import pytest
from hypothesis import assume, given, settings

from model.scrub import (
    MARKER,
    MIN_SECRET_BYTES,
    ScrubLimits,
    SecretWithheld,
    WeakSecret,
    clean_answer,
    decode_body,
    scrub,
)

if TYPE_CHECKING:
    from collections.abc import Callable

SECRETS = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters='\\"'),
    min_size=8,
    max_size=40,
)
TEXT = st.text(max_size=40)


def _shows(text: str, secret: str) -> bool:
    """Whether `secret` is in `text` outside every marker.

    A secret that is part of the marker itself (``"[REDACTE"``), or that the marker completes
    with the text next to it, tells a reader nothing: the marker is the same for every secret.
    """
    return any(secret in part for part in text.split(MARKER))


def _b64_decodings(text: str) -> list[bytes]:
    """Everything any run of base64 characters in `text` decodes to, at every alignment."""
    out = []
    for piece in text.replace(MARKER, " ").split():
        for alphabet in (None, b"-_"):
            for start in range(4):
                chunk = piece[start:]
                chunk = chunk[: len(chunk) - len(chunk) % 4]
                try:
                    out.append(base64.b64decode(chunk, altchars=alphabet, validate=False))
                except (binascii.Error, ValueError):
                    continue
    return out


@pytest.mark.objective("SO-9")
@settings(max_examples=300, deadline=None)
@given(secret=SECRETS, before=TEXT, after=TEXT, how=st.sampled_from(
    ["raw", "quote", "quote_plus", "json", "hex", "HEX"]
))  # fmt: skip
def test_textual_encodings_of_a_secret_never_survive(
    secret: str, before: str, after: str, how: str
) -> None:
    encoded = {
        "raw": secret,
        "quote": urllib.parse.quote(secret, safe=""),
        "quote_plus": urllib.parse.quote_plus(secret),
        "json": json.dumps(secret)[1:-1],
        "hex": secret.encode().hex(),
        "HEX": secret.encode().hex().upper(),
    }[how]
    if how == "json":  # keep the surrounding text valid inside a JSON string
        before, after = (json.dumps(t)[1:-1] for t in (before, after))
    out = scrub(f"{before}{encoded}{after}", [secret])
    assert MARKER in out
    # Decode the output the way an attacker would and look for the secret.
    assert not _shows(out, secret)
    assert not _shows(urllib.parse.unquote_plus(out), secret)
    assert secret.encode().hex() not in out.lower()
    if how == "json":
        try:
            decoded = json.loads(f'"{out}"')
        except json.JSONDecodeError:
            decoded = ""  # scrubbing broke an escape next to the secret: nothing to decode
        assert not _shows(decoded, secret)


@pytest.mark.objective("SO-9")
@settings(max_examples=300, deadline=None)
@given(secret=SECRETS, before=st.binary(max_size=12), after=st.binary(max_size=12),
       urlsafe=st.booleans())  # fmt: skip
def test_a_secret_inside_base64_at_any_offset_does_not_survive(
    secret: str, before: bytes, after: bytes, urlsafe: bool
) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    middle = secret.encode()[2:-2]
    # Neighbours that spell the middle themselves are no leak (Hypothesis mixes the code's own
    # literals into its draws: the secret "--events" beside the bytes b"\xa5event\x92").
    assume(middle not in before + secret.encode()[:2])
    assume(middle not in secret.encode()[-2:] + after)
    stream = encode(before + secret.encode() + after).decode()
    out = scrub(f"Authorization: Basic {stream} (echoed)", [secret])
    assert MARKER in out
    for decoded in _b64_decodings(out):
        assert secret.encode() not in decoded
    # What is left cannot hold the secret's middle either (a long run of its bytes).
    for decoded in _b64_decodings(out):
        assert middle not in decoded


def test_scrub_leaves_other_text_alone_and_refuses_tiny_secrets() -> None:
    assert scrub("nothing to see here", ["s3cr3t-value"]) == "nothing to see here"
    with pytest.raises(WeakSecret):
        scrub("abc", ["abc"])


# --- canonicalising first: compositions of encodings against an independent oracle ---------------
#
# Each layer is (name, encode, decode): `encode` is what a real upstream emits (Python's own
# encoders, Go's JSON escaping, MIME line wrapping), `decode` is the stdlib's inverse — json,
# html, base64, binascii, quopri, urllib.parse, codecs — never model.scrub. The oracle applies the
# inverses to what the agent got, outermost first, and looks for the secret at every stage.

Layer = tuple[str, "Callable[[str], str]", "Callable[[str], str]"]
OPEN, CLOSE = "<<", ">>"  # around a base64 or hex payload, so the oracle can find it


def _between(text: str) -> str:
    start, end = text.find(OPEN), text.rfind(CLOSE)
    return text[start + len(OPEN) : end] if 0 <= start < end else text


def _b64_decode(text: str, charset: str) -> str:
    payload = "".join(_between(text).split())
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload.replace("-", "+").replace("_", "/"), validate=False)
    except ValueError:  # binascii.Error too: the scrubber broke it, nothing recovered here
        return text
    return data.decode(charset, errors="replace")


def _go_json(text: str) -> str:
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text


@st.composite
def layers(draw: st.DrawFn) -> Layer:
    kind = draw(st.sampled_from(["percent", "json", "html", "base64", "hex", "qp"]))
    pre, post = draw(st.sampled_from([("", ""), ("key=", "&x=1"), ("echo: ", "\n")]))
    if kind == "percent":
        safe = draw(st.sampled_from(["", "/"]))
        lower = draw(st.booleans())
        plus = draw(st.booleans())

        def pct(s: str) -> str:
            out = (urllib.parse.quote_plus if plus else urllib.parse.quote)(pre + s + post, safe)
            return re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), out) if lower else out

        unquote = urllib.parse.unquote_plus if plus else urllib.parse.unquote
        return ("percent", pct, unquote)
    if kind == "json":
        ascii_only, go, slash = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())

        def dumps(s: str) -> str:
            out = json.dumps({"pre": pre, "echo": s, "post": post}, ensure_ascii=ascii_only)
            out = _go_json(out) if go else out
            return out.replace("/", "\\/") if slash else out

        def loads(text: str) -> str:
            try:
                return str(json.loads(text)["echo"])
            except (ValueError, KeyError, TypeError):
                return text  # the scrubber broke it: nothing recovered through this layer

        return ("json", dumps, loads)
    if kind == "html":
        style = draw(st.sampled_from(["named", "decimal", "hex"]))

        def escape(s: str) -> str:
            s = pre + s + post
            if style == "named":
                return html.escape(s)
            form = "&#{};" if style == "decimal" else "&#x{:x};"
            return "".join(form.format(ord(c)) for c in s)

        return ("html", escape, html.unescape)
    if kind == "base64":
        charset = draw(st.sampled_from(["utf-8", "utf-16-le", "utf-16-be"]))
        alphabet = draw(st.sampled_from(["standard", "urlsafe"]))
        wrap = draw(st.sampled_from(["none", "mime-lf", "mime-crlf", "spaces"]))
        spacing = draw(st.integers(1, 30))

        def b64(s: str) -> str:
            data = (pre + s + post).encode(charset, errors="surrogatepass")
            if wrap.startswith("mime"):
                out = base64.encodebytes(data).decode()
                out = out.replace("\n", "\r\n") if wrap == "mime-crlf" else out
            else:
                out = base64.b64encode(data).decode()
                if wrap == "spaces":
                    out = " ".join(out[i : i + spacing] for i in range(0, len(out), spacing))
            if alphabet == "urlsafe":
                out = out.replace("+", "-").replace("/", "_").rstrip("=")
            return f"Authorization: Basic {OPEN}{out}{CLOSE}"

        return ("base64", b64, lambda text: _b64_decode(text, charset))
    if kind == "hex":
        upper, sep = draw(st.booleans()), draw(st.sampled_from(["", " ", ":"]))

        def hexed(s: str) -> str:
            digits = (
                (pre + s + post).encode(errors="surrogatepass").hex(sep)
                if sep
                else ((pre + s + post).encode(errors="surrogatepass").hex())
            )
            return OPEN + (digits.upper() if upper else digits) + CLOSE

        def unhex(text: str) -> str:
            try:
                return bytes.fromhex(_between(text).replace(":", " ")).decode(errors="replace")
            except ValueError:
                return text

        return ("hex", hexed, unhex)
    return (
        "qp",
        lambda s: quopri.encodestring((pre + s + post).encode(errors="surrogatepass")).decode(),
        lambda text: quopri.decodestring(text.encode(errors="replace")).decode(errors="replace"),
    )


LAYER_NAMES = {
    *("json", "html", "percent", "quoted-printable", "base64", "hex"),
    *("utf-16", "utf-16le", "utf-16be", "latin-1", "cp1252"),
}
CHARSETS = st.sampled_from(
    [
        ("utf-8", "text/plain; charset=utf-8", b""),
        ("utf-8", None, b""),
        ("utf-16-le", "text/plain; charset=UTF-16LE", b""),
        ("utf-16-be", 'application/json; charset="utf-16be"', b""),
        ("utf-16-le", "application/json", codecs.BOM_UTF16_LE),
        ("utf-16-be", None, codecs.BOM_UTF16_BE),
        ("utf-16-le", "text/plain", b""),  # undeclared: read as UTF-8 by the broker
        ("utf-16-be", None, b""),
    ]
)
ANY_SECRET = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=6, max_size=32
)


def _oracle_recovers(got: str, secret: str, stack: list[Layer], charset: str) -> bool:
    """Decode what the agent got with the stdlib inverses, outermost first; look at each stage."""
    readings = [got]
    if charset != "utf-8":  # UTF-16 read as 8-bit text: the agent re-reads the bytes
        raw = got.encode("utf-8", errors="surrogatepass")
        readings += [raw.decode(charset, errors="replace"), raw[1:].decode(charset, "replace")]
    for text in readings:
        stages = [text]
        for _name, _encode, decode in reversed(stack):
            stages.append(decode(stages[-1]))
        if any(_shows(stage, secret) for stage in stages):
            return True
    return False


@pytest.mark.objective("SO-9")
@settings(max_examples=400, deadline=None)
@given(secret=ANY_SECRET, stack=st.lists(layers(), min_size=1, max_size=3), charset=CHARSETS)
def test_no_composition_of_encodings_lets_an_independent_decoder_recover_the_secret(
    secret: str, stack: list[Layer], charset: tuple[str, str | None, bytes]
) -> None:
    assume(len(secret.encode()) >= MIN_SECRET_BYTES)
    codec, content_type, bom = charset
    text = secret
    for _name, encode, _decode in stack:
        text = encode(text)
    body = bom + text.encode(codec, errors="surrogatepass")
    # Only compositions the oracle can undo count (HTML drops some control characters, say).
    assume(_oracle_recovers(decode_body(body, content_type), secret, stack, codec))
    try:
        got = clean_answer(body, content_type, [secret])
    except SecretWithheld as withheld:
        # The refusal names layers from a fixed vocabulary, never anything from the body.
        assert set(withheld.finding.layers) <= LAYER_NAMES
        return
    assert not _oracle_recovers(got, secret, stack, codec), [name for name, *_ in stack]


@pytest.mark.objective("SO-9")
@pytest.mark.parametrize(
    ("how", "content_type"),
    [
        ("percent-lower", None),
        ("json-go", "application/json"),
        ("json-slash", "application/json"),
        ("json-u00", "application/json"),
        ("utf-16le", "text/plain; charset=utf-16le"),
        ("utf-16be", "text/plain; charset=utf-16be"),
        ("utf-16-bom", "text/plain"),
        ("utf-16le-undeclared", "text/plain"),
        ("html-named", "text/html"),
        ("html-decimal", "text/html"),
        ("html-hex", "text/html"),
        ("mime-crlf", "message/rfc822"),
        ("mime-lf", "text/plain"),
        ("base64-spaced", "text/plain"),
    ],
)
def test_each_encoding_named_in_the_issue_is_redacted_or_withheld(
    how: str, content_type: str | None
) -> None:
    secret = "sk-live/" + "0123456789abcdef" * 4 + "+&<>='\"é"
    echo = (
        f"GET /v1?key={urllib.parse.quote(secret, safe='')}\r\nAuthorization: Bearer {secret}\r\n"
    )
    text = {
        "percent-lower": re.sub(
            "%[0-9A-F]{2}", lambda m: m.group().lower(), urllib.parse.quote(echo, safe="")
        ),
        "json-go": _go_json(json.dumps({"echo": echo}, ensure_ascii=False)),
        "json-slash": json.dumps({"echo": echo}).replace("/", "\\/"),
        "json-u00": "".join(f"\\u{ord(c):04x}" for c in echo),
        "html-named": html.escape(echo),
        "html-decimal": "".join(f"&#{ord(c)};" for c in echo),
        "html-hex": "".join(f"&#x{ord(c):X};" for c in echo),
        "mime-crlf": base64.encodebytes(echo.encode()).decode().replace("\n", "\r\n"),
        "mime-lf": base64.encodebytes(echo.encode()).decode(),
        "base64-spaced": " ".join(base64.b64encode(echo.encode()).decode()),
    }.get(how, echo)
    body = {
        "utf-16le": text.encode("utf-16-le"),
        "utf-16be": text.encode("utf-16-be"),
        "utf-16-bom": text.encode("utf-16"),
        "utf-16le-undeclared": text.encode("utf-16-le"),
    }.get(how, text.encode())
    try:
        got = clean_answer(body, content_type, [secret])
    except SecretWithheld:
        return
    assert MARKER in got
    for candidate in (
        got,
        urllib.parse.unquote(got),
        html.unescape(got),
        got.encode("utf-8", "surrogatepass").decode("utf-16-le", errors="replace"),
        "".join(got.split()),
    ):
        assert secret not in candidate
        assert secret[8:-8] not in candidate


def test_an_echo_in_utf16_with_its_charset_declared_is_redacted_not_withheld() -> None:
    secret = "sk-live-0123456789abcdef"
    body = f"echo: {secret} (done)".encode("utf-16-le")
    assert clean_answer(body, "text/plain; charset=UTF-16LE", [secret]) == f"echo: {MARKER} (done)"


def test_decode_body_follows_the_bom_then_the_declared_charset_then_utf8() -> None:
    assert decode_body(codecs.BOM_UTF16_BE + "hé".encode("utf-16-be"), "text/plain") == "hé"
    assert decode_body(codecs.BOM_UTF8 + "hé".encode(), None) == "hé"
    assert decode_body("hé".encode("latin-1"), "text/plain; charset=ISO-8859-1") == "hé"
    assert decode_body("hé".encode("utf-16-be"), "text/plain; charset=utf-16") == "hé"
    assert decode_body("hé".encode("utf-16-le"), "text/plain; charset=utf-16") == "hé"
    assert decode_body(b"h\xc3\xa9", "text/plain; charset=base64") == "hé"  # not a text codec
    assert decode_body(b"h\xc3\xa9", "text/plain; charset=no-such") == "hé"
    assert decode_body(b"\xff", None) == "\ufffd"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.mark.objective("SO-9")
@settings(max_examples=200, deadline=None)
@given(
    secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=32),
    value=JSON_VALUES,
    blob=st.binary(max_size=200),
    go=st.booleans(),
)
def test_answers_that_do_not_hold_the_secret_pass_unchanged(
    secret: str, value: object, blob: bytes, go: bool
) -> None:
    secret = "sk-live-" + secret
    document = json.dumps(
        {"data": value, "blob": base64.encodebytes(blob).decode(), "hex": blob.hex()}
    )
    document = _go_json(document) if go else document
    page = f"<p>{html.escape(document)}</p><a href='/x?q={urllib.parse.quote(document)}'>x</a>"
    for body in (document, page):
        assert clean_answer(body.encode(), "text/html; charset=utf-8", [secret]) == body


def test_an_answer_too_deep_to_check_is_withheld_not_passed() -> None:
    secret = "sk-live-0123456789abcdef"
    body = base64.b64encode(b"nothing here, " * 100)
    tiny = ScrubLimits(min_work=10, work_per_char=1)
    with pytest.raises(SecretWithheld) as withheld:
        clean_answer(body, None, [secret], tiny)
    assert withheld.value.finding.exhausted
    assert "too deeply" in str(withheld.value)
    assert clean_answer(body, None, [secret]) == body.decode()
