"""A real OpenBao dev server holding canary secrets, a local upstream that echoes its requests
back in many encodings (and records every path it was asked for), a second local server that
stands for another host, and a relay whose broker declares tools on them."""

from __future__ import annotations

import base64
import dataclasses
import html
import http.server
import json
import posixpath
import quopri
import re
import secrets
import threading
import time
import urllib.parse
from contextlib import contextmanager
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions
import msgspec
import pytest
import trio

from model.ids import new_id
from relay.broker import ToolSpec
from relay.config import Secret
from relay.embedded import embedded_openbao
from tests.relay_harness import relay_config, running_relay

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from relay._server import Relay

CANARY = "canary-" + secrets.token_hex(12)
SCOPED_COLLAB = new_id("c")  # a collab the tests never create
# A secret with characters that every encoding changes (and long enough that its base64 always
# crosses a 76-column MIME line break).
RICH = "canary/" + secrets.token_hex(24) + "+&<>='\""

# How upstreams echo a request: (Content-Type, encoder of the echoed text to body bytes).
ENCODINGS: dict[str, tuple[str | None, Callable[[str], bytes]]] = {
    "percent-lower": (
        None,
        lambda t: re.sub(
            "%[0-9A-F]{2}", lambda m: m.group().lower(), urllib.parse.quote(t, safe="")
        ).encode(),
    ),
    "json-go": (
        "application/json",
        lambda t: (
            json.dumps({"echo": t}, ensure_ascii=False)
            .replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
            .encode()
        ),
    ),
    "json-slash": (
        "application/json",
        lambda t: json.dumps({"echo": t}).replace("/", "\\/").encode(),
    ),
    "utf-16le": ("text/plain; charset=utf-16le", lambda t: t.encode("utf-16-le")),
    "utf-16be": ("text/plain; charset=UTF-16BE", lambda t: t.encode("utf-16-be")),
    "utf-16-bom": ("text/plain", lambda t: t.encode("utf-16")),
    "utf-16-undeclared": ("text/plain", lambda t: t.encode("utf-16-le")),
    "html-named": ("text/html", lambda t: html.escape(t).encode()),
    "html-decimal": ("text/html", lambda t: "".join(f"&#{ord(c)};" for c in t).encode()),
    "html-hex": ("text/html", lambda t: "".join(f"&#x{ord(c):x};" for c in t).encode()),
    "mime-lf": ("message/rfc822", lambda t: base64.encodebytes(t.encode())),
    "mime-crlf": (
        "message/rfc822",
        lambda t: base64.encodebytes(t.encode()).replace(b"\n", b"\r\n"),
    ),
    "base64-spaced": (
        None,
        lambda t: b" ".join(re.findall(b".{1,5}", base64.b64encode(t.encode()))),
    ),
    "quoted-printable": ("text/plain", lambda t: quopri.encodestring(t.encode())),
    "json-mime": (
        "application/json",
        lambda t: json.dumps({"d": base64.encodebytes(t.encode()).decode()}).encode(),
    ),
}


class Recorder(http.server.ThreadingHTTPServer):
    """Keeps every path it was asked for: as sent, and as a server that decodes
    percent-escapes (twice, as a proxy in front of an application would) and resolves dot
    segments would route it."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.paths: list[str] = []
        self.routed: list[str] = []
        self.requests: list[str] = []

    def record(self, path: str) -> str:
        raw = path.split("?")[0]
        decoded = urllib.parse.unquote(urllib.parse.unquote(raw)).replace("\\", "/")
        routed = posixpath.normpath(decoded)
        self.paths.append(raw)
        self.routed.append(routed)
        return routed


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the request it got, encoded the way the path asks."""

    server: Recorder

    def log_message(self, *_args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        seen = f"{self.requestline}\n{self.headers}"
        routed = self.server.record(self.path)
        if routed.startswith("/v1/"):  # a credential scoped to /v1/users/… on a bigger API
            self._answer(200, None, f"you reached {routed}".encode())
            return
        kind = self.path.split("?")[0].strip("/")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if kind in ENCODINGS:
            content_type, encode = ENCODINGS[kind]
            self._answer(200, content_type, encode(seen))
            return
        if kind == "size":
            self._answer(200, "text/plain", b"x" * int(query["n"][0]))
            return
        if kind == "redirect-elsewhere":
            self.send_response(302)
            self.send_header("Location", f"{query['to'][0]}/collect?k={CANARY}")
            self.end_headers()
            return
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

    def _answer(self, status: int, content_type: str | None, body: bytes) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Elsewhere(http.server.BaseHTTPRequestHandler):
    """Another host: it must never be reached by a tool, with or without its credential."""

    server: Recorder

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.record(self.path)
        self.server.requests.append(f"{self.requestline}\n{self.headers}")
        self.send_response(200)
        self.end_headers()


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[Recorder]:
    server = Recorder(handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def upstream_server() -> Iterator[Recorder]:
    with serving(Echo) as server:
        yield server


@pytest.fixture
def upstream(upstream_server: Recorder) -> int:
    return upstream_server.server_address[1]


@pytest.fixture
def elsewhere() -> Iterator[Recorder]:
    with serving(Elsewhere) as server:
        yield server


async def _kv_ready(client: hvac.Client) -> None:
    """Wait until the dev server's KV v2 mount takes writes. Right after start it may still be
    upgrading the mount and refuse them ("Upgrading from non-versioned to versioned data"),
    which a loaded machine (the suite on two xdist workers) hits."""
    with trio.fail_after(30):
        while True:
            try:
                await trio.to_thread.run_sync(
                    lambda: client.secrets.kv.v2.read_configuration(mount_point="secret")
                )
                return
            except hvac.exceptions.InvalidRequest as exc:
                if "Upgrading" not in str(exc):
                    raise
            await trio.sleep(0.1)


@pytest.fixture
async def bao() -> AsyncIterator[tuple[str, str]]:
    async with embedded_openbao() as dev:
        client = hvac.Client(url=dev.addr, token=dev.root_token)
        await _kv_ready(client)
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
        await trio.to_thread.run_sync(
            lambda: client.secrets.kv.v2.create_or_update_secret(
                path="tools/rich", secret={"api_key": RICH}, mount_point="secret"
            )
        )
        yield dev.addr, dev.root_token


def tools(port: int, elsewhere: int = 9) -> dict[str, ToolSpec]:
    def tool(path: str) -> ToolSpec:
        return ToolSpec(
            url=f"http://127.0.0.1:{port}/{path}?q={{q}}&key={{secret}}",
            secret_path="tools/echo",
            secret_field="api_key",
            collabs=("*",),
        )

    def rich(path: str) -> ToolSpec:
        return msgspec.structs.replace(tool(path), secret_path="tools/rich")

    return (
        {f"rich-{kind}": rich(kind) for kind in ENCODINGS}
        | {
            # A credential scoped to one endpoint of an API that has others (/v1/admin).
            "user": msgspec.structs.replace(
                tool("raw"), url=f"http://127.0.0.1:{port}/v1/users/{{id}}?key={{secret}}"
            ),
            "user-unresolvable": msgspec.structs.replace(
                tool("raw"), url=f"http://127.0.0.1:{port}/v1/users/{{id}}", secret_path="no/such"
            ),
            # allow_hosts: a template naming another host, and one whose port is an argument.
            "off-host": msgspec.structs.replace(
                tool("raw"),
                url=f"http://localhost:{elsewhere}/collect?k={{secret}}",
                allow_hosts=("127.0.0.1",),
            ),
            "any-port": msgspec.structs.replace(
                tool("raw"),
                url="http://127.0.0.1:{port}/collect?k={secret}",
                allow_hosts=("127.0.0.1",),
            ),
            "bounce": msgspec.structs.replace(
                tool("raw"),
                url=f"http://127.0.0.1:{port}/redirect-elsewhere?to={{to}}&k={{secret}}",
            ),
            "sized": msgspec.structs.replace(
                tool("raw"), url=f"http://127.0.0.1:{port}/size?n={{n}}", max_response_bytes=1000
            ),
        }
        | {kind: tool(kind) for kind in ("raw", "b64", "url", "json", "hex", "error", "redirect")}
        | {
            "slow": msgspec.structs.replace(tool("slow"), timeout_seconds=1.0),
            "broken": msgspec.structs.replace(tool("raw"), secret_path="no/such"),
            "pem": msgspec.structs.replace(tool("raw"), secret_path="tools/pem"),
            # What docs/examples/tool_bot.py calls: an API that echoes the key it was sent.
            "weather": msgspec.structs.replace(
                tool("raw"), url=f"http://127.0.0.1:{port}/raw?city={{city}}&key={{secret}}"
            ),
            # Opened by the operator to every member of every collab: no grant needed.
            "open": msgspec.structs.replace(tool("raw"), open_to_members=True),
            # Usable only in SCOPED_COLLAB.
            "scoped": msgspec.structs.replace(tool("raw"), collabs=(SCOPED_COLLAB,)),
        }
    )


@pytest.fixture
async def broker_relay(
    database_url: str, tmp_path: Path, upstream: int, elsewhere: Recorder, bao: tuple[str, str]
) -> AsyncIterator[Relay]:
    config = dataclasses.replace(
        relay_config(database_url, tmp_path / "relay"),
        bao_addr=bao[0],
        bao_token=Secret(bao[1].encode()),
        tools=tools(upstream, elsewhere.server_address[1]),
    )
    async with running_relay(config) as relay:
        yield relay
