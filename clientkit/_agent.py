"""The agent credential file: everything a bot needs to act as its agent, and nothing else.

`cozy agent create` writes it (mode 0600, atomically): the agent's own keys (generated for it on
the creating human's device), its revocable token, the relay it talks to (with the relay's
pinned key) and the collab it was added to. It holds no key of the human who created it.
Loading refuses a file that others can read: a leaked credential file is a stolen bot.
"""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING

import msgspec

from localfs import atomic_write

if TYPE_CHECKING:
    from pathlib import Path


class CredentialsError(Exception):
    """The credential file is missing, unsafe or damaged; the message says what to do."""


class AgentCredentials(msgspec.Struct, frozen=True):
    relay_url: str
    relay_pk: str  # hex, pinned
    account_id: str
    handle: str
    collab_id: str
    sign_seed: bytes
    box_sk: bytes
    token: str
    expires_at: int

    def __repr__(self) -> str:
        return f"AgentCredentials({self.handle!r} in {self.collab_id}, <keys and token redacted>)"


def save_credentials(path: Path, creds: AgentCredentials) -> None:
    """Write atomically with mode 0600; refuses to overwrite an existing file."""
    if path.exists():
        raise CredentialsError(f"{path} exists; choose another --out or move it away first")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, msgspec.json.encode(creds), mode=0o600, overwrite=False)


def load_credentials(path: Path) -> AgentCredentials:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path} is readable by others: run `chmod 600 {path}` first")
    try:
        return msgspec.json.decode(data, type=AgentCredentials)
    except msgspec.DecodeError:
        raise CredentialsError(f"{path} is not an agent credential file") from None
