"""The broker (SO-9): agents call operator-declared tools; secrets never reach them.

A tool is declared by the operator (`[tools.NAME]` in the relay's TOML): an HTTP request
template, the upstream hosts it may reach, the OpenBao KV v2 path and field of the secret it
needs, and the collabs where it may be used. When a member granted `tool:NAME` there calls it
(who may is decided before, by model/authz.py), the broker:

1. checks the caller's arguments against the template (model/toolcall.py: nothing placed in the
   path may move the call out of its endpoint; the URL stays within `allow_hosts`) — before any
   secret is resolved;
2. resolves the secret with hvac (token or AppRole auth, re-login when the token is refused);
3. makes the request with a timeout, no redirects and a size cap, re-checking the final URL;
4. decodes the answer by its declared charset, scrubs the secret's common forms and then
   withholds the whole answer (`ToolWithheld`) if any decoding of what is left still holds the
   secret (model/scrub.py). Error messages get the same treatment.

hvac, the HTTP call and the scrubbing are blocking, so they run in worker threads; the Trio loop
never waits on them.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import hvac
import hvac.exceptions
import msgspec
import requests.exceptions
import structlog
import trio

from model.authz import ANY_COLLAB, ToolAccess
from model.ids import is_id
from model.membership import CAP_TOOL_PREFIX, valid_cap
from model.scrub import MIN_SECRET_BYTES, ScrubLimits, SecretWithheld, clean_answer, inspect, scrub
from model.toolcall import CallRefused, UrlTemplate, fill_url, plan_call

if TYPE_CHECKING:
    from collections.abc import Mapping

log = structlog.get_logger("cozy.broker")

MAX_ARG_CHARS: Final = 2048
STORE_TIMEOUT: Final = 5.0


class ToolSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An operator-declared tool. `{name}` placeholders in `url` and `body` are filled with the
    caller's arguments (URL-quoted in the URL); `{secret}` may appear in `header_value`, `url`
    or `body` and is filled by the broker only.

    `collabs` (required) names the collabs where the tool may be used, or is `["*"]` for every
    collab; there a member needs the `tool:NAME` grant unless `open_to_members` is set.
    """

    url: str
    secret_path: str
    secret_field: str
    collabs: tuple[str, ...]
    open_to_members: bool = False
    method: str = "GET"
    secret_mount: str = "secret"  # noqa: S105 — the KV mount's name, not a password
    header: str = "Authorization"
    header_value: str = "Bearer {secret}"
    body: str = ""
    allow_hosts: tuple[str, ...] = ()  # "host" or "host:port"; default: the host:port in `url`
    timeout_seconds: float = 10.0
    max_response_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        UrlTemplate.parse(self.url, self.allow_hosts)  # raises ValueError: a bad declaration
        if not self.collabs or not all(c == ANY_COLLAB or is_id(c, "c") for c in self.collabs):
            raise ValueError(
                "`collabs` names the collabs where the tool may be used (c_… ids), or is"
                f' ["{ANY_COLLAB}"] for every collab'
            )

    @property
    def template(self) -> UrlTemplate:
        return UrlTemplate.parse(self.url, self.allow_hosts)


class ToolFailed(Exception):
    """A tool call failed; the message is safe to show the caller (already scrubbed)."""


class ToolArgumentRefused(ToolFailed):
    """The arguments would move the call outside its template's path or hosts; nothing was
    resolved or sent."""


class ToolWithheld(ToolFailed):
    """The upstream answered, but its answer (or error) still held the tool's credential after
    scrubbing, so none of it is returned."""


class UnknownTool(Exception):
    """No tool of that name is declared."""


@dataclass(frozen=True)
class BaoAuth:
    addr: str
    token: str | None = None
    role_id: str | None = None
    secret_id: str | None = None

    def __repr__(self) -> str:
        return f"BaoAuth({self.addr!r}, <credentials redacted>)"


class SecretStore:
    """OpenBao KV v2 through hvac. Blocking: call `read` from a worker thread."""

    def __init__(self, auth: BaoAuth) -> None:
        self._auth = auth
        self._client = hvac.Client(url=auth.addr, token=auth.token, timeout=STORE_TIMEOUT)
        self._logged_in = auth.token is not None
        self._renew_after = float("inf")  # monotonic time after which to renew the token
        self.renewals = 0

    def _login(self) -> None:
        if self._auth.role_id is None or self._auth.secret_id is None:
            raise ToolFailed("the broker's OpenBao token was refused; tell the relay operator")
        answer = self._client.auth.approle.login(
            role_id=self._auth.role_id, secret_id=self._auth.secret_id
        )
        self._logged_in = True
        self._schedule_renewal(answer)

    def _schedule_renewal(self, answer: Mapping[str, Any]) -> None:
        lease = int(answer.get("auth", {}).get("lease_duration") or 0)
        # Renew once two thirds of the lease have passed; a token without a lease never expires.
        self._renew_after = time.monotonic() + lease * 2 / 3 if lease else float("inf")

    def _renew_if_due(self) -> None:
        if time.monotonic() < self._renew_after:
            return
        try:
            self._schedule_renewal(self._client.auth.token.renew_self())
            self.renewals += 1
        except hvac.exceptions.VaultError:
            self._logged_in = False  # past its max TTL or revoked: log in afresh

    def read(self, mount: str, path: str, field: str) -> str:
        """The secret's value. Raises `ToolFailed` with a message that names no secret."""
        for attempt in range(2):
            try:
                if self._logged_in:
                    self._renew_if_due()
                if not self._logged_in:
                    self._login()
                response = self._client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=True
                )
                value = response["data"]["data"][field]
            except hvac.exceptions.Forbidden:
                self._logged_in = False  # expired or revoked token: log in again, once
                if attempt == 0 and self._auth.role_id is not None:
                    continue
                raise ToolFailed(
                    "OpenBao refused the broker's token; tell the relay operator"
                ) from None
            except hvac.exceptions.InvalidPath:
                raise ToolFailed(f"no secret at {mount}/{path}; tell the relay operator") from None
            except KeyError:
                raise ToolFailed(f"the secret at {mount}/{path} has no field {field!r}") from None
            except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
                raise ToolFailed(
                    f"the secret store is unreachable ({type(exc).__name__}); try again later"
                ) from None
            if not isinstance(value, str) or len(value.encode()) < MIN_SECRET_BYTES:
                raise ToolFailed(f"the secret at {mount}/{path} is not a usable string")
            return value
        raise AssertionError("unreachable")  # pragma: no cover


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib then answers a 3xx as the HTTPError it is."""

    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None  # a redirect could leave the allowlist: hand the 3xx back as the result


_opener = urllib.request.build_opener(NoRedirects)


class Broker:
    def __init__(
        self,
        tools: Mapping[str, ToolSpec],
        store: SecretStore | None,
        scrub_limits: ScrubLimits | None = None,
    ) -> None:
        self._tools = dict(tools)
        self._templates = {name: spec.template for name, spec in self._tools.items()}
        self._store = store
        self._limiter = trio.CapacityLimiter(4)
        self._scrub_limits = scrub_limits or ScrubLimits()

    async def call(self, tool: str, args: Mapping[str, str]) -> tuple[int, str]:
        """(status, body) of the upstream's answer, scrubbed. Raises `UnknownTool`,
        `ToolArgumentRefused` (before any secret is resolved), `ToolWithheld`, `ToolFailed`."""
        spec = self._tools.get(tool)
        if spec is None:
            raise UnknownTool(tool)
        template = self._templates[tool]
        args = dict(args)
        _check_arguments(spec, template, args)
        if self._store is None:
            raise ToolFailed(
                "this relay has no secret store configured (BAO_ADDR); tell its operator"
            )
        store = self._store
        secret = await trio.to_thread.run_sync(
            store.read,
            spec.secret_mount,
            spec.secret_path,
            spec.secret_field,
            limiter=self._limiter,
        )
        try:
            status, body = await trio.to_thread.run_sync(
                _perform, spec, template, args, secret, self._scrub_limits, limiter=self._limiter
            )
        except ToolWithheld as exc:
            log.warning("tool_answer_withheld", tool=tool)
            raise ToolWithheld(_safe_message(str(exc), secret)) from None
        except ToolFailed as exc:
            raise ToolFailed(_safe_message(str(exc), secret)) from None
        log.info("tool_called", tool=tool, status=status, size=len(body))
        return status, body


def _check_arguments(spec: ToolSpec, template: UrlTemplate, args: Mapping[str, str]) -> None:
    """Everything that can be refused without the secret: sizes, missing arguments, and where
    the arguments would take the call (model/toolcall.py)."""
    if any(len(v) > MAX_ARG_CHARS for v in args.values()):
        raise ToolArgumentRefused(f"tool arguments are limited to {MAX_ARG_CHARS} characters each")
    try:
        plan_call(template, args)
        if spec.body:
            spec.body.format_map({**args, "secret": ""})
    except CallRefused as exc:
        raise ToolArgumentRefused(str(exc)) from None
    except (KeyError, IndexError) as exc:
        raise ToolArgumentRefused(f"the tool needs the argument {exc.args[0]!r}") from None


def _safe_message(message: str, secret: str) -> str:
    """An error message with the secret's forms replaced — or, if any decoding of it still
    holds the secret, a message that says only that."""
    scrubbed = scrub(message, [secret])
    if inspect(scrubbed, [secret]) is not None:
        return "the tool call failed with an error that quoted its credential; details withheld"
    return scrubbed


def _perform(
    spec: ToolSpec, template: UrlTemplate, args: dict[str, str], secret: str, limits: ScrubLimits
) -> tuple[int, str]:
    """Worker thread: build the request, re-check where it goes, call, cap and clean the
    answer."""
    try:
        url = fill_url(template, args, secret)
        body = spec.body.format_map({**args, "secret": secret}).encode() if spec.body else None
        header_value = spec.header_value.format_map({"secret": secret})
    except CallRefused as exc:
        raise ToolArgumentRefused(str(exc)) from None
    except (KeyError, IndexError) as exc:
        raise ToolFailed(f"the tool needs the argument {exc.args[0]!r}") from None
    request = urllib.request.Request(url, data=body, method=spec.method)  # noqa: S310 — scheme checked by fill_url
    request.add_header(spec.header, header_value)
    try:
        with _opener.open(request, timeout=spec.timeout_seconds) as response:
            status = response.status
            raw = _read_capped(response, spec.max_response_bytes)
            content_type = response.headers.get("Content-Type")
    except urllib.error.HTTPError as exc:  # the upstream answered with an error status
        with exc:
            status = exc.code
            raw = _read_capped(exc, spec.max_response_bytes)
            content_type = exc.headers.get("Content-Type")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ToolFailed(f"the upstream did not answer: {reason}") from None
    except ValueError as exc:  # e.g. http.client refusing a header value; it quotes the value
        raise ToolFailed(f"the request could not be made: {exc}") from None
    try:
        return status, clean_answer(raw, content_type, [secret], limits)
    except SecretWithheld as exc:
        raise ToolWithheld(f"the upstream answered {status}, but {exc}") from None


def _read_capped(stream: object, limit: int) -> bytes:
    data = stream.read(limit + 1)  # type: ignore[attr-defined]
    if len(data) > limit:
        raise ToolFailed(
            f"the upstream's answer is larger than this tool's limit of {limit} bytes; "
            "ask the relay operator to raise max_response_bytes or narrow the call"
        )
    return bytes(data)


def tool_access(tools: Mapping[str, ToolSpec]) -> dict[str, ToolAccess]:
    """Who may use each tool, as the authorization point (model/authz.py) reads it."""
    return {
        name: ToolAccess(frozenset(spec.collabs), spec.open_to_members)
        for name, spec in tools.items()
    }


def tools_from_config(raw: object) -> dict[str, ToolSpec]:
    """`[tools.NAME]` tables of the relay's TOML. Raises `ValueError` naming the bad tool."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("bad [tools] configuration: expected [tools.NAME] tables")  # noqa: TRY004 — the config loader reports ValueError
    tools: dict[str, ToolSpec] = {}
    for name, table in raw.items():
        if not isinstance(name, str) or not valid_cap(CAP_TOOL_PREFIX + name):
            raise ValueError(
                f"bad [tools] configuration: the tool name {name!r} cannot be granted as"
                f" {CAP_TOOL_PREFIX}NAME; use 1-32 of a-z, 0-9, '_' and '-', starting with a letter"
            )
        try:
            tools[name] = msgspec.convert(table, ToolSpec)
        except msgspec.ValidationError as exc:
            raise ValueError(f"bad [tools.{name}] configuration: {exc}") from None
    return tools
