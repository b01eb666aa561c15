"""Files on the local disk written whole or not at all: the one `atomic_write`.

Why one: the client's COZY_HOME (profile, keystore), agent credential files, the relay's
persistent secrets and the release tool's trust and state files each had their own copy, and
they differed in what a crash could leave behind (a half-written secret, a rename lost with the
directory's metadata, a mode widened by the umask). This package sits beside `model` at the
bottom of the dependency graph (it imports nothing of ours) so the client kit, the relay and the
`cozy` command can all use it; unlike `model` it does I/O, synchronously: call it from a worker
thread where a Trio loop must not block.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, overwrite: bool = True) -> None:
    """Make `path` hold exactly `data`, with permissions exactly `mode` (the umask does not
    apply), such that a reader, or the disk after a crash or power loss at any point, sees the
    old file (or none) or the new one, never part of either.

    The bytes go to a temporary file in the same directory (created 0600, so a secret is never
    readable by others even for a moment, then set to `mode`), which is fsynced, then renamed
    over `path`; the directory is fsynced last so the rename itself is durable. With
    `overwrite=False` the new file is linked in instead and an existing `path` (even one
    created meanwhile by someone else) raises `FileExistsError`, leaving it untouched.

    The directory must exist. Raises `OSError` (disk full, permission, …); the temporary file is
    removed on every failure except the process dying, where a hidden `.NAME.*.tmp` may remain
    beside `path` and `path` itself is unharmed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    placed = False
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            placed = True
            os.unlink(tmp)
        placed = True
    finally:
        if not placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
