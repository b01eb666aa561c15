"""The scrubber (SO-9): no encoding of a secret survives, checked by decoding, not by
re-encoding (an oracle independent of the scrubber's own list of forms)."""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from model.scrub import MARKER, WeakSecret, scrub

SECRETS = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters='\\"'),
    min_size=8,
    max_size=40,
)
TEXT = st.text(max_size=40)


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
    assert secret not in out
    assert secret not in urllib.parse.unquote_plus(out)
    assert secret.encode().hex() not in out.lower()
    if how == "json":
        try:
            decoded = json.loads(f'"{out}"')
        except json.JSONDecodeError:
            decoded = ""  # scrubbing broke an escape next to the secret: nothing to decode
        assert secret not in decoded


@pytest.mark.objective("SO-9")
@settings(max_examples=300, deadline=None)
@given(secret=SECRETS, before=st.binary(max_size=12), after=st.binary(max_size=12),
       urlsafe=st.booleans())  # fmt: skip
def test_a_secret_inside_base64_at_any_offset_does_not_survive(
    secret: str, before: bytes, after: bytes, urlsafe: bool
) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    stream = encode(before + secret.encode() + after).decode()
    out = scrub(f"Authorization: Basic {stream} (echoed)", [secret])
    assert MARKER in out
    for decoded in _b64_decodings(out):
        assert secret.encode() not in decoded
    # What is left cannot hold the secret's middle either (a long run of its bytes).
    middle = secret.encode()[2:-2]
    for decoded in _b64_decodings(out):
        assert middle not in decoded


def test_scrub_leaves_other_text_alone_and_refuses_tiny_secrets() -> None:
    assert scrub("nothing to see here", ["s3cr3t-value"]) == "nothing to see here"
    with pytest.raises(WeakSecret):
        scrub("abc", ["abc"])
