"""`cozy release build`: a signed release from a clean git commit, reproducibly.

Refuses a dirty git tree or a pdm.lock that does not match pyproject.toml, exports the commit
(`git archive HEAD`, so the artifacts are exactly the named commit and nothing else in the
working tree), builds the sdist and wheel there with pdm-backend's PEP 517 hooks in a child
Python (SOURCE_DATE_EPOCH = the commit time, so the bytes are reproducible), and writes a signed
`RELEASE.json` (format and signature: `model/release.py`, ADR-0013).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cozy._release._files import (
    DEV_DIR,
    DEV_KEY_NAME,
    KEY_ENV,
    BuildFailed,
    BuildRefused,
    DirtyWorkingTree,
    LockOutOfDate,
    NotAGitCheckout,
    add_to_trust_file,
    default_trust_path,
    read_key,
    sha256_file,
    write_new_key,
)
from localfs import atomic_write
from model import release

if TYPE_CHECKING:
    from collections.abc import Callable

PDM_ENV: Final = "COZY_PDM"
_GIT_TIMEOUT: Final = 60
_BUILD_TIMEOUT: Final = 600

# The child that runs the PEP 517 hooks. `-I` keeps the export's own directories (and any
# PYTHONPATH) off sys.path, so the backend is the venv's pdm-backend and nothing else.
_BUILD_SCRIPT: Final = (
    "import sys\n"
    "import pdm.backend as backend\n"
    "backend.build_sdist(sys.argv[1])\n"
    "backend.build_wheel(sys.argv[1])\n"
)


# --- git and pdm ----------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> bytes:
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            ["git", "-C", str(root), *args],  # noqa: S607 - git from PATH, like a developer's
            capture_output=True,
            check=False,
            timeout=_GIT_TIMEOUT,
        )
    except FileNotFoundError:
        raise NotAGitCheckout(
            "git is not installed; releases are built from a git checkout"
        ) from None
    if result.returncode != 0:
        raise NotAGitCheckout(
            f"`git {' '.join(args)}` failed in {root}: "
            f"{result.stderr.decode(errors='replace').strip()}; run `cozy release build` inside "
            "the project's git checkout, on a commit"
        )
    return result.stdout


def _check_clean(root: Path) -> None:
    status = _git(root, "status", "--porcelain=v1", "--untracked-files=normal")
    lines = status.decode(errors="replace").splitlines()
    if lines:
        shown = "\n  ".join(lines[:10]) + ("\n  …" if len(lines) > 10 else "")
        raise DirtyWorkingTree(
            "the working tree has changes that are not committed, so no commit names what "
            f"would be released:\n  {shown}\ncommit or remove them (a release must be built from "
            "exactly one commit), then build again"
        )


def find_pdm(root: Path, explicit: Path | None) -> Path | None:
    """--pdm, then $COZY_PDM, then the project-local .tools/pdm (the Makefile's), then PATH."""
    if explicit is not None:
        return explicit
    if env := os.environ.get(PDM_ENV):
        return Path(env)
    local = root / ".tools" / "pdm" / "bin" / "pdm"
    if local.exists():
        return local
    found = shutil.which("pdm")
    return Path(found) if found else None


def check_lock(source: Path, pdm: Path | None) -> str:
    """Refuse unless `source`'s pdm.lock matches its pyproject.toml; return a note on how checked.

    Two checks, both must pass: the lock's recorded `content_hash` against the hash recomputed
    as pdm computes it (pure, always run), and `pdm lock --check` when a pdm is found (it also
    judges lock-format compatibility, which the recomputation does not).
    """
    try:
        pyproject = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))
        lock = tomllib.loads((source / "pdm.lock").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LockOutOfDate(
            f"{Path(exc.filename).name} is not committed; run `pdm lock` and commit pdm.lock"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LockOutOfDate(f"cannot parse pyproject.toml or pdm.lock: {exc}") from None
    recorded = str(lock.get("metadata", {}).get("content_hash", ""))
    algo, _, recorded_hex = recorded.partition(":")
    try:
        expected = release.pdm_content_hash(pyproject)
    except ValueError as exc:
        raise LockOutOfDate(str(exc)) from None
    if algo != "sha256" or recorded_hex != expected:
        raise LockOutOfDate(
            "pdm.lock does not match pyproject.toml (its content_hash is "
            f"{recorded or 'missing'}, pyproject.toml hashes to sha256:{expected}): the "
            "dependencies changed without relocking; run `pdm lock`, commit pdm.lock, and build "
            "again"
        )
    if pdm is None:
        return (
            "pdm not found (set COZY_PDM or pass --pdm); the lock was checked by its "
            "content_hash only"
        )
    env = {**os.environ, "PDM_CHECK_UPDATE": "false", "PDM_NON_INTERACTIVE": "1"}
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv
            [str(pdm), "lock", "--check", "--project", str(source)],
            cwd=source,
            env=env,
            capture_output=True,
            check=False,
            timeout=_GIT_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LockOutOfDate(
            f"could not run {pdm} lock --check ({exc}); fix pdm or point --pdm at a working one"
        ) from None
    if result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip()
        raise LockOutOfDate(
            f"`pdm lock --check` says pdm.lock is out of date ({said}); run `pdm lock`, commit "
            "pdm.lock, and build again"
        )
    return f"`{pdm} lock --check` passed and the content_hash matches"


# --- build ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    body: release.ReleaseBody
    manifest: Path
    key_id: str
    lock_note: str


def _export_head(root: Path, dest: Path) -> None:
    archive = _git(root, "archive", "--format=tar", "HEAD")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")


def _fix_gzip_mtime(path: Path, epoch: int) -> None:
    """Python's tarfile stamps the gzip header with the current time even when every member has
    SOURCE_DATE_EPOCH; set the header's MTIME field (bytes 4..8, RFC 1952) to the epoch so two
    builds of one commit are byte-identical. The gzip CRC covers the data only."""
    with path.open("r+b") as f:
        header = f.read(10)
        if len(header) < 10 or header[:3] != b"\x1f\x8b\x08":
            raise BuildFailed(f"{path.name} is not a gzip file")
        f.seek(4)
        f.write(epoch.to_bytes(4, "little"))


def _run_backend(source: Path, out: Path, epoch: int) -> list[Path]:
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv
            [sys.executable, "-I", "-c", _BUILD_SCRIPT, str(out)],
            cwd=source,
            env=env,
            capture_output=True,
            check=False,
            timeout=_BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise BuildFailed(f"the build took longer than {_BUILD_TIMEOUT} s") from None
    if result.returncode != 0:
        tail = "\n".join(result.stderr.decode(errors="replace").strip().splitlines()[-8:])
        hint = (
            "install the dev dependencies (`make install`)"
            if b"No module named 'pdm'" in result.stderr
            else "fix the build and try again"
        )
        raise BuildFailed(f"pdm-backend failed:\n{tail}\n{hint}")
    built = sorted(out.iterdir())
    if sorted(p.suffix for p in built) != [".gz", ".whl"]:
        names = ", ".join(p.name for p in built) or "nothing"
        raise BuildFailed(f"expected one sdist and one wheel, the backend produced {names}")
    return built


def build_release(
    *,
    workdir: Path,
    out_dir: Path,
    manifest_path: Path,
    key_file: Path | None,
    valid_days: int,
    pdm: Path | None,
    now: datetime,
    warn: Callable[[str], None],
) -> BuildResult:
    """Build and sign a release of the git checkout containing `workdir`. See the module doc.

    Raises a `BuildRefused` subclass (nothing written) or a `ReleaseSetupError` (key problems).
    """
    if valid_days < 1:
        raise BuildRefused("--valid-days must be at least 1")
    out_dir = out_dir.absolute()
    manifest_path = manifest_path.absolute()
    rel_out = Path(os.path.relpath(out_dir, manifest_path.parent))
    if rel_out.parts[:1] == ("..",) or rel_out.is_absolute():
        raise BuildRefused(
            f"--out {out_dir} is not inside {manifest_path.parent}; RELEASE.json names its "
            "artifacts relative to itself, so put them in or below its directory"
        )
    root = Path(_git(workdir, "rev-parse", "--show-toplevel").decode().strip())
    _check_clean(root)
    commit = _git(root, "rev-parse", "HEAD").decode().strip()
    epoch = int(_git(root, "log", "-1", "--format=%ct", "HEAD").decode().strip())

    seed = _release_seed(root, key_file, warn)
    public_key = release.public_key_of(seed)

    with tempfile.TemporaryDirectory(prefix="cozy-release-") as tmp:
        source = Path(tmp) / "source"
        _export_head(root, source)
        lock_note = check_lock(source, find_pdm(root, pdm))
        pyproject = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))
        project = pyproject.get("project", {})
        if not isinstance(project.get("version"), str) or "version" in project.get("dynamic", []):
            raise BuildRefused("pyproject.toml must set a static [project] version")
        lock_sha256 = sha256_file(source / "pdm.lock")
        built_dir = Path(tmp) / "out"
        built_dir.mkdir()
        built = _run_backend(source, built_dir, epoch)
        out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for path in built:
            if path.suffix == ".gz":
                _fix_gzip_mtime(path, epoch)
            target = out_dir / path.name
            atomic_write(target, path.read_bytes(), mode=0o644)
            records.append(
                release.ArtifactRecord(
                    path=(rel_out / path.name).as_posix(),
                    sha256=sha256_file(target),
                    size=target.stat().st_size,
                )
            )

    created = now.astimezone(UTC).replace(microsecond=0)
    body = release.ReleaseBody(
        format=release.FORMAT,
        project=str(project.get("name", "")),
        version=project["version"],
        source_commit=commit,
        source_date_epoch=epoch,
        lock_sha256=lock_sha256,
        artifacts=tuple(records),
        created=created,
        expires=created + timedelta(days=valid_days),
    )
    atomic_write(manifest_path, release.sign_release(body, seed), mode=0o644)
    return BuildResult(
        body=body, manifest=manifest_path, key_id=release.key_id(public_key), lock_note=lock_note
    )


def _release_seed(root: Path, key_file: Path | None, warn: Callable[[str], None]) -> bytes:
    """--key, then $COZY_RELEASE_KEY_FILE, then the developer key under .cozy/release/ (created
    on first use, with its public key recorded in the local trust file, loudly)."""
    if key_file is None and (env := os.environ.get(KEY_ENV)):
        key_file = Path(env)
    if key_file is not None:
        return read_key(key_file)
    dev_key = root / DEV_DIR / DEV_KEY_NAME
    trust = default_trust_path()
    if dev_key.exists():
        warn(f"signing with the DEVELOPMENT release key {dev_key} (pass --key for a real release)")
        seed = read_key(dev_key)
        add_to_trust_file(trust, release.public_key_of(seed), note=f"development key {dev_key}")
        return seed
    public_key = write_new_key(dev_key)
    add_to_trust_file(trust, public_key, note=f"development key {dev_key}")
    warn(
        "\n".join(
            [
                "=" * 78,
                "WARNING: no release key given (--key or COZY_RELEASE_KEY_FILE), so a NEW",
                f"DEVELOPMENT key was created at {dev_key} (mode 0600).",
                f"  public key: {public_key.hex()}",
                f"  key id:     {release.key_id(public_key)}",
                f"It is recorded as trusted in {trust} so that `cozy release verify`",
                "works on this machine. It is NOT a release key anyone else trusts: production",
                "releases are signed with --key (a key kept offline, made by `cozy release",
                "keygen`) and verified with that key pinned (--pubkey or --trust-file).",
                "=" * 78,
            ]
        )
    )
    return read_key(dev_key)
