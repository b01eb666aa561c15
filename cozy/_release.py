"""`cozy release keygen|build|verify` (SO-8): the I/O half of signed releases.

`build` refuses a dirty git tree or a pdm.lock that does not match pyproject.toml, exports the
commit (`git archive HEAD`, so the artifacts are exactly the named commit and nothing else in the
working tree), builds the sdist and wheel there with pdm-backend's PEP 517 hooks in a child
Python (SOURCE_DATE_EPOCH = the commit time, so the bytes are reproducible), and writes a signed
`RELEASE.json` (format and signature: `model/release.py`, ADR-0013).

`verify` trusts only a key given to it (`--pubkey`, `--trust-file`, or the developer's local trust
file that `build` writes beside a development key it generates) — never the id the manifest
names — then checks the signature, expiry, downgrade against the highest version verified before
(the state file), every artifact's size and SHA-256, and the pdm.lock's SHA-256.

Secrets: the signing seed is read from a 0600 file and is never printed, logged or put in an
error message.
"""

from __future__ import annotations

import hashlib
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

import msgspec

from localfs import atomic_write
from model import release
from model.release import ReleaseError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Mapping

DEV_DIR: Final = Path(".cozy/release")
DEV_KEY_NAME: Final = "release-key"
# The developer trust file lives with the user's release state, never in a checkout or a
# download: a directory someone hands you could otherwise bring its own "trusted" keys.
DEV_TRUST_NAME: Final = "release-trusted.json"
KEY_ENV: Final = "COZY_RELEASE_KEY_FILE"
PDM_ENV: Final = "COZY_PDM"
STATE_NAME: Final = "release-state.json"
_SEED_BYTES: Final = 32
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


def _sha256_file(path: Path) -> str:
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
        lock_sha256 = _sha256_file(source / "pdm.lock")
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
                    sha256=_sha256_file(target),
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


# --- verify ---------------------------------------------------------------------------------------


def _user_dir() -> Path:
    home = os.environ.get("COZY_HOME")
    return Path(home) if home else Path.home() / ".cozy"


def default_state_path() -> Path:
    return _user_dir() / STATE_NAME


def default_trust_path() -> Path:
    """The developer trust file: `build` records its development key here, and `verify` falls
    back to it when no key is pinned."""
    return _user_dir() / DEV_TRUST_NAME


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
        release.check_artifact_digest(artifact, _sha256_file(path))
    try:
        lock_sha256 = _sha256_file(lock_path)
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


# --- CLI ------------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Dispatch `cozy release …`. 0 success; 1 refused to build or could not check; 2 the
    release does not verify."""
    try:
        if args.release_action == "keygen":
            return _keygen(args)
        if args.release_action == "build":
            return _build(args)
        return _verify(args)
    except ReleaseSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BuildRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except ReleaseError as exc:
        print(f"REJECTED ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 2


def _keygen(args: argparse.Namespace) -> int:
    public_key = write_new_key(args.out)
    if args.trust_file is not None:
        add_to_trust_file(args.trust_file, public_key, note=f"key {args.out}")
    print(f"wrote a new release signing key to {args.out} (mode 0600; keep it offline)")
    print(f"public key: {public_key.hex()}")
    print(f"key id:     {release.key_id(public_key)}")
    print("publish the public key with your releases; verifiers pin it with --pubkey")
    return 0


def _build(args: argparse.Namespace) -> int:
    result = build_release(
        workdir=Path.cwd(),
        out_dir=args.out,
        manifest_path=args.manifest,
        key_file=args.key,
        valid_days=args.valid_days,
        pdm=args.pdm,
        now=datetime.now(UTC),
        warn=_warn,
    )
    body = result.body
    print(f"built {body.project} {body.version} from commit {body.source_commit}")
    for artifact in body.artifacts:
        print(f"  {artifact.path}  {artifact.size} bytes  sha256 {artifact.sha256}")
    print(f"  pdm.lock sha256 {body.lock_sha256} ({result.lock_note})")
    print(
        f"wrote {os.path.relpath(result.manifest)} signed by {result.key_id}, "
        f"valid until {release.utc_text(body.expires)}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    verified = verify_release(
        manifest_path=args.manifest,
        pubkey=args.pubkey,
        trust_file=args.trust_file,
        lock_path=args.lock,
        state_path=args.state or default_state_path(),
        now=datetime.now(UTC),
        warn=_warn,
    )
    body = verified.body
    print(
        f"OK: {body.project} {body.version} from commit {body.source_commit}, signed by "
        f"{verified.key_id}, valid until {release.utc_text(body.expires)}"
    )
    for artifact in body.artifacts:
        print(f"  {artifact.path}  {artifact.size} bytes  sha256 ok")
    print(f"  {args.lock}  matches the release's pdm.lock")
    return 0
