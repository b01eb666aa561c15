"""Where a tool call may go (SO-9, model/toolcall.py): arguments cannot move a call out of its
template's path, and the final URL stays within allow_hosts — for any argument a caller sends."""

from __future__ import annotations

import posixpath
import unicodedata
import urllib.parse

import hypothesis.strategies as st
import pytest
from hypothesis import example, given, settings

from model.toolcall import CallRefused, UrlTemplate, fill_url

USERS = UrlTemplate.parse("https://api.example/v1/users/{id}/profile?verbose={v}&key={secret}")

# Arguments built from the pieces path tricks are made of, in every encoding depth.
PIECES = st.sampled_from(
    [
        *(".", "..", "/", "\\", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "2e", "2f", ";", "?"),
        *("#", "%3f", "%23", "admin", "a", "%00", "\x00", "\n", "%c0%ae", "\uff0e", "%252e"),
        "%252f",
    ]
)
ARGUMENTS = st.lists(PIECES, max_size=8).map("".join) | st.text(max_size=12)


def _routed(path: str, rounds: int) -> str:
    """How a server that percent-decodes `rounds` times (and at 3, folds NFKC) and resolves dot
    segments routes it."""
    for _ in range(rounds):
        path = urllib.parse.unquote(path)
    path = unicodedata.normalize("NFKC", path) if rounds == 3 else path
    return posixpath.normpath(path.replace("\\", "/").split("?")[0].split("#")[0])


@pytest.mark.objective("SO-9")
@settings(max_examples=500, deadline=None)
@given(value=ARGUMENTS, verbose=st.text(max_size=12))
@example(value="../admin", verbose="")
@example(value="%2e%2e%2fadmin", verbose="")
@example(value="..;", verbose="")
def test_no_argument_moves_a_call_out_of_its_endpoint(value: str, verbose: str) -> None:
    try:
        url = fill_url(USERS, {"id": value, "v": verbose}, "s3cr3t/../value")
    except CallRefused as refused:
        assert "argument 'id'" in str(refused)
        return
    parts = urllib.parse.urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port) == ("https", "api.example", None)
    for rounds in (1, 2, 3):
        routed = _routed(parts.path, rounds)
        assert routed.startswith("/v1/users/"), (value, routed)
        assert routed.endswith("/profile"), (value, routed)
        assert routed.count("/") == 4, (value, routed)  # one segment for the argument


@pytest.mark.objective("SO-9")
@pytest.mark.parametrize(
    ("template", "allow", "args", "reaches"),
    [
        ("http://127.0.0.1:8080/x/{a}", (), {"a": "1"}, True),
        ("http://127.0.0.1:8080/x/{a}", ("127.0.0.1",), {"a": "1"}, True),
        ("http://127.0.0.1:{port}/x", ("127.0.0.1",), {"port": "8080"}, False),
        ("http://127.0.0.1:{port}/x", ("127.0.0.1",), {"port": "80"}, True),
        ("http://127.0.0.1:{port}/x", ("127.0.0.1:9000",), {"port": "9000"}, True),
        ("https://{host}/x", ("api.example",), {"host": "api.example"}, True),
        ("https://{host}/x", ("api.example",), {"host": "evil.example"}, False),
        ("https://{host}/x", ("api.example",), {"host": "evil.example/api.example"}, False),
        ("https://{host}/x", ("api.example",), {"host": "api.example@evil.example"}, False),
        ("https://{host}/x", ("api.example",), {"host": "api.example:444"}, False),
        ("https://api.example/x", ("other.example",), {}, False),
    ],
)
def test_the_final_url_stays_within_allow_hosts(
    template: str, allow: tuple[str, ...], args: dict[str, str], reaches: bool
) -> None:
    parsed = UrlTemplate.parse(template, allow)
    if reaches:
        fill_url(parsed, args, "secret-value")
    else:
        with pytest.raises(CallRefused, match="allowed hosts"):
            fill_url(parsed, args, "secret-value")


def test_bad_declarations_are_refused_when_the_tool_is_declared() -> None:
    for template, allow in [
        ("ftp://host/x", ()),
        ("https://{host}/x", ()),  # a host from an argument needs allow_hosts
        ("https://api.example/{0}", ()),
        ("https://api.example/x", ("user@host",)),
    ]:
        with pytest.raises(ValueError):
            UrlTemplate.parse(template, allow)


def test_no_argument_may_pose_as_the_secret() -> None:
    with pytest.raises(CallRefused, match="secret"):
        fill_url(USERS, {"id": "1", "v": "", "secret": "mine"}, "s3cr3t-value")
