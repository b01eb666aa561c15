"""Client state in COZY_HOME: the profile, the sealed keystore and the verified heads.

Files are written atomically (`localfs.atomic_write`: temp file, fsync, rename) with mode 0600, so a crash never leaves
a half-written keystore and a verified head never moves backwards on disk.

    COZY_HOME/profile.json    relay URL, handle, account id, pinned relay key, session token
    COZY_HOME/keystore.bin    sealed keystore (Argon2id-wrapped; see model/keystore.py)
    COZY_HOME/state.db        last verified (seq, chain) per collab, receipts (SQLite, WAL)
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Final

import msgspec

from clientkit._state import ClientState
from localfs import atomic_write
from model import keystore
from model._crypto import CryptoError

KDF_PROFILE_ENV: Final = "COZY_KDF_PROFILE"


class HomeError(Exception):
    """COZY_HOME is missing, unwritable or damaged; the message says what to do."""


class Profile(msgspec.Struct):
    relay_url: str
    handle: str
    account_id: str
    relay_pk: str  # hex, pinned on first contact
    token: str | None = None
    token_expires_at: int = 0
    keystore_version: int = 0  # the version last stored on the relay
    keystore_synced: bool = True  # False while local keystore changes await upload
    # This device's sending stream: its events in each collab are chained under this id (SO-4).
    device: str = msgspec.field(default_factory=lambda: secrets.token_hex(8))

    def __repr__(self) -> str:
        return f"Profile(handle={self.handle!r}, relay={self.relay_url!r}, token=<redacted>)"


class Home:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_env(cls) -> Home:
        raw = os.environ.get("COZY_HOME")
        return cls(Path(raw) if raw else Path.home() / ".cozy")

    # --- profile --------------------------------------------------------------------------------

    def load_profile(self) -> Profile:
        try:
            return msgspec.json.decode((self.path / "profile.json").read_bytes(), type=Profile)
        except FileNotFoundError:
            raise HomeError(
                f"no account in {self.path}: run `cozy account signup --relay URL --handle H` "
                "(or `cozy account restore` on a new device)"
            ) from None
        except OSError as exc:
            raise HomeError(
                f"cannot read {self.path / 'profile.json'}: {exc.strerror}; check COZY_HOME"
            ) from None
        except msgspec.DecodeError:
            raise HomeError(
                f"{self.path / 'profile.json'} is damaged: move COZY_HOME away, then run"
                " `cozy account restore --relay URL --handle H` into an empty one"
            ) from None

    def save_profile(self, profile: Profile) -> None:
        self._write("profile.json", msgspec.json.encode(profile))

    # --- keystore -------------------------------------------------------------------------------

    def has_keystore(self) -> bool:
        return (self.path / "keystore.bin").exists()

    def load_keystore(self) -> keystore.SealedKeystore:
        path = self.path / "keystore.bin"
        try:
            return keystore.decode_sealed(path.read_bytes())
        except FileNotFoundError:
            raise HomeError(f"no keystore in {self.path}: sign up or restore first") from None
        except OSError as exc:
            raise HomeError(f"cannot read {path}: {exc.strerror}; check COZY_HOME") from None
        except CryptoError:
            raise HomeError(
                f"{path} is damaged: move it away, then run `cozy account restore --relay URL"
                " --handle H` into an empty COZY_HOME (the relay keeps your keystore sealed)"
            ) from None

    def save_keystore(self, sealed: keystore.SealedKeystore) -> None:
        self._write("keystore.bin", keystore.encode_sealed(sealed))

    # --- verified state ---------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """Verified heads and the relay's receipts (SQLite, crash-safe): see clientkit/_state.py."""
        return ClientState(self.path / "state.db")

    # --- plumbing -------------------------------------------------------------------------------

    def _write(self, name: str, data: bytes) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(self.path / name, data, mode=0o600)
        except OSError as exc:
            raise HomeError(
                f"cannot write {self.path / name}: {exc.strerror}; check COZY_HOME"
            ) from None


def kdf_profile() -> keystore.KdfProfile:
    """MODERATE unless COZY_KDF_PROFILE=insecure-test (documented: only for test suites)."""
    if os.environ.get(KDF_PROFILE_ENV) == "insecure-test":
        print(
            "warning: COZY_KDF_PROFILE=insecure-test seals with a test-only Argon2id profile "
            "that offline guessing breaks easily; never use it for a real account",
            file=sys.stderr,
        )
        return keystore.KdfProfile.INSECURE_TEST
    return keystore.KdfProfile.MODERATE
