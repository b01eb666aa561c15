"""Signed release manifests (`RELEASE.json`, SO-8): the pure half.

What lives here: the manifest's types, its exact signed bytes, the signature check, the checks a
verifier makes against bytes and numbers it was handed (expiry, downgrade, artifact digests, the
lock digest), and pdm's lock-file content hash. What does not: reading files, running git or the
build backend, keeping state — that is `cozy/_release.py`.

The file is an envelope around an exact byte string, so nothing depends on re-encoding::

    {"signed": {…release body, canonical JSON…}, "key_id": "ed25519:…", "signature": "<hex>"}

`signature` is Ed25519 over ``SIGN_DOMAIN + signed``, where `signed` is the exact bytes of the
``signed`` member as they stand in the file (decoded as `msgspec.Raw`, verified, then decoded).
The writer produces them canonically (struct fields sorted by name, indented), but a verifier
never relies on that. `key_id` is a hint for choosing among trusted keys; the key inside a
manifest is never trusted on its own say-so (there is none: only the id travels).

Every failure is its own `ReleaseError` subclass whose message says what to do next; the
signature failure says nothing about *why* the signature failed.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec
from packaging.version import InvalidVersion, Version

from model import _crypto
from model.errors import DECODE_ERRORS, ModelError

if TYPE_CHECKING:
    from collections.abc import Mapping


FORMAT: Final = "cozy-release/1"
SIGN_DOMAIN: Final = b"cozy-release-manifest/v1\x00"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 and SHA-256 git object ids

AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


# --- errors ---------------------------------------------------------------------------------------


class ReleaseError(ModelError):
    """Base of every refusal to build or trust a release. The message says what to do next."""


class ManifestMalformed(ReleaseError):
    """RELEASE.json is not a cozy release manifest (bad JSON, wrong fields or values)."""


class UntrustedSigner(ReleaseError):
    """The manifest names a signing key that is not among the keys the verifier trusts."""


class BadReleaseSignature(ReleaseError):
    """The signature does not verify under the trusted key: the manifest was altered or forged."""


class ReleaseExpired(ReleaseError):
    """The manifest's validity period has ended (an old release replayed, or a stale mirror)."""


class ReleaseDowngrade(ReleaseError):
    """The release is older than the newest one this verifier already trusted."""


class LockHashMismatch(ReleaseError):
    """The pdm.lock at hand is not the lock the release was built from."""


class ArtifactMissing(ReleaseError):
    """An artifact the manifest lists is not next to RELEASE.json."""


class ArtifactSizeMismatch(ReleaseError):
    """An artifact's size differs from the manifest's."""


class ArtifactHashMismatch(ReleaseError):
    """An artifact's SHA-256 differs from the manifest's."""


def _version(text: str) -> Version | None:
    """`text` as a PEP 440 version, or None when it is not one."""
    try:
        return Version(text)
    except InvalidVersion:
        return None


# --- types ----------------------------------------------------------------------------------------


class ArtifactRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One built file: its path relative to RELEASE.json (POSIX separators), SHA-256 and size."""

    path: str
    sha256: str
    size: int


class ReleaseBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything the signature covers. New fields must get defaults (schema evolution)."""

    format: str
    project: str
    version: str
    source_commit: str
    source_date_epoch: int
    lock_sha256: str
    artifacts: tuple[ArtifactRecord, ...]
    created: AwareDatetime
    expires: AwareDatetime


class _Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    signed: msgspec.Raw
    key_id: str
    signature: str


class VerifiedRelease(msgspec.Struct, frozen=True):
    """A release body whose signature held under a trusted key. Only `open_release` makes one."""

    body: ReleaseBody
    key_id: str


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_body_decoder = msgspec.json.Decoder(ReleaseBody)


# --- keys and signing -----------------------------------------------------------------------------


def key_id(public_key: bytes) -> str:
    """A short, stable name for an Ed25519 public key: ``ed25519:`` + 16 bytes of its SHA-256."""
    if len(public_key) != _crypto.SIGN_PK_BYTES:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:32]


def public_key_of(seed: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte signing seed."""
    return bytes(_crypto.signing_key_from_seed(seed).verify_key)


def signed_bytes(body: ReleaseBody) -> bytes:
    """The canonical bytes of `body`: fields sorted by name, indented by two (then shifted two
    more so the member sits readably inside the envelope). Deterministic for a given body."""
    compact = msgspec.json.encode(body, order="sorted")
    return msgspec.json.format(compact, indent=2).replace(b"\n", b"\n  ")


def sign_release(body: ReleaseBody, seed: bytes) -> bytes:
    """The full RELEASE.json bytes for `body`, signed with the Ed25519 `seed`."""
    check_body(body)
    signed = signed_bytes(body)
    key = _crypto.signing_key_from_seed(seed)
    signature = _crypto.sign(key, SIGN_DOMAIN + signed)
    kid = key_id(bytes(key.verify_key))
    return (
        b'{\n  "signed": '
        + signed
        + b',\n  "key_id": '
        + msgspec.json.encode(kid)
        + b',\n  "signature": '
        + msgspec.json.encode(signature.hex())
        + b"\n}\n"
    )


def peek_key_id(manifest: bytes) -> str:
    """The (unverified) key id a manifest names, for telling a user which key to pin."""
    return _decode_envelope(manifest).key_id


def open_release(manifest: bytes, trusted_keys: Mapping[str, bytes]) -> VerifiedRelease:
    """Verify `manifest` against `trusted_keys` (key id -> 32-byte public key) and decode it.

    Raises `ManifestMalformed`, `UntrustedSigner` (no trusted key has the manifest's id) or
    `BadReleaseSignature`. Nothing about the body is looked at before the signature holds.
    """
    envelope = _decode_envelope(manifest)
    public_key = trusted_keys.get(envelope.key_id)
    if public_key is None:
        trusted = ", ".join(sorted(trusted_keys)) or "none"
        raise UntrustedSigner(
            f"RELEASE.json is signed by {envelope.key_id}, which is not a key you trust "
            f"(trusted: {trusted}); get the release key from the release announcement and pass "
            "it with --pubkey HEX or --trust-file PATH"
        )
    try:
        signature = bytes.fromhex(envelope.signature)
    except ValueError:
        signature = b""
    if not _crypto.verify(public_key, SIGN_DOMAIN + bytes(envelope.signed), signature):
        raise BadReleaseSignature(
            f"the signature of RELEASE.json does not verify under the trusted key "
            f"{envelope.key_id}: the manifest was altered or forged; do not install this release"
        )
    try:
        body = _body_decoder.decode(envelope.signed)
    except (*DECODE_ERRORS, msgspec.ValidationError) as exc:
        raise ManifestMalformed(f"the signed release body does not decode ({exc})") from None
    check_body(body)
    return VerifiedRelease(body=body, key_id=envelope.key_id)


def _decode_envelope(manifest: bytes) -> _Envelope:
    try:
        return _envelope_decoder.decode(manifest)
    except (*DECODE_ERRORS, msgspec.ValidationError) as exc:
        raise ManifestMalformed(
            f"this is not a cozy release manifest ({exc}); pass the RELEASE.json that "
            "`cozy release build` wrote"
        ) from None


def check_body(body: ReleaseBody) -> None:
    """Field-level rules every manifest obeys (raises `ManifestMalformed`)."""
    problems: list[str] = []
    if body.format != FORMAT:
        problems.append(f"format is {body.format!r}, this cozy reads {FORMAT!r}")
    if _version(body.version) is None:
        problems.append(f"version {body.version!r} is not a PEP 440 version")
    if not _COMMIT.fullmatch(body.source_commit):
        problems.append("source_commit is not a git commit id")
    if not _HEX64.fullmatch(body.lock_sha256):
        problems.append("lock_sha256 is not a hex SHA-256")
    if not body.artifacts:
        problems.append("no artifacts are listed")
    seen: set[str] = set()
    for artifact in body.artifacts:
        if not safe_relative_path(artifact.path):
            problems.append(f"artifact path {artifact.path!r} is not a plain relative path")
        if artifact.path in seen:
            problems.append(f"artifact {artifact.path!r} is listed twice")
        seen.add(artifact.path)
        if not _HEX64.fullmatch(artifact.sha256):
            problems.append(f"artifact {artifact.path!r} has no hex SHA-256")
        if artifact.size < 0:
            problems.append(f"artifact {artifact.path!r} has a negative size")
    if body.expires <= body.created:
        problems.append("expires is not after created")
    if problems:
        raise ManifestMalformed("RELEASE.json is malformed: " + "; ".join(problems))


def safe_relative_path(path: str) -> bool:
    """True for a non-empty POSIX path that stays below its base (no `..`, not absolute)."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return False
    parts = path.split("/")
    return all(part not in ("", ".", "..") for part in parts)


# --- the checks a verifier makes ------------------------------------------------------------------


def utc_text(moment: datetime) -> str:
    """`moment` as an RFC 3339 UTC timestamp to the second, as the manifest writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_not_expired(body: ReleaseBody, now: datetime) -> None:
    """Raises `ReleaseExpired` once `now` is at or past `body.expires`."""
    if now >= body.expires:
        raise ReleaseExpired(
            f"release {body.version} expired at {utc_text(body.expires)} (it is now "
            f"{utc_text(now)}); fetch the current release, or ask the "
            "release manager to re-sign this one"
        )


def check_not_downgrade(body: ReleaseBody, highest_trusted: str | None) -> None:
    """Raises `ReleaseDowngrade` when `body.version` is older than `highest_trusted`.

    The same version again is fine (re-verifying, reinstalling); only going backwards is refused.
    """
    if highest_trusted is None:
        return
    if _parsed(body.version) < _parsed(highest_trusted):
        raise ReleaseDowngrade(
            f"release {body.version} is older than {highest_trusted}, which this machine already "
            "trusted: refusing a downgrade (an attacker may be replaying an old, vulnerable "
            "release); if the rollback is intended, pass a fresh --state file"
        )


def _parsed(text: str) -> Version:
    version = _version(text)
    if version is None:
        raise ManifestMalformed(f"{text!r} is not a PEP 440 version")
    return version


def newer_version(a: str, b: str | None) -> str:
    """The higher of two PEP 440 versions (`b` may be absent)."""
    if b is None or _parsed(a) > _parsed(b):
        return a
    return b


def check_artifact_size(artifact: ArtifactRecord, size: int) -> None:
    """Compare one file's measured size with the manifest's record (before hashing it)."""
    if size != artifact.size:
        raise ArtifactSizeMismatch(
            f"{artifact.path} is {size} bytes, the release says {artifact.size}: the file is "
            "truncated or replaced; download it again from the release"
        )


def check_artifact_digest(artifact: ArtifactRecord, sha256_hex: str) -> None:
    """Compare one file's measured SHA-256 with the manifest's record."""
    if not _crypto.constant_time_equal(sha256_hex.encode(), artifact.sha256.encode()):
        raise ArtifactHashMismatch(
            f"{artifact.path} has SHA-256 {sha256_hex}, the release says {artifact.sha256}: the "
            "file was altered; do not install it, download it again from the release"
        )


def check_lock(body: ReleaseBody, lock_sha256_hex: str, lock_name: str) -> None:
    """Compare the SHA-256 of the pdm.lock at hand with the lock the release was built from."""
    if lock_sha256_hex != body.lock_sha256:
        raise LockHashMismatch(
            f"{lock_name} has SHA-256 {lock_sha256_hex}, but release {body.version} was built "
            f"from a pdm.lock with SHA-256 {body.lock_sha256}: check out commit "
            f"{body.source_commit} (or pass its pdm.lock with --lock PATH)"
        )


# --- pdm's lock freshness hash --------------------------------------------------------------------


def _normalize_group(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).lower()


def pdm_content_hash(pyproject: Mapping[str, Any]) -> str:
    """The `content_hash` pdm records in pdm.lock for this parsed pyproject.toml (hex SHA-256).

    A replica of pdm 2.29's `PyProject.content_hash` for a project that is not a workspace: the
    SHA-256 of ``json.dumps(..., sort_keys=True)`` over the fields that decide the lock (sources,
    dependencies, dependency groups and the legacy dev-dependencies, optional dependencies,
    requires-python, resolution settings). Raises `ValueError` for a pdm workspace, whose hash
    also covers its members (not replicated: use pdm itself there).
    """
    settings = pyproject.get("tool", {}).get("pdm", {})
    if "workspace" in settings:
        raise ValueError("pdm workspaces hash their members too; check with `pdm lock --check`")
    metadata = pyproject.get("project", {})
    groups: dict[str, list[Any]] = {}
    for group, deps in pyproject.get("dependency-groups", {}).items():
        name = _normalize_group(group)
        if name in groups:
            raise ValueError(f"dependency group {name} is listed twice in pyproject.toml")
        groups[name] = list(deps)
    for group, deps in settings.get("dev-dependencies", {}).items():
        groups.setdefault(_normalize_group(group), []).extend(deps)
    dump = {
        "sources": settings.get("source", []),
        "dependencies": metadata.get("dependencies", []),
        "dev-dependencies": groups,
        "optional-dependencies": metadata.get("optional-dependencies", {}),
        "requires-python": metadata.get("requires-python", ""),
        "resolution": settings.get("resolution", {}),
    }
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode("utf-8")).hexdigest()
