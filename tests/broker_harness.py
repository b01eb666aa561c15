"""A real OpenBao dev server holding a canary secret, a local upstream that echoes its requests
back in many encodings, and a relay whose broker declares tools on that upstream."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING

import hvac
import msgspec
import pytest
import trio

from relay.broker import ToolSpec
from relay.config import Secret
from relay.embedded import embedded_openbao
from tests.relay_harness import relay_config, running_relay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from relay._server import Relay

CANARY = "canary-" + secrets.token_hex(12)


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the request it got, encoded the way the path asks."""

    def log_message(self, *_args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        seen = f"{self.requestline}\n{self.headers}"
        kind = self.path.split("?")[0].strip("/")
        if kind == "slow":
            time.sleep(3)
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", f"http://elsewhere.invalid/?k={CANARY}")
            self.end_headers()
            return
        body = {
            "raw": seen,
            "b64": base64.b64encode(seen.encode()).decode(),
            "url": urllib.parse.quote(seen),
            "json": json.dumps({"echo": seen}),
            "hex": seen.encode().hex(),
            "error": seen,
            "slow": "late",
        }.get(kind, "?")
        self.send_response(500 if kind == "error" else 200)
        self.end_headers()
        self.wfile.write(body.encode())


@pytest.fixture
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def bao() -> AsyncIterator[tuple[str, str]]:
    async with embedded_openbao() as dev:
        client = hvac.Client(url=dev.addr, token=dev.root_token)
        await trio.to_thread.run_sync(
            lambda: client.secrets.kv.v2.create_or_update_secret(
                path="tools/echo", secret={"api_key": CANARY}, mount_point="secret"
            )
        )
        # A multi-line secret (a PEM key, say): HTTP refuses it in a header and says why,
        # quoting it — the error path must scrub too.
        await trio.to_thread.run_sync(
            lambda: client.secrets.kv.v2.create_or_update_secret(
                path="tools/pem", secret={"api_key": f"{CANARY}\nline two"}, mount_point="secret"
            )
        )
        yield dev.addr, dev.root_token


def tools(port: int) -> dict[str, ToolSpec]:
    def tool(path: str) -> ToolSpec:
        return ToolSpec(
            url=f"http://127.0.0.1:{port}/{path}?q={{q}}&key={{secret}}",
            secret_path="tools/echo",
            secret_field="api_key",
        )

    return {
        kind: tool(kind) for kind in ("raw", "b64", "url", "json", "hex", "error", "redirect")
    } | {
        "slow": msgspec.structs.replace(tool("slow"), timeout_seconds=1.0),
        "broken": msgspec.structs.replace(tool("raw"), secret_path="no/such"),
        "pem": msgspec.structs.replace(tool("raw"), secret_path="tools/pem"),
        # What docs/examples/tool_bot.py calls: an API that echoes the key it was sent.
        "weather": msgspec.structs.replace(
            tool("raw"), url=f"http://127.0.0.1:{port}/raw?city={{city}}&key={{secret}}"
        ),
    }


@pytest.fixture
async def broker_relay(
    database_url: str, tmp_path: Path, upstream: int, bao: tuple[str, str]
) -> AsyncIterator[Relay]:
    config = dataclasses.replace(
        relay_config(database_url, tmp_path / "relay"),
        bao_addr=bao[0],
        bao_token=Secret(bao[1].encode()),
        tools=tools(upstream),
    )
    async with running_relay(config) as relay:
        yield relay
