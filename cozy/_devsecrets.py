"""Tool secrets for `cozy dev`, kept across restarts of its in-memory OpenBao.

`bao server -dev` forgets everything when it stops. The secrets a developer gives
`cozy dev secret put TOOL` are kept in `<data-dir>/dev-secrets.json` (mode 0600, beside the
relay's own keys in the same data dir) and put into OpenBao again each time `cozy dev` starts.
While a stack runs, `<data-dir>/openbao.json` (0600) holds its OpenBao address and root token,
so `secret put` reaches it at once; the stack removes that file when it stops.

For development only: production keeps its secrets in a real OpenBao (docs/broker.md).
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Final

import hvac
import hvac.exceptions
import requests.exceptions

from localfs import atomic_write
from relay.config import ConfigError
from relay.embedded import EmbeddedServiceError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relay.broker import ToolSpec

SECRETS_FILE: Final = "dev-secrets.json"
RUNNING_FILE: Final = "openbao.json"
_TIMEOUT: Final = 5.0

Stored = dict[str, dict[str, dict[str, str]]]
"""mount → path → field → value, as KV v2 keeps them."""


def load(data_dir: Path) -> Stored:
    """The kept secrets; an unreadable file stops `cozy dev` with the fix rather than losing them."""
    path = data_dir / SECRETS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        raise ConfigError(
            f"cannot read the dev secrets in {path}: repair or delete it (then put the secrets"
            " again with `cozy dev secret put TOOL`)"
        ) from None
    if not _well_formed(raw):
        raise ConfigError(
            f"{path} is not a dev secrets file: repair or delete it (then put the secrets again"
            " with `cozy dev secret put TOOL`)"
        )
    return raw  # type: ignore[no-any-return]


def _well_formed(raw: object) -> bool:
    return isinstance(raw, dict) and all(
        isinstance(paths, dict)
        and all(
            isinstance(fields, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
            for fields in paths.values()
        )
        for paths in raw.values()
    )


def has(stored: Stored, spec: ToolSpec) -> bool:
    return spec.secret_field in stored.get(spec.secret_mount, {}).get(spec.secret_path, {})


def save(data_dir: Path, spec: ToolSpec, value: str) -> None:
    stored = load(data_dir)
    fields = stored.setdefault(spec.secret_mount, {}).setdefault(spec.secret_path, {})
    fields[spec.secret_field] = value
    _write_private(data_dir / SECRETS_FILE, json.dumps(stored, indent=1).encode())


def restore(addr: str, token: str, stored: Stored) -> None:
    """`put_all` at start-up, failing in one line. Blocking (hvac): a worker thread."""
    try:
        put_all(addr, token, stored)
    except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
        raise EmbeddedServiceError(
            f"the OpenBao dev server refused the kept tool secrets ({type(exc).__name__});"
            f" check {SECRETS_FILE} in the data dir, or delete it and put the secrets again"
        ) from None


def put_all(addr: str, token: str, stored: Stored) -> None:
    """Put every kept secret into a freshly started OpenBao. Blocking (hvac): a worker thread."""
    if not stored:
        return
    client = hvac.Client(url=addr, token=token, timeout=_TIMEOUT)
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    for mount, paths in stored.items():
        if f"{mount}/" not in mounts:
            client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
        for path, fields in paths.items():
            client.secrets.kv.v2.create_or_update_secret(path, secret=fields, mount_point=mount)


def put_now(data_dir: Path, spec: ToolSpec, value: str) -> bool:
    """Put one secret into the running stack's OpenBao, if a stack runs on this data dir."""
    try:
        running = json.loads((data_dir / RUNNING_FILE).read_text(encoding="utf-8"))
        addr, token = str(running["addr"]), str(running["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    fields = load(data_dir)[spec.secret_mount][spec.secret_path]
    stored: Stored = {spec.secret_mount: {spec.secret_path: fields}}
    try:
        put_all(addr, token, stored)
    except (requests.exceptions.RequestException, hvac.exceptions.VaultError):
        return False  # a stack that stopped without removing the file: the next start puts it
    return True


@contextlib.contextmanager
def running(data_dir: Path, addr: str, token: str) -> Iterator[None]:
    """Name the running OpenBao for `cozy dev secret put` while the stack runs."""
    path = data_dir / RUNNING_FILE
    _write_private(path, json.dumps({"addr": addr, "token": token}).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o600)
