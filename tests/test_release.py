"""Signed releases (SO-8): `cozy release build` and `cozy release verify`, for real.

One build per session, from a fresh clone of this repository's HEAD (the working tree may hold
other people's uncommitted edits), by the exact command line the issue names. Every tamper test
copies that release into its own directory and changes one thing: an artifact's bytes or size,
a signed field, the signature, the signer, the expiry, the lock, the version order, a missing
file. Build refusals (stale lock, dirty tree) run the real command in their own clones.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
import trio

from cozy import _release
from model import release

pytestmark = pytest.mark.objective("SO-8")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PDM = REPO / ".tools" / "pdm" / "bin" / "pdm"
WHEEL = "dist/cozylabs_relay-0.1.0-py3-none-any.whl"
SDIST = "dist/cozylabs_relay-0.1.0.tar.gz"
GIT_ID = ["-c", "user.name=Release Test", "-c", "user.email=release@test.invalid"]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["COZY_HOME"] = str(home)
    env.pop(_release.KEY_ENV, None)
    if PDM.exists():  # `make install` puts it there; the clone has no .tools of its own
        env[_release.PDM_ENV] = str(PDM)
    return env


def _clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True, timeout=120)
    return dest


@dataclass(frozen=True)
class Built:
    src: Path  # the clone the release was built in
    home: Path
    env: dict[str, str]
    public_key: str  # hex, from the developer trust file the build wrote
    seed: bytes
    build_out: str
    build_err: str


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """`cozy release build && cozy release verify RELEASE.json`, exactly, in a clean clone."""
    base = tmp_path_factory.mktemp("release")
    src = _clone(base / "src")
    home = base / "home"
    env = _env(home)
    result = subprocess.run(
        ["bash", "-c", "cozy release build && cozy release verify RELEASE.json"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    trust = msgspec.json.decode((home / _release.DEV_TRUST_NAME).read_bytes())
    seed = _release.read_key(src / ".cozy/release/release-key")
    return Built(
        src=src,
        home=home,
        env=env,
        public_key=trust["keys"][0]["public_key"],
        seed=seed,
        build_out=result.stdout,
        build_err=result.stderr,
    )


def _copy_release(built: Built, dest: Path) -> Path:
    """RELEASE.json, dist/ and the pdm.lock of the built commit, in a directory of their own."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(built.src / "RELEASE.json", dest / "RELEASE.json")
    shutil.copytree(built.src / "dist", dest / "dist")
    shutil.copy(built.src / "pdm.lock", dest / "pdm.lock")
    return dest / "RELEASE.json"


async def _verify(
    built: Built,
    manifest: Path,
    *,
    state: Path,
    pubkey: str | None = None,
    lock: Path | None = None,
    now: datetime | None = None,
) -> release.VerifiedRelease:
    """The verifier `cozy release verify` runs, in a worker thread, pinned to the release key."""
    call = functools.partial(
        _release.verify_release,
        manifest_path=manifest,
        pubkey=pubkey or built.public_key,
        trust_file=None,
        lock_path=lock or manifest.parent / "pdm.lock",
        state_path=state,
        now=now or datetime.now(UTC),
        warn=lambda _message: None,
    )
    return await trio.to_thread.run_sync(call)


def _body(manifest: Path) -> release.ReleaseBody:
    raw = msgspec.json.decode(manifest.read_bytes(), type=release._Envelope).signed
    return msgspec.json.decode(raw, type=release.ReleaseBody)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def _cozy(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [str(BIN / "cozy"), *args],
        cwd=cwd,
        env=env,
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


# --- the "done when" line -----------------------------------------------------------------


async def test_build_then_verify_passes_and_one_flipped_byte_fails(
    built: Built, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        assert "OK: cozylabs-relay 0.1.0" in built.build_out
        assert WHEEL in built.build_out
        assert SDIST in built.build_out
        manifest = _copy_release(built, tmp_path / "r")
        _flip_byte(manifest.parent / WHEEL, 4096)
        result = await _cozy(
            "release", "verify", "RELEASE.json", "--pubkey", built.public_key,
            cwd=manifest.parent, env=_env(tmp_path / "home"),
        )  # fmt: skip
        assert result.returncode == 2
        assert b"ArtifactHashMismatch" in result.stderr
        assert WHEEL.encode() in result.stderr
        assert b"do not install it" in result.stderr


async def test_the_manifest_names_the_commit_the_lock_and_every_artifact(built: Built) -> None:
    with trio.fail_after(30):
        body = _body(built.src / "RELEASE.json")
        git = await trio.run_process(
            ["git", "-C", str(built.src), "rev-parse", "HEAD"], capture_stdout=True
        )
        head = git.stdout.decode().strip()
        assert body.source_commit == head
        assert body.version == "0.1.0"
        lock = (built.src / "pdm.lock").read_bytes()
        assert body.lock_sha256 == hashlib.sha256(lock).hexdigest()
        assert [a.path for a in body.artifacts] == [WHEEL, SDIST]
        for artifact in body.artifacts:
            path = built.src / artifact.path
            assert artifact.size == path.stat().st_size
            assert artifact.sha256 == _release.sha256_file(path)
        assert body.expires - body.created == timedelta(days=90)
        if PDM.exists():  # pdm's own judgement ran too, not only the recomputed content_hash
            assert "lock --check` passed" in built.build_out


def test_the_development_key_is_announced_loudly_and_its_seed_never_printed(
    built: Built,
) -> None:
    assert "WARNING" in built.build_err
    assert "DEVELOPMENT key was created" in built.build_err
    assert built.public_key in built.build_err
    key_file = built.src / ".cozy/release/release-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    seed_hex = built.seed.hex()
    assert seed_hex not in built.build_out + built.build_err
    assert seed_hex.encode() not in (built.src / "RELEASE.json").read_bytes()


async def test_two_builds_of_one_commit_are_byte_identical(built: Built) -> None:
    with trio.fail_after(120):
        result = await _cozy(
            "release", "build", "--manifest", "dist/again/RELEASE.json", "--out", "dist/again/dist",
            cwd=built.src, env=built.env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        first = {a.path: a.sha256 for a in _body(built.src / "RELEASE.json").artifacts}
        second = {a.path: a.sha256 for a in _body(built.src / "dist/again/RELEASE.json").artifacts}
        assert first == second


# --- tampering with the artifacts -----------------------------------------------------------------


@pytest.mark.parametrize("artifact", [WHEEL, SDIST])
async def test_a_flipped_byte_in_an_artifact_is_refused(
    built: Built, tmp_path: Path, artifact: str
) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        path = manifest.parent / artifact
        _flip_byte(path, path.stat().st_size // 2)
        with pytest.raises(release.ArtifactHashMismatch, match="was altered"):
            await _verify(built, manifest, state=tmp_path / "state.json")


async def test_an_artifact_of_another_size_is_refused(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        with (manifest.parent / SDIST).open("ab") as f:
            f.write(b"\0")
        with pytest.raises(release.ArtifactSizeMismatch, match="bytes, the release says"):
            await _verify(built, manifest, state=tmp_path / "state.json")


async def test_a_missing_artifact_is_refused(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        (manifest.parent / WHEEL).unlink()
        with pytest.raises(release.ArtifactMissing, match="not found next to it"):
            await _verify(built, manifest, state=tmp_path / "state.json")


# --- tampering with the manifest ------------------------------------------------------------------


def _edit_signed_field(manifest: Path, field: str, old: str, new: str) -> None:
    text = manifest.read_text()
    needle = f'"{field}": "{old}"'
    assert text.count(needle) == 1, needle
    manifest.write_text(text.replace(needle, f'"{field}": "{new}"'))


@pytest.mark.parametrize(
    "field", ["version", "lock_sha256", "source_commit", "expires", "sha256", "path"]
)
async def test_an_edited_signed_field_breaks_the_signature(
    built: Built, tmp_path: Path, field: str
) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        body = _body(manifest)
        old, new = {
            "version": (body.version, "9.9.9"),
            "lock_sha256": (body.lock_sha256, "0" * 64),
            "source_commit": (body.source_commit, "f" * 40),
            "expires": (
                release.utc_text(body.expires),
                release.utc_text(body.expires + timedelta(days=3650)),
            ),
            "sha256": (body.artifacts[0].sha256, _release.sha256_file(manifest)),
            "path": (body.artifacts[0].path, "dist/other.whl"),
        }[field]
        _edit_signed_field(manifest, field, old, new)
        with pytest.raises(release.BadReleaseSignature, match="altered or forged"):
            await _verify(built, manifest, state=tmp_path / "state.json")


async def test_an_edited_size_breaks_the_signature(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        size = _body(manifest).artifacts[0].size
        text = manifest.read_text()
        manifest.write_text(text.replace(f'"size": {size}', f'"size": {size + 1}', 1))
        with pytest.raises(release.BadReleaseSignature):
            await _verify(built, manifest, state=tmp_path / "state.json")


async def test_the_exact_signed_bytes_count_even_whitespace(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        text = manifest.read_text()
        manifest.write_text(text.replace('"format": ', '"format":  ', 1))
        with pytest.raises(release.BadReleaseSignature):
            await _verify(built, manifest, state=tmp_path / "state.json")


async def test_a_flipped_signature_is_refused(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        text = manifest.read_text()
        signature = msgspec.json.decode(text)["signature"]
        flipped = ("1" if signature[10] != "1" else "2").join([signature[:10], signature[11:]])
        manifest.write_text(text.replace(signature, flipped))
        with pytest.raises(release.BadReleaseSignature):
            await _verify(built, manifest, state=tmp_path / "state.json")


async def test_a_manifest_signed_by_another_key_is_not_trusted(
    built: Built, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        body = _body(manifest)
        other_seed = os.urandom(32)
        manifest.write_bytes(release.sign_release(body, other_seed))
        with pytest.raises(release.UntrustedSigner, match="not a key you trust"):
            await _verify(built, manifest, state=tmp_path / "state.json")

        # The same forgery naming the trusted key's id still fails: the id is only a hint.
        trusted_id = release.key_id(bytes.fromhex(built.public_key))
        forged = release.sign_release(body, other_seed).decode()
        other_id = release.key_id(release.public_key_of(other_seed))
        manifest.write_text(forged.replace(other_id, trusted_id))
        with pytest.raises(release.BadReleaseSignature):
            await _verify(built, manifest, state=tmp_path / "state.json")

        # Pinning the other key makes its manifest verify: what counts is the pin.
        manifest.write_bytes(release.sign_release(body, other_seed))
        verified = await _verify(
            built,
            manifest,
            state=tmp_path / "state.json",
            pubkey=release.public_key_of(other_seed).hex(),
        )
        assert verified.key_id == other_id


async def test_a_trust_file_decides_which_signers_are_accepted(
    built: Built, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        manifest = _copy_release(built, tmp_path / "r")
        env = _env(tmp_path / "home")
        trust = tmp_path / "trusted.json"
        shutil.copy(built.home / _release.DEV_TRUST_NAME, trust)
        ok = await _cozy(
            "release", "verify", "RELEASE.json", "--trust-file", str(trust),
            cwd=manifest.parent, env=env,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert b"OK: cozylabs-relay 0.1.0" in ok.stdout
        assert WHEEL.encode() in ok.stdout

        other = tmp_path / "other.json"
        _release.add_to_trust_file(other, release.public_key_of(os.urandom(32)), note="someone")
        refused = await _cozy(
            "release", "verify", "RELEASE.json", "--trust-file", str(other),
            cwd=manifest.parent, env=env,
        )  # fmt: skip
        assert refused.returncode == 2
        assert b"UntrustedSigner" in refused.stderr


async def test_first_use_without_a_pinned_key_is_refused(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        result = await _cozy(
            "release", "verify", "RELEASE.json", cwd=manifest.parent, env=_env(tmp_path / "home")
        )
        assert result.returncode == 1
        assert b"no trusted release key" in result.stderr
        assert b"--pubkey" in result.stderr
        assert not (tmp_path / "home" / _release.STATE_NAME).exists()


@pytest.mark.objective("SO-8")
async def test_a_trust_file_shipped_inside_a_release_is_not_trusted(
    built: Built, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        # An attacker re-signs the release and plants "trusted" keys where the developer trust
        # file used to live (in the directory verify runs from) and beside the manifest.
        forged = os.urandom(32)
        manifest.write_bytes(release.sign_release(_body(manifest), forged))
        for planted in (
            manifest.parent / ".cozy/release/trusted.json",
            manifest.parent / _release.DEV_TRUST_NAME,
        ):
            _release.add_to_trust_file(planted, release.public_key_of(forged), note="planted")
        result = await _cozy(
            "release", "verify", "RELEASE.json", cwd=manifest.parent, env=_env(tmp_path / "home")
        )
        assert result.returncode == 1, result.stderr
        assert b"no trusted release key" in result.stderr


async def test_an_expired_release_is_refused(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        body = _body(manifest)
        # Re-signed with the real key, but its validity ended yesterday.
        past = msgspec.structs.replace(
            body,
            created=body.created - timedelta(days=91),
            expires=datetime.now(UTC).replace(microsecond=0) - timedelta(days=1),
        )
        manifest.write_bytes(release.sign_release(past, built.seed))
        with pytest.raises(release.ReleaseExpired, match="expired at"):
            await _verify(built, manifest, state=tmp_path / "state.json")

        # And the genuine manifest, once its 90 days are over.
        genuine = _copy_release(built, tmp_path / "g")
        later = body.expires + timedelta(seconds=1)
        with pytest.raises(release.ReleaseExpired):
            await _verify(built, genuine, state=tmp_path / "state.json", now=later)


async def test_a_lock_that_is_not_the_release_lock_is_refused(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        lock = manifest.parent / "pdm.lock"
        lock.write_bytes(lock.read_bytes().replace(b'version = "', b'version = "0', 1))
        with pytest.raises(release.LockHashMismatch, match=r"was built from a pdm\.lock"):
            await _verify(built, manifest, state=tmp_path / "state.json")
        lock.unlink()
        with pytest.raises(_release.LockFileMissing, match="--lock PATH"):
            await _verify(built, manifest, state=tmp_path / "state.json")


async def test_a_version_older_than_the_last_trusted_is_refused(
    built: Built, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        state = tmp_path / "state.json"
        manifest = _copy_release(built, tmp_path / "r")
        body = _body(manifest)

        # 0.1.0 verifies and is recorded; verifying it again is fine.
        await _verify(built, manifest, state=state)
        await _verify(built, manifest, state=state)
        recorded = msgspec.json.decode(state.read_bytes())
        assert recorded["projects"]["cozylabs-relay"]["highest_version"] == "0.1.0"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600

        # A (signed, otherwise valid) 0.10.0 raises the bar: versions compare as PEP 440, not text.
        newer = _copy_release(built, tmp_path / "n")
        newer.write_bytes(
            release.sign_release(msgspec.structs.replace(body, version="0.10.0"), built.seed)
        )
        await _verify(built, newer, state=state)

        with pytest.raises(release.ReleaseDowngrade, match=r"older than 0\.10\.0"):
            await _verify(built, manifest, state=state)
        recorded = msgspec.json.decode(state.read_bytes())
        assert recorded["projects"]["cozylabs-relay"]["highest_version"] == "0.10.0"


async def test_a_damaged_state_file_is_not_silently_reset(built: Built, tmp_path: Path) -> None:
    with trio.fail_after(30):
        state = tmp_path / "state.json"
        state.write_text("{not json")
        manifest = _copy_release(built, tmp_path / "r")
        with pytest.raises(_release.StateFileError, match="forgets which versions"):
            await _verify(built, manifest, state=state)
        assert state.read_text() == "{not json"


async def test_a_signed_manifest_cannot_point_outside_its_directory(
    built: Built, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        manifest = _copy_release(built, tmp_path / "r")
        body = _body(manifest)
        escape = msgspec.structs.replace(body.artifacts[0], path="../outside.whl")
        forged = msgspec.structs.replace(body, artifacts=(escape, *body.artifacts[1:]))
        with pytest.raises(release.ManifestMalformed, match="not a plain relative path"):
            release.sign_release(forged, built.seed)
        # Hand-assembled with the real key (bypassing the writer's check): the reader refuses it.
        signed = release.signed_bytes(forged)
        signature = release._crypto.sign(
            release._crypto.signing_key_from_seed(built.seed), release.SIGN_DOMAIN + signed
        )
        envelope = (
            b'{"signed": ' + signed + b', "key_id": "'
            + release.key_id(bytes.fromhex(built.public_key)).encode()
            + b'", "signature": "' + signature.hex().encode() + b'"}'
        )  # fmt: skip
        manifest.write_bytes(envelope)
        with pytest.raises(release.ManifestMalformed, match="not a plain relative path"):
            await _verify(built, manifest, state=tmp_path / "state.json")


# --- build refusals -------------------------------------------------------------------------------


async def test_build_refuses_a_lock_that_does_not_match_pyproject(tmp_path: Path) -> None:
    with trio.fail_after(120):
        src = await trio.to_thread.run_sync(_clone, tmp_path / "src")
        pyproject = src / "pyproject.toml"
        text = pyproject.read_text()
        assert '"trio>=0.35",' in text
        pyproject.write_text(text.replace('"trio>=0.35",', '"trio>=0.35", "idna>=3",', 1))
        await trio.run_process(
            ["git", *GIT_ID, "-C", str(src), "commit", "-qam", "add a dependency, forget to lock"]
        )
        result = await _cozy("release", "build", cwd=src, env=_env(tmp_path / "home"))
        assert result.returncode == 1
        assert b"pdm.lock does not match pyproject.toml" in result.stderr
        assert b"run `pdm lock`" in result.stderr
        assert not (src / "RELEASE.json").exists()
        assert not (src / "dist").exists()


@pytest.mark.parametrize("change", ["modified", "untracked", "staged"])
async def test_build_refuses_a_dirty_working_tree(tmp_path: Path, change: str) -> None:
    with trio.fail_after(120):
        src = await trio.to_thread.run_sync(_clone, tmp_path / "src")
        if change == "modified":
            with (src / "README.md").open("a") as f:
                f.write("\nan uncommitted line\n")
        elif change == "untracked":
            (src / "model" / "new_module.py").write_text("X = 1\n")
        else:
            (src / "model" / "staged.py").write_text("X = 1\n")
            await trio.run_process(["git", "-C", str(src), "add", "model/staged.py"])
        result = await _cozy("release", "build", cwd=src, env=_env(tmp_path / "home"))
        assert result.returncode == 1
        assert b"not committed" in result.stderr
        assert not (src / "RELEASE.json").exists()


def test_the_recomputed_lock_hash_is_the_one_pdm_recorded() -> None:
    """model.release.pdm_content_hash replicates pdm; the committed lock is the referee."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lock = tomllib.loads((REPO / "pdm.lock").read_text())
    expected = lock["metadata"]["content_hash"]
    assert f"sha256:{release.pdm_content_hash(pyproject)}" == expected
    changed = dict(pyproject, project=dict(pyproject["project"], dependencies=["trio"]))
    assert f"sha256:{release.pdm_content_hash(changed)}" != expected


# --- keys -----------------------------------------------------------------------------------------


async def test_keygen_writes_a_private_seed_and_a_build_signed_with_it_verifies(
    built: Built, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        key = tmp_path / "keys" / "release-key"
        env = _env(tmp_path / "home")
        result = await _cozy("release", "keygen", "--out", str(key), cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        seed = _release.read_key(key)
        public_key = release.public_key_of(seed).hex()
        assert f"public key: {public_key}".encode() in result.stdout
        assert seed.hex().encode() not in result.stdout + result.stderr

        again = await _cozy("release", "keygen", "--out", str(key), cwd=tmp_path, env=env)
        assert again.returncode == 1
        assert b"never overwritten" in again.stderr
        assert _release.read_key(key) == seed

        out = tmp_path / "rel"
        build = await _cozy(
            "release", "build", "--key", str(key),
            "--manifest", str(out / "RELEASE.json"), "--out", str(out / "dist"),
            cwd=built.src, env=env,
        )  # fmt: skip
        assert build.returncode == 0, build.stderr
        assert b"DEVELOPMENT" not in build.stderr
        shutil.copy(built.src / "pdm.lock", out / "pdm.lock")
        verified = await _verify(
            built, out / "RELEASE.json", state=tmp_path / "s", pubkey=public_key
        )
        assert verified.key_id == release.key_id(bytes.fromhex(public_key))
        # The development key does not verify a release signed with the production key.
        with pytest.raises(release.UntrustedSigner):
            await _verify(built, out / "RELEASE.json", state=tmp_path / "s")


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "release-key"
    _release.write_new_key(key)
    key.chmod(0o644)
    with pytest.raises(_release.KeyFileError, match="chmod 600"):
        _release.read_key(key)


# --- the wheel, installed as a user would ---------------------------------------------------------


@pytest.mark.slow
async def test_the_release_wheel_installs_into_a_fresh_virtualenv_and_its_cozy_runs(
    built: Built, tmp_path: Path
) -> None:
    """pip installs the built wheel into a new virtualenv, resolving the wheel's own declared
    dependencies (pinned to the release's pdm.lock by a constraints file, fetched from the
    package index or pip's cache), and its `cozy` runs there with nothing of this checkout on
    the path."""
    export = await trio.run_process(
        [str(PDM), "export", "--prod", "--no-hashes", "--no-markers", "-f", "requirements"],
        cwd=built.src,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert export.returncode == 0, export.stderr.decode()
    # pip constraints are `name==version` only: drop extras (`psycopg[binary]`) and comments.
    pins = [
        re.sub(r"\[[^\]]*\]", "", line.strip())
        for line in export.stdout.decode().splitlines()
        if "==" in line and not line.startswith("#")
    ]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    venv = tmp_path / "fresh"
    await trio.run_process([sys.executable, "-m", "venv", str(venv)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"
    env["COZY_HOME"] = str(tmp_path / "home")
    install = ["install", "--quiet", "-c", str(constraints), str(built.src / WHEEL)]
    with trio.fail_after(600):
        pip = await trio.run_process(
            [str(venv / "bin" / "python"), "-m", "pip", *install],
            cwd=tmp_path,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert pip.returncode == 0, pip.stderr.decode()

    async def fresh(*args: str) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(60):
            return await trio.run_process(
                [str(venv / "bin" / "cozy"), *args],
                cwd=tmp_path,
                env=env,
                stdin=b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )

    for args in (("--help",), ("account", "--help"), ("dev", "--help")):
        ran = await fresh(*args)
        assert ran.returncode == 0, ran.stderr.decode()
        assert b"usage: cozy" in ran.stdout
    # Commands that load the server side (relay config, hvac, PyJWT) and write files for real.
    rotated = await fresh("relay", "rotate-jwt-key", "--data-dir", str(tmp_path / "relay"))
    assert rotated.returncode == 0, rotated.stderr.decode()
    assert (tmp_path / "relay" / "jwt_signing_key").stat().st_mode & 0o777 == 0o600
    keygen = await fresh("release", "keygen", "--out", str(tmp_path / "release-key"))
    assert keygen.returncode == 0, keygen.stderr.decode()
    # The code ran is the wheel's, not this checkout's; OpenBao's binary came with it.
    where = await trio.run_process(
        [str(venv / "bin" / "python"), "-c", "import cozy, relay; print(cozy.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_stdout=True,
    )
    assert str(venv) in where.stdout.decode()
    assert (venv / "bin" / "bao").exists()
