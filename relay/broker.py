"""The broker (SO-9): agents call operator-declared tools; secrets never reach them.

A tool is declared by the operator (`[tools.NAME]` in the relay's TOML): an HTTP request
template, the upstream hosts it may reach, and the OpenBao KV v2 path and field of the secret it
needs. When a member with the `tool:NAME` capability calls it, the broker resolves the secret
with hvac (token or AppRole auth, re-login when the token is refused), makes the request with a
timeout, no redirects and a size cap, and returns the status and body — after scrubbing every
encoding of the secret from the body and from any error (model/scrub.py). hvac and the HTTP call
are blocking, so both run in worker threads; the Trio loop never waits on them.
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

from model.scrub import MIN_SECRET_BYTES, scrub

if TYPE_CHECKING:
    from collections.abc import Mapping

log = structlog.get_logger("cozy.broker")

MAX_ARG_CHARS: Final = 2048
STORE_TIMEOUT: Final = 5.0


class ToolSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An operator-declared tool. `{name}` placeholders in `url` and `body` are filled with the
    caller's arguments (URL-quoted in the URL); `{secret}` may appear in `header_value`, `url`
    or `body` and is filled by the broker only."""

    url: str
    secret_path: str
    secret_field: str
    method: str = "GET"
    secret_mount: str = "secret"  # noqa: S105 — the KV mount's name, not a password
    header: str = "Authorization"
    header_value: str = "Bearer {secret}"
    body: str = ""
    allow_hosts: tuple[str, ...] = ()  # default: the host in `url`
    timeout_seconds: float = 10.0
    max_response_bytes: int = 256 * 1024


class ToolFailed(Exception):
    """A tool call failed; the message is safe to show the caller (already scrubbed)."""


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
    def __init__(self, tools: Mapping[str, ToolSpec], store: SecretStore | None) -> None:
        self._tools = dict(tools)
        self._store = store
        self._limiter = trio.CapacityLimiter(4)

    def has(self, tool: str) -> bool:
        return tool in self._tools

    async def call(self, tool: str, args: Mapping[str, str]) -> tuple[int, str]:
        """(status, body) of the upstream's answer, scrubbed. Raises `UnknownTool`, `ToolFailed`."""
        spec = self._tools.get(tool)
        if spec is None:
            raise UnknownTool(tool)
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
                _perform, spec, dict(args), secret, limiter=self._limiter
            )
        except ToolFailed as exc:
            raise ToolFailed(scrub(str(exc), [secret])) from None
        log.info("tool_called", tool=tool, status=status, size=len(body))
        return status, scrub(body, [secret])


def _perform(spec: ToolSpec, args: dict[str, str], secret: str) -> tuple[int, str]:
    """Worker thread: build the request, check the host, call, cap the answer."""
    if any(len(v) > MAX_ARG_CHARS for v in args.values()):
        raise ToolFailed(f"tool arguments are limited to {MAX_ARG_CHARS} characters each")
    quoted = {k: urllib.parse.quote(v, safe="") for k, v in args.items()}
    try:
        url = spec.url.format(**quoted, secret=urllib.parse.quote(secret, safe=""))
        body = spec.body.format(**args, secret=secret).encode() if spec.body else None
        header_value = spec.header_value.format(secret=secret)
    except (KeyError, IndexError) as exc:
        raise ToolFailed(f"the tool needs the argument {exc.args[0]!r}") from None
    parts = urllib.parse.urlsplit(url)
    allowed = spec.allow_hosts or (urllib.parse.urlsplit(spec.url).hostname or "",)
    if parts.scheme not in ("http", "https") or parts.hostname not in allowed:
        raise ToolFailed("the tool's URL leaves its allowed hosts; nothing was sent")
    request = urllib.request.Request(url, data=body, method=spec.method)  # noqa: S310 — scheme checked above
    request.add_header(spec.header, header_value)
    try:
        with _opener.open(request, timeout=spec.timeout_seconds) as response:
            return response.status, _read_capped(response, spec.max_response_bytes)
    except urllib.error.HTTPError as exc:  # the upstream answered with an error status
        with exc:
            return exc.code, _read_capped(exc, spec.max_response_bytes)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ToolFailed(f"the upstream did not answer: {reason}") from None
    except ValueError as exc:  # e.g. http.client refusing a header value; it quotes the value
        raise ToolFailed(f"the request could not be made: {exc}") from None


def _read_capped(stream: object, limit: int) -> str:
    data = stream.read(limit + 1)  # type: ignore[attr-defined]
    if len(data) > limit:
        raise ToolFailed(f"the upstream's answer is larger than {limit} bytes")
    return bytes(data).decode("utf-8", errors="replace")


def tools_from_config(raw: object) -> dict[str, ToolSpec]:
    """`[tools.NAME]` tables of the relay's TOML. Raises `ValueError` naming the bad tool."""
    if raw is None:
        return {}
    try:
        return msgspec.convert(raw, dict[str, ToolSpec])
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad [tools] configuration: {exc}") from None
