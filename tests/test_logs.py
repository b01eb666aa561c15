"""Logs never carry secrets, tokens, passwords, content or ciphertext (guide; SO-1, SO-2)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import sys
import time
import urllib.parse
from functools import partial
from typing import TYPE_CHECKING

import msgspec
import nacl.public
import nacl.signing
import pytest
import trio

from clientkit import RelayRefused, connect
from model import content as contentmod
from model.envelope import EventBody, SignedEvent, seal_event
from tests.helpers import find_leaks
from tests.relay_harness import PASSWORD, relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.objective("SO-1")
async def test_the_relay_logs_ids_and_codes_but_no_secret_or_content(
    database_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    canary = "CANARY-log-81c2 salary spreadsheet"
    async with running_relay(relay_config(database_url, tmp_path)) as relay:
        user = await sign_up(relay.url, "logan")
        with trio.fail_after(30):
            async with session(relay.url, user) as client:
                ack = await client.post(
                    signing_key=user.signing_key,
                    collab_key=user.collab_key,
                    collab_id=user.collab_id,
                    content=contentmod.Message(canary),
                    ts=1_700_000_000_000,
                )
                with pytest.raises(RelayRefused):
                    await client.login("logan", "a wrong password guess")
                with pytest.raises(RelayRefused):
                    await client.authenticate("not-a-token-" + PASSWORD)
                signed = user.event(canary)
                with pytest.raises(RelayRefused):  # a bad signature is refused and logged
                    await client.append(SignedEvent(body=signed.body, sig=bytes(64)))
    out, err = capfd.readouterr()
    logs = out + err
    assert "relay_listening" in logs  # the capture really holds the relay's log
    assert "account_created" in logs
    assert user.account_id in logs  # ids are fine to log
    forbidden = {
        "login password": PASSWORD,
        "wrong password guess": "a wrong password guess",
        "session token": user.token,
        "content canary": "CANARY-log",
        "ciphertext": signed.body.hex()[-40:],
        "ciphertext (base64)": base64.b64encode(signed.body).decode()[-40:],
        "receipt": ack.checkpoint.hex()[-40:],
    }
    for what, value in forbidden.items():
        assert value not in logs, f"the {what} reached the logs"


async def _await_log_events(path: Path, proc: trio.Process, *events: str) -> dict[str, dict]:
    """The first JSON log line of each named event, once all have appeared in `path`."""
    with trio.fail_after(30):
        while True:
            found: dict[str, dict] = {}
            for line in (await trio.Path(path).read_text()).splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # judged later, once the relay has stopped
                if record.get("event") in events:
                    found.setdefault(record["event"], record)
            if len(found) == len(events):
                return found
            assert proc.returncode is None, "the relay exited before it was listening"
            await trio.sleep(0.1)


async def _http_get(url: str) -> bytes:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        return data


@pytest.mark.objective("SO-1")
@pytest.mark.objective("SO-2")
async def test_json_logs_parse_line_by_line_and_hold_no_secret_in_any_encoding(
    database_url: str, tmp_path: Path
) -> None:
    """`cozy relay serve --json-logs` as an operator runs it, with every kind of secret in play:
    each line of its log is one JSON object, and none holds a planted value raw, hex, base64
    (any offset, both alphabets), URL-encoded or JSON-escaped (tests/helpers.leak_forms)."""
    login_password = "login-pw-" + secrets.token_urlsafe(12)
    passphrase = "a long encryption passphrase " + secrets.token_urlsafe(12)
    jwt_key = secrets.token_urlsafe(48)
    seed = secrets.token_bytes(32)
    seed_b64 = base64.b64encode(seed).decode()
    canary = "CANARY-json-log " + secrets.token_hex(8)
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        JWT_SIGNING_KEY=jwt_key,
        COZY_RELAY_SIGNING_SEED=seed_b64,
        COZY_LISTEN_PORT="0",
        COZY_OPS_PORT="0",
    )
    command = [sys.executable, "-m", "cozy.cli", "relay", "serve", "--json-logs"]
    command += ["--data-dir", str(tmp_path / "relay")]
    log_path = tmp_path / "relay.log"
    with trio.fail_after(90), log_path.open("wb") as log_file:
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                partial(trio.run_process, command, env=env, stderr=log_file, check=False)
            )
            started = await _await_log_events(log_path, proc, "relay_listening", "ops_listening")
            url, ops_url = started["relay_listening"]["url"], started["ops_listening"]["url"]

            sign, box = nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()
            async with connect(url) as client:
                await client.signup("jason", login_password, sign, bytes(box.public_key))
                token = (await client.login("jason", login_password)).token
                with pytest.raises(RelayRefused):  # the passphrase typed at the password prompt
                    await client.login("jason", passphrase)
                collab_id, collab_key = await client.create_collab(sign, bytes(box.public_key))
            async with connect(url) as client:
                await client.authenticate(token)
                with pytest.raises(RelayRefused):
                    await client.authenticate(f"{token}x")  # a token one byte off
                signed = seal_event(
                    signing_key=sign,
                    collab_key=collab_key,
                    collab_id=collab_id,
                    actor_id=await client.authenticate(token),
                    kind="msg",
                    ts=int(time.time() * 1000),
                    content=contentmod.encode_content(contentmod.Message(text=canary)),
                )
                await client.append(signed)
                with pytest.raises(RelayRefused):  # refused for its signature, and logged
                    await client.append(SignedEvent(body=signed.body, sig=bytes(64)))
            # The ops listener's answers hold nothing either, even when asked with a secret.
            ops_answers = b"".join(
                [
                    await _http_get(f"{ops_url}/metrics"),
                    await _http_get(f"{ops_url}/readyz"),
                    await _http_get(f"{ops_url}/nowhere?token={token}"),
                ]
            )
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
    assert proc.returncode == 0

    ciphertext = msgspec.msgpack.decode(signed.body, type=EventBody).ciphertext
    planted: dict[str, str | bytes] = {
        "login password": login_password,
        "session token": token,
        "passphrase": passphrase,
        "JWT signing key": jwt_key,
        "relay signing seed": seed,
        "relay signing seed (as configured)": seed_b64,
        "content canary": canary,
        "ciphertext": ciphertext,
    }
    raw = log_path.read_bytes()
    lines = raw.decode().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"log line {number} is not JSON: {line[:200]!r}")
    assert all(isinstance(r, dict) and "event" in r and "level" in r for r in records)
    events = {r["event"] for r in records}
    # The capture really covers the scenario: startup, every request kind above, shutdown.
    assert {"relay_listening", "ops_listening", "account_created", "collab_created"} <= events
    assert {"request_refused", "relay_stopped"} <= events
    assert find_leaks(raw, planted) == []
    assert find_leaks(ops_answers, planted) == []
    assert b"HTTP/1.1 404" in ops_answers  # the last request really was answered
