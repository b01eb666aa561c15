"""`localfs.atomic_write`, the one way files are replaced: a crash never leaves half of one.

The crashes are real: a child process writes under a file-size limit (RLIMIT_FSIZE) with
SIGXFSZ at its default action, so the kernel kills it in the middle of writing the bytes, the
way a full disk or an OOM kill would cut a write short, with no hook into our code.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from localfs import atomic_write
from relay.config import load_config, relay_signing_seed, rotate_jwt_signing_key

REPO = Path(__file__).resolve().parent.parent


def _crash_while_writing(code: str, limit: int) -> subprocess.CompletedProcess[bytes]:
    """Run `code` in a child the kernel kills once it has written `limit` bytes to any file."""
    prelude = textwrap.dedent(
        f"""
        import resource, signal
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )


def _leftovers(directory: Path, name: str) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(f".{name}.")]


def test_a_crash_in_the_middle_of_a_replace_leaves_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "keystore.bin"
    target.write_bytes(b"old content")
    done = _crash_while_writing(
        f"""
        from pathlib import Path
        from localfs import atomic_write
        atomic_write(Path({str(target)!r}), b"n" * 100_000)
        """,
        limit=4096,
    )
    assert done.returncode == -signal.SIGXFSZ, done.stderr.decode()
    assert target.read_bytes() == b"old content"
    # The next write goes through; the dead writer's hidden temporary file is all that remains.
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert len(_leftovers(tmp_path, "keystore.bin")) == 1


def test_a_failed_replace_removes_its_temporary_file_and_keeps_the_old(tmp_path: Path) -> None:
    target = tmp_path / "profile.json"
    target.mkdir()  # rename over a directory fails after the bytes were written and synced
    with pytest.raises(IsADirectoryError):
        atomic_write(target, b"{}")
    assert target.is_dir()
    assert _leftovers(tmp_path, "profile.json") == []


@pytest.mark.parametrize(("mode", "umask"), [(0o600, 0o000), (0o644, 0o077), (0o640, 0o022)])
def test_the_mode_is_exactly_what_was_asked_whatever_the_umask_and_old_file(
    tmp_path: Path, mode: int, umask: int
) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"old")
    target.chmod(0o666)
    old = os.umask(umask)
    try:
        atomic_write(target, b"new", mode=mode)
        atomic_write(tmp_path / "fresh", b"new", mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == mode
    assert target.read_bytes() == b"new"


def test_the_default_mode_keeps_a_secret_to_its_owner(tmp_path: Path) -> None:
    atomic_write(tmp_path / "token", b"t")
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600


def test_without_overwrite_an_existing_file_is_refused_and_untouched(tmp_path: Path) -> None:
    target = tmp_path / "bot.cozy-agent"
    atomic_write(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    assert _leftovers(tmp_path, "bot.cozy-agent") == []


def test_a_relay_killed_while_creating_its_signing_seed_starts_next_time(tmp_path: Path) -> None:
    """The relay's seed is created on first start. A start killed mid-write (a full disk)
    used to leave a truncated file, and every later start refused it as damaged; now the
    file appears whole or not at all."""
    env = {"JWT_SIGNING_KEY": "k" * 32}
    done = _crash_while_writing(
        f"""
        from pathlib import Path
        from relay.config import load_config, relay_signing_seed
        relay_signing_seed(load_config({env!r}, data_dir={str(tmp_path)!r}))
        """,
        limit=10,
    )
    assert done.returncode == -signal.SIGXFSZ, done.stderr.decode()

    seed = relay_signing_seed(load_config(env, data_dir=str(tmp_path)))
    assert len(seed) == 32
    assert stat.S_IMODE((tmp_path / "relay_signing_seed").stat().st_mode) == 0o600


def test_a_jwt_key_rotation_killed_mid_write_keeps_the_old_key(tmp_path: Path) -> None:
    path = rotate_jwt_signing_key(tmp_path)
    before = path.read_bytes()
    done = _crash_while_writing(
        f"""
        from pathlib import Path
        from relay.config import rotate_jwt_signing_key
        rotate_jwt_signing_key(Path({str(tmp_path)!r}))
        """,
        limit=10,
    )
    assert done.returncode == -signal.SIGXFSZ, done.stderr.decode()
    assert path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
