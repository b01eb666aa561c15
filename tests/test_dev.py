"""`cozy dev` as a developer runs it: two stacks on one machine, its banner, its tool secrets.

Each stack is a real `cozy dev` child process (embedded Postgres, OpenBao dev server, relay)
with a data dir of its own under tmp_path; the test only ever signals the processes it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hvac
import pytest
import trio

from cozy._dev import README_RELAY_URL
from tests.cli_harness import COZY, client_env, cozy, until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    banner: str
    relay_url: str
    ops_url: str
    bao_addr: str
    bao_token: str
    witness_url: str | None
    witness_vkey: str | None


def _dev_env(**extra: str) -> dict[str, str]:
    """The environment of a developer's shell: no COZY_OPS_PORT (conftest sets one for the
    relays tests start; `cozy dev` must cope with the default being taken on its own)."""
    env = {k: v for k, v in os.environ.items() if k != "COZY_OPS_PORT"}
    env.update(extra)
    return env


@asynccontextmanager
async def dev_stack(*args: str, env: dict[str, str]) -> AsyncIterator[Stack]:
    """Start `cozy dev ARGS`, yield once its banner is out, then Ctrl-C it and check it ended
    cleanly."""
    proc = subprocess.Popen(  # noqa: ASYNC220 — a long-lived child we signal ourselves
        [*COZY, "dev", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    output = b""
    token = "the root token, once the banner names its file"
    try:
        with trio.fail_after(120):
            while b"Ctrl-C stops" not in output:
                chunk = await trio.to_thread.run_sync(proc.stdout.readline)
                if not chunk:
                    pytest.fail(f"cozy dev exited early:\n{output.decode(errors='replace')}")
                output += chunk
        text = output.decode()
        banner = text[text.index("  relay    ws://") :]
        openbao = re.search(r"openbao  (\S+) .*`bao kv put`, is in (\S+)\)", banner)
        assert openbao is not None, banner
        running = trio.Path(openbao[2])
        named = json.loads(await running.read_text(encoding="utf-8"))
        assert named["addr"] == openbao[1]
        assert (await running.stat()).st_mode & 0o077 == 0
        token = named["token"]
        witness = re.search(r"witness  (http://\S+) .*\n +key (\S+)", banner)
        yield Stack(
            proc,
            banner,
            relay_url=re.findall(r"relay    (ws://\S+)", banner)[0],
            ops_url=" ".join(re.findall(r"ops      (\S+)", banner)),
            bao_addr=openbao[1],
            bao_token=token,
            witness_url=witness[1] if witness else None,
            witness_vkey=witness[2] if witness else None,
        )
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(60):
            output += await trio.to_thread.run_sync(proc.stdout.read)
            await trio.to_thread.run_sync(proc.wait)
        proc.stdout.close()
    assert proc.returncode == 0, output.decode(errors="replace")
    assert b"Traceback" not in output
    # The root token is a secret: never in the output a developer keeps (`make run > log`).
    assert token.encode() not in output


@contextmanager
def a_taken_port() -> Iterator[int]:
    """A loopback port this test holds: the stacks' configured ops port, taken."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _healthz(ops_url: str) -> int:
    with urllib.request.urlopen(f"{ops_url}/healthz", timeout=10) as answer:
        return int(answer.status)


def readme_first_steps() -> list[str]:
    """The commands of README.md's block after "Once `make run` prints the relay URL", one
    per `;`-separated command, without comments."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Once `make run` prints the relay URL", 1)[1]
    block = block.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        code = line.split("  #", 1)[0].strip()
        commands += [part.strip() for part in code.split("; ") if part.strip()]
    return commands


async def test_two_dev_stacks_run_side_by_side_while_their_ops_port_is_taken(
    tmp_path: Path,
) -> None:
    # Before: a stack whose ops port (9465 by default, or COZY_OPS_PORT) was taken, by another
    # `cozy dev` say, exited with "an address the relay listens on is already in use". The
    # port is COZY_OPS_PORT here, held by this test, so that no other process on the machine
    # is disturbed by a test holding the default; it is the same path as the default's.
    with a_taken_port() as taken:
        env = _dev_env(COZY_OPS_PORT=str(taken))
        async with (
            dev_stack("--data-dir", str(tmp_path / "one"), env=env) as one,
            dev_stack("--data-dir", str(tmp_path / "two"), env=env) as two,
        ):
            for stack in (one, two):
                assert stack.ops_url.startswith("http://127.0.0.1:")
                assert f"(port {taken} was taken; --ops-port" in stack.banner
                assert await trio.to_thread.run_sync(_healthz, stack.ops_url) == 200
            assert one.ops_url != two.ops_url
            assert one.relay_url != two.relay_url
            assert one.witness_url is not None
            assert two.witness_url is not None
            assert one.witness_url != two.witness_url
            assert one.witness_vkey != two.witness_vkey
            # --ops-port names the port exactly: taken, it is a one-line error, not a move.
            held, three = one.ops_url.rsplit(":", 1)[1], str(tmp_path / "three")
            with trio.fail_after(120):
                refused = await trio.run_process(
                    [*COZY, "dev", "--port", "0", "--ops-port", held, "--data-dir", three],
                    env=env,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            assert refused.returncode == 1
            assert b"error: an address the relay listens on is already in use" in refused.stderr
            assert b"--ops-port" in refused.stderr
            assert b"Traceback" not in refused.stderr


async def test_the_banner_prints_the_readme_first_steps_and_the_dev_witness_and_they_work(
    tmp_path: Path,
) -> None:
    # Before: the banner's passphrase ('… for keys') was not the README's, and its commands
    # (COLLAB_ID placeholders) were not the README's `C=$(…)` ones. And `cozy dev` started no
    # witness: a developer had to init and serve one, wire the relay to it and find its key
    # by hand to try a witness policy.
    data_dir, home = tmp_path / "dev", tmp_path / "alice"
    args = ("--data-dir", str(data_dir), "--ops-port", "0")
    async with dev_stack(*args, env=_dev_env()) as dev:
        assert dev.witness_url is not None
        assert dev.witness_url.startswith("http://127.0.0.1:")
        steps = dev.banner.split("Try it in another shell:\n", 1)[1].split("\n\n", 1)[0]
        lines = [line.strip() for line in steps.splitlines()]
        readme = readme_first_steps()
        for line in lines:
            assert line.replace(dev.relay_url, README_RELAY_URL) in readme, line
        # The dev witness's line, then a post and a read that need its cosignature.
        require = dev.banner.split("(1 of 1):\n", 1)[1].splitlines()[0].strip()
        assert require == f".venv/bin/cozy collab witnesses $C {dev.witness_vkey} --quorum 1"
        lines += [require, '.venv/bin/cozy post $C "cosigned"', ".venv/bin/cozy tail $C"]
        # Run them as printed (from a shell in the checkout, as the README says), with the
        # documented test KDF so the sign-up takes a moment, and a home of this test's own.
        script = "\n".join(lines).replace("/tmp/cozy-alice", str(home))
        with trio.fail_after(120):
            ran = await trio.run_process(
                ["bash", "-euc", script + '\necho "C=$C"'],
                env=client_env(tmp_path / "unused"),
                cwd=ROOT,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert ran.returncode == 0, ran.stderr.decode()
        assert b"signed up as alice" in ran.stdout
        assert b"\talice\thello" in ran.stdout
        assert b"requires 1 of 1 witnesses" in ran.stdout
        # A read under the 1-of-1 policy takes a head only with the dev witness's cosignature.
        assert b"\talice\tcosigned" in ran.stdout
        collab = re.findall(r"^C=(\S+)$", ran.stdout.decode(), re.M)[0]
        relay_port = dev.relay_url.rsplit(":", 1)[1]
    status = await trio.to_thread.run_sync(_witness_status, data_dir / "witness")
    [(origin, size)] = status.items()
    assert origin.endswith(f"/collab/{collab}")
    assert size >= 3  # the collab's creation, the policy, the posts

    # Restarted on the same data dir (and relay port: the device keeps the URL it signed up
    # on), the stack serves the same witness, which goes on from what it cosigned.
    exported = dict(re.findall(r"(COZY_\w+)='([^']+)'", lines[0]))  # the README's own
    env = client_env(home, **exported)
    async with dev_stack(*args, "--port", relay_port, env=_dev_env()) as again:
        assert again.witness_vkey == dev.witness_vkey
        await cozy("post", collab, "after a restart", env=env)
        await until(collab, env, ["alice", "after a restart"])
    later = await trio.to_thread.run_sync(_witness_status, data_dir / "witness")
    assert later[origin] > size


TOOLS_TOML = """
[tools.weather]
url = "http://127.0.0.1:9/v1/forecast?city={city}"
secret_path = "tools/weather"
secret_field = "api_key"
collabs = ["*"]

[tools.maps]
url = "https://maps.example/v2/{place}"
secret_mount = "devkv"
secret_path = "tools/maps"
secret_field = "token"
collabs = ["c_abcdefghijklmnopqrstuvwxyz"]
"""


def _read_secret(stack: Stack, mount: str, path: str) -> dict[str, str]:
    client = hvac.Client(url=stack.bao_addr, token=stack.bao_token, timeout=10)
    answer = client.secrets.kv.v2.read_secret_version(
        path, mount_point=mount, raise_on_deleted_version=True
    )
    return dict(answer["data"]["data"])


async def _secret_put(
    tool: str, value: bytes, data_dir: Path, config: Path
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [
                *COZY,
                "dev",
                "--data-dir",
                str(data_dir),
                "--config",
                str(config),
                *("secret", "put", tool),
            ],
            stdin=value,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_tool_secrets_survive_a_restart_of_the_dev_openbao(tmp_path: Path) -> None:
    # Before: `bao server -dev` kept secrets in memory only; every restart lost them, and the
    # banner did not say which tools were loaded.
    data_dir, config = tmp_path / "dev", tmp_path / "relay.toml"
    config.write_text(TOOLS_TOML)
    weather_key, maps_token = "weather-key-d41d8cd98f00", "maps-token-0cc175b9c0f1"

    stored = await _secret_put("weather", weather_key.encode() + b"\n", data_dir, config)
    assert stored.returncode == 0, stored.stderr.decode()
    assert b"puts it into OpenBao when it starts" in stored.stdout
    kept = data_dir / "dev-secrets.json"
    assert kept.stat().st_mode & 0o777 == 0o600

    args = ("--data-dir", str(data_dir), "--config", str(config), "--ops-port", "0")
    async with dev_stack(*args, env=_dev_env()) as first:
        assert "tools    2 loaded:" in first.banner
        assert re.search(
            r"weather +→ 127\.0\.0\.1:9 +in every collab +\(secret kept\)", first.banner
        )
        assert re.search(
            r"maps +→ maps\.example +in c_abcdefghijklmnopqrstuvwxyz"
            r" +\(no secret yet: cozy dev secret put maps\)",
            first.banner,
        )
        got = await trio.to_thread.run_sync(_read_secret, first, "secret", "tools/weather")
        assert got == {"api_key": weather_key}
        # Put while the stack runs: OpenBao has it at once (on a mount of its own, too).
        live = await _secret_put("maps", maps_token.encode(), data_dir, config)
        assert live.returncode == 0, live.stderr.decode()
        assert b"the running cozy dev has it now" in live.stdout
        got = await trio.to_thread.run_sync(_read_secret, first, "devkv", "tools/maps")
        assert got == {"token": maps_token}
        first_banner = first.banner
    assert not (data_dir / "openbao.json").exists(), "the stopped stack still names its OpenBao"

    async with dev_stack(*args, "--no-witness", env=_dev_env()) as second:
        assert second.bao_token != first.bao_token  # a new, empty dev server
        assert "  witness  off (--no-witness)" in second.banner
        assert second.witness_url is None
        assert "no secret yet" not in second.banner
        weather = await trio.to_thread.run_sync(_read_secret, second, "secret", "tools/weather")
        maps = await trio.to_thread.run_sync(_read_secret, second, "devkv", "tools/maps")
    assert weather == {"api_key": weather_key}
    assert maps == {"token": maps_token}
    for text in (first_banner, second.banner, stored.stdout.decode(), live.stdout.decode()):
        assert weather_key not in text
        assert maps_token not in text


async def test_secret_put_for_an_undeclared_tool_or_an_empty_value_says_what_to_do(
    tmp_path: Path,
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(TOOLS_TOML)
    unknown = await _secret_put("nope", b"some-secret", tmp_path / "dev", config)
    assert unknown.returncode == 1
    assert unknown.stderr.decode().splitlines() == [
        "error: no tool 'nope' is declared (declared: maps, weather); pass the TOML that"
        " declares it with --config, as to `cozy dev`"
    ]
    empty = await _secret_put("weather", b"\n", tmp_path / "dev", config)
    assert empty.returncode == 1
    assert len(empty.stderr.decode().splitlines()) == 1
    assert b"at least 4 bytes" in empty.stderr
    assert not (tmp_path / "dev" / "dev-secrets.json").exists()


def _witness_status(state: Path) -> dict[str, int]:
    """`cozy witness status`: origin → size last cosigned."""
    out = subprocess.run(
        [*COZY, "witness", "status", "--state", str(state)],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+/collab/\S+) size=(\d+)", out, re.M)}
