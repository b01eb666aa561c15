"""`cozy release verify`: check a release against a key the verifier chose.

Trusts only a key given to it (`--pubkey`, `--trust-file`, or the developer's local trust file
that `build` writes beside a development key it generates) — never the id the manifest names —
then checks the signature, expiry, downgrade against the highest version verified before (the
state file), every artifact's size and SHA-256, and the pdm.lock's SHA-256.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from cozy._release._files import (
    LockFileMissing,
    NoTrustedKey,
    ProjectState,
    StateFile,
    StateFileError,
    default_trust_path,
    load_trust_file,
    parse_public_key,
    sha256_file,
)
from localfs import atomic_write
from model import release

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path


def _trusted_keys(
    manifest: bytes, pubkey: str | None, trust_file: Path | None, warn: Callable[[str], None]
) -> Mapping[str, bytes]:
    if pubkey is not None:
        public_key = parse_public_key(pubkey)
        return {release.key_id(public_key): public_key}
    if trust_file is not None:
        return load_trust_file(trust_file)
    local = default_trust_path()
    if local.exists():
        warn(
            f"trusting the keys in {local}, this user's developer trust file; "
            "production verifiers pin the release key with --pubkey or --trust-file"
        )
        return load_trust_file(local)
    raise NoTrustedKey(
        "no trusted release key: on first use pass the release's public key with --pubkey HEX "
        "(from the release announcement, never from RELEASE.json itself) or a --trust-file; "
        f"this RELEASE.json names key id {release.peek_key_id(manifest)}"
    )


def _load_state(path: Path) -> StateFile:
    try:
        return msgspec.json.decode(path.read_bytes(), type=StateFile)
    except FileNotFoundError:
        return StateFile()
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Never start over silently: an empty state would let an old release back in.
        raise StateFileError(
            f"cannot read the release state {path} ({exc}); repair or remove it deliberately "
            "(removing it forgets which versions were trusted)"
        ) from None


def verify_release(
    *,
    manifest_path: Path,
    pubkey: str | None,
    trust_file: Path | None,
    lock_path: Path,
    state_path: Path,
    now: datetime,
    warn: Callable[[str], None],
) -> release.VerifiedRelease:
    """Every check `cozy release verify` makes, in order; the first failure raises.

    On success the state file records the version if it is the highest seen for the project.
    """
    try:
        manifest = manifest_path.read_bytes()
    except OSError as exc:
        raise release.ManifestMalformed(f"cannot read {manifest_path}: {exc.strerror}") from None
    trusted = _trusted_keys(manifest, pubkey, trust_file, warn)
    verified = release.open_release(manifest, trusted)
    body = verified.body
    release.check_not_expired(body, now)
    state = _load_state(state_path)
    previous = state.projects.get(body.project)
    release.check_not_downgrade(body, previous.highest_version if previous else None)
    base = manifest_path.absolute().parent
    for artifact in body.artifacts:
        path = base / artifact.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise release.ArtifactMissing(
                f"{artifact.path} is listed in {manifest_path.name} but not found next to it "
                f"({path}); download every artifact of release {body.version}"
            ) from None
        release.check_artifact_size(artifact, size)
        release.check_artifact_digest(artifact, sha256_file(path))
    try:
        lock_sha256 = sha256_file(lock_path)
    except FileNotFoundError:
        raise LockFileMissing(
            f"no pdm.lock at {lock_path}: pass --lock PATH to the pdm.lock you install with "
            f"(release {body.version} was built from commit {body.source_commit})"
        ) from None
    release.check_lock(body, lock_sha256, str(lock_path))

    highest = release.newer_version(body.version, previous.highest_version if previous else None)
    if previous is None or highest != previous.highest_version:
        entry = ProjectState(
            highest_version=body.version,
            source_commit=body.source_commit,
            verified_at=now.astimezone(UTC).replace(microsecond=0),
        )
        new_state = StateFile(projects={**state.projects, body.project: entry})
        try:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(state_path, msgspec.json.encode(new_state, order="sorted"), mode=0o600)
        except OSError as exc:
            raise StateFileError(
                f"release {body.version} verified, but the state file {state_path} could not be "
                f"written ({exc.strerror}); pass a writable --state PATH"
            ) from None
    return verified
