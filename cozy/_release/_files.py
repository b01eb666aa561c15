"""The release tool's errors and the files it keeps: signing keys, trust files, the state file.

Part of `cozy release` (cozy/_release/__init__.py says what it does); everything here is local
files, written with `localfs.atomic_write`. A signing seed is never printed, logged or put in an
error message.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Final

import msgspec

from localfs import atomic_write
from model import release
from model.release import ReleaseError

DEV_DIR: Final = Path(".cozy/release")
DEV_KEY_NAME: Final = "release-key"
# The developer trust file lives with the user's release state, never in a checkout or a
# download: a directory someone hands you could otherwise bring its own "trusted" keys.
DEV_TRUST_NAME: Final = "release-trusted.json"
KEY_ENV: Final = "COZY_RELEASE_KEY_FILE"
STATE_NAME: Final = "release-state.json"
_SEED_BYTES: Final = 32


# --- errors ---------------------------------------------------------------------------------------


class ReleaseSetupError(ReleaseError):
    """The command could not run (key, trust file, state file, tools); nothing was judged."""


class NoTrustedKey(ReleaseSetupError):
    """First use: no public key was given to verify against."""


class KeyFileError(ReleaseSetupError):
    """The release signing key file is missing, malformed, or readable by others."""


class TrustFileError(ReleaseSetupError):
    """The trust file is missing or malformed."""


class StateFileError(ReleaseSetupError):
    """The downgrade-protection state file cannot be read or written."""


class LockFileMissing(ReleaseSetupError):
    """There is no pdm.lock to compare the release's lock hash with."""


class BuildRefused(ReleaseError):
    """`cozy release build` will not build from this checkout."""


class NotAGitCheckout(BuildRefused):
    """The current directory is not inside a git checkout with a commit."""


class DirtyWorkingTree(BuildRefused):
    """The working tree differs from HEAD, so no commit names what would be built."""


class LockOutOfDate(BuildRefused):
    """pdm.lock does not match pyproject.toml (or is missing)."""


class BuildFailed(BuildRefused):
    """The build backend failed or produced something unexpected."""


# --- files ----------------------------------------------------------------------------------------


class TrustedKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    public_key: str  # hex
    key_id: str = ""
    note: str = ""


class TrustFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keys: tuple[TrustedKey, ...] = ()


class ProjectState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    highest_version: str
    source_commit: str
    verified_at: release.AwareDatetime


class StateFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    projects: dict[str, ProjectState] = {}


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- keys -----------------------------------------------------------------------------------------


def write_new_key(path: Path) -> bytes:
    """Create a new signing seed at `path` (mode 0600, never overwriting); return its public key."""
    seed = os.urandom(_SEED_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        atomic_write(path, (seed.hex() + "\n").encode("ascii"), mode=0o600, overwrite=False)
    except FileExistsError:
        raise KeyFileError(
            f"{path} already exists; a release key is never overwritten (move it away first)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    return release.public_key_of(seed)


def read_key(path: Path) -> bytes:
    """The 32-byte seed in `path`; refuses a file others can read (like ssh does)."""
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(
            f"no release key at {path}; create one with `cozy release keygen --out {path}`"
        ) from None
    except UnicodeDecodeError:
        # Not the exception's text: it quotes the offending byte, a byte of the seed.
        raise KeyFileError(
            f"the release key {path} is not a hex seed; make one with `cozy release keygen`"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the release key {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"the release key {path} is readable by other users; run `chmod 600 {path}` "
            "(and consider the key exposed if others could read it)"
        )
    try:
        seed = bytes.fromhex(text.strip())
    except ValueError:
        seed = b""
    if len(seed) != _SEED_BYTES:
        raise KeyFileError(
            f"{path} is not a cozy release key (expected 64 hex characters, as written by "
            "`cozy release keygen`)"
        )
    return seed


def parse_public_key(text: str) -> bytes:
    try:
        public_key = bytes.fromhex(text.strip())
    except ValueError:
        public_key = b""
    if len(public_key) != 32:
        raise NoTrustedKey(
            "a release public key is 64 hex characters (as `cozy release keygen` prints it)"
        )
    return public_key


def load_trust_file(path: Path) -> dict[str, bytes]:
    """Key id -> public key for every key in a trust file."""
    try:
        trust = msgspec.json.decode(path.read_bytes(), type=TrustFile)
    except FileNotFoundError:
        raise TrustFileError(f"no trust file at {path}") from None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise TrustFileError(f"cannot read the trust file {path}: {exc}") from None
    keys: dict[str, bytes] = {}
    for entry in trust.keys:
        try:
            public_key = parse_public_key(entry.public_key)
        except NoTrustedKey:
            raise TrustFileError(f"{path}: {entry.public_key!r} is not a public key") from None
        kid = release.key_id(public_key)
        if entry.key_id and entry.key_id != kid:
            raise TrustFileError(f"{path}: key id {entry.key_id} does not match its public key")
        keys[kid] = public_key
    if not keys:
        raise TrustFileError(f"the trust file {path} lists no keys")
    return keys


def add_to_trust_file(path: Path, public_key: bytes, note: str) -> None:
    existing: tuple[TrustedKey, ...] = ()
    if path.exists():
        load_trust_file(path)  # refuse to extend a damaged file
        existing = msgspec.json.decode(path.read_bytes(), type=TrustFile).keys
    kid = release.key_id(public_key)
    if any(release.key_id(bytes.fromhex(k.public_key)) == kid for k in existing):
        return
    entry = TrustedKey(public_key=public_key.hex(), key_id=kid, note=note)
    data = msgspec.json.format(msgspec.json.encode(TrustFile(keys=(*existing, entry))), indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data + b"\n", mode=0o644)


def _user_dir() -> Path:
    home = os.environ.get("COZY_HOME")
    return Path(home) if home else Path.home() / ".cozy"


def default_state_path() -> Path:
    return _user_dir() / STATE_NAME


def default_trust_path() -> Path:
    """The developer trust file: `build` records its development key here, and `verify` falls
    back to it when no key is pinned."""
    return _user_dir() / DEV_TRUST_NAME
