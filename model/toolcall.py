"""Where a tool call may go (SO-9): the pure rules for an operator's URL template.

A tool's credential is scoped by the operator to one endpoint: ``https://api.example/v1/users/{id}``
may carry a key that also opens ``/v1/admin`` on the same host. So the caller's arguments must
not move the call: an argument that lands in the URL's *path* is refused when it is empty, is
``.`` or ``..`` (also as ``..;param``, the way some servers read it), or holds a slash, a
backslash, ``?``, ``#`` or a control character — checked after percent-decoding it as often as
it decodes, since a proxy and an application may each decode once (``%2e%2e%2f``,
``%252e%252e%252f``), and after NFKC folding (``\uff0e`` is a dot to some servers). Arguments in the query or fragment may hold anything; every argument is
percent-encoded in full before it is placed.

After filling, the final URL is checked again, whatever the arguments were: http(s), no
userinfo, a (host, port) within `allow_hosts`, a path that starts with the template's fixed
prefix and holds no dot segment once decoded. The broker applies `plan_call` before it resolves
any secret and `fill_url` (the same checks, with the secret in place) before it sends anything.

What lives here: parsing a template, the argument and target checks. What does not: the HTTP
call, the secret store, the tool registry (relay/broker.py).
"""

from __future__ import annotations

import re
import string
import unicodedata
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from model.errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

SECRET_FIELD: Final = "secret"  # noqa: S105 — the placeholder's name, not a password
MAX_DECODE_ROUNDS: Final = 8
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_FORBIDDEN_IN_SEGMENT: Final = frozenset("/\\?#")


class CallRefused(ModelError):
    """The call would leave its template's path or hosts; nothing was resolved or sent. The
    message names the argument, never its value."""


@dataclass(frozen=True)
class UrlTemplate:
    """An operator's URL template, parsed once when the tool is declared."""

    template: str
    scheme: str
    fields: frozenset[str]  # every {name} in the template, the secret included
    path_fields: frozenset[str]  # those that land in the path
    prefix: str  # the literal path before the first field in the path
    allowed: frozenset[tuple[str, int | None]]  # (host, port); None: the scheme's default port

    @classmethod
    def parse(cls, template: str, allow_hosts: Iterable[str] = ()) -> UrlTemplate:
        """Raises `ValueError` (for the operator) when the template is not an http(s) URL or its
        hosts cannot be known."""
        literal = ""
        fields: set[str] = set()
        path_fields: set[str] = set()
        prefix: str | None = None
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"bad URL template: {exc}") from None
        for text, name, _spec, _conversion in parsed:
            literal += text
            if name is None:
                continue
            if not name.isidentifier():
                raise ValueError(f"URL template fields must be plain names, not {{{name}}}")
            fields.add(name)
            if _in_path(literal):
                path_fields.add(name)
                if prefix is None:
                    prefix = _path_of(literal)
        scheme, _, rest = literal.partition("://")
        if scheme not in _DEFAULT_PORTS or not rest:
            raise ValueError("a tool's URL must start with http:// or https://")
        if prefix is None:
            prefix = _path_of(literal)
        return cls(
            template=template,
            scheme=scheme,
            fields=frozenset(fields),
            path_fields=frozenset(path_fields),
            prefix=prefix,
            allowed=_allowed(template, allow_hosts),
        )


def _in_path(literal: str) -> bool:
    """Whether a field placed right after `literal` lands in the URL's path."""
    _, sep, rest = literal.partition("://")
    if not sep or "?" in rest or "#" in rest:
        return False
    return "/" in rest


def _path_of(literal: str) -> str:
    rest = literal.partition("://")[2]
    slash = rest.find("/")
    path = rest[slash:] if slash >= 0 else ""
    return path.split("?")[0].split("#")[0]


def _allowed(template: str, allow_hosts: Iterable[str]) -> frozenset[tuple[str, int | None]]:
    netloc_is_literal = "{" not in re.split(r"[/?#]", template.partition("://")[2], maxsplit=1)[0]
    literal = urllib.parse.urlsplit(template) if netloc_is_literal else None
    out: set[tuple[str, int | None]] = set()
    entries = list(allow_hosts)
    if not entries:
        if literal is None or not literal.hostname:
            raise ValueError("a URL whose host comes from an argument needs allow_hosts")
        entries = [literal.netloc]
    for entry in entries:
        split = urllib.parse.urlsplit(f"//{entry.strip()}")
        try:
            port = split.port
        except ValueError:
            raise ValueError(f"bad allow_hosts entry {entry!r}") from None
        if not split.hostname or split.username is not None or split.path:
            raise ValueError(f"bad allow_hosts entry {entry!r}: give host or host:port")
        host = split.hostname.lower()
        if port is not None:
            out.add((host, port))
            continue
        out.add((host, None))  # the scheme's default port
        if literal is not None and literal.hostname == host and literal.port is not None:
            out.add((host, literal.port))  # and the port the template itself names
    return frozenset(out)


def _decoded(value: str) -> str:
    """`value` percent-decoded until it no longer changes. Raises `CallRefused` for bytes that
    are not UTF-8 (overlong dots and the like)."""
    for _ in range(MAX_DECODE_ROUNDS):
        try:
            decoded = urllib.parse.unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise CallRefused("percent-escapes that are not UTF-8") from None
        if decoded == value:
            return value
        value = decoded
    raise CallRefused("percent-escapes nested too deep")


def _is_dot_segment(segment: str) -> bool:
    return segment.split(";", 1)[0] in (".", "..")


def check_path_argument(name: str, value: str) -> None:
    """Refuse an argument that would move a call out of its path segment (module docstring)."""
    try:
        decoded = _decoded(value)
    except CallRefused as exc:
        raise CallRefused(f"the argument {name!r} has {exc}; nothing was sent") from None
    if not decoded:
        raise CallRefused(f"the argument {name!r} goes into the URL path and cannot be empty")
    # Some servers fold compatibility characters ('\uff0e' FULLWIDTH FULL STOP is a '.').
    folded = unicodedata.normalize("NFKC", decoded)
    if _is_dot_segment(decoded) or _is_dot_segment(folded):
        raise CallRefused(
            f"the argument {name!r} is a '.' or '..' path segment, which would move the call "
            "outside its endpoint; nothing was sent"
        )
    if _FORBIDDEN_IN_SEGMENT & (set(decoded) | set(folded)) or any(
        c < " " or c == "\x7f" for c in decoded
    ):
        raise CallRefused(
            f"the argument {name!r} holds a slash, backslash, '?', '#' or control character "
            "(perhaps percent-encoded), which would move the call outside its endpoint; "
            "nothing was sent"
        )


def check_target(template: UrlTemplate, url: str) -> None:
    """Refuse a filled URL that is not http(s), carries userinfo, leaves `allow_hosts`, or
    whose path leaves the template's prefix or holds a dot segment once decoded."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise CallRefused("the tool's URL has a bad port; nothing was sent") from None
    host = (parts.hostname or "").lower()
    if parts.scheme != template.scheme or parts.username is not None or "@" in parts.netloc:
        raise CallRefused("the tool's URL leaves its allowed hosts; nothing was sent")
    default = _DEFAULT_PORTS[template.scheme]
    allowed = template.allowed
    if not (
        (host, port) in allowed
        or ((host, None) in allowed and port in (None, default))
        or (port is None and (host, default) in allowed)
    ):
        raise CallRefused("the tool's URL leaves its allowed hosts; nothing was sent")
    path = parts.path
    try:
        decoded = _decoded(path)
    except CallRefused:
        raise CallRefused("the tool's URL path does not decode; nothing was sent") from None
    segments = decoded.replace("\\", "/").split("/")
    if (
        not path.startswith(template.prefix)
        or not decoded.startswith(_decoded(template.prefix))
        or any(_is_dot_segment(segment) for segment in segments)
    ):
        raise CallRefused(
            f"the call would leave its endpoint (paths under {template.prefix!r}); nothing was sent"
        )


def fill_url(template: UrlTemplate, args: Mapping[str, str], secret: str) -> str:
    """The URL to call: every argument percent-encoded in full, path arguments checked, the
    result checked with `check_target`. Raises `CallRefused`, or `KeyError` naming a missing
    argument."""
    if SECRET_FIELD in args:
        raise CallRefused(f"no argument may be called {SECRET_FIELD!r}; the broker fills it")
    for name in template.path_fields - {SECRET_FIELD}:
        if name in args:
            check_path_argument(name, args[name])
    quoted = {k: urllib.parse.quote(v, safe="") for k, v in args.items()}
    url = template.template.format_map(
        {**quoted, SECRET_FIELD: urllib.parse.quote(secret, safe="")}
    )
    check_target(template, url)
    return url


def plan_call(template: UrlTemplate, args: Mapping[str, str]) -> None:
    """Every check `fill_url` makes, done before the secret is resolved (a stand-in fills its
    place). Raises `CallRefused`, or `KeyError` naming a missing argument."""
    fill_url(template, args, "secret-stand-in")
