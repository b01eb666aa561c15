"""SO-1 on the wire: record every byte between real CLI processes and a real relay, and find no
content, no key and no passphrase in it — in raw, hex or base64 form."""

from __future__ import annotations

import base64
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from clientkit._home import Home
from model import keystore, recovery
from tests.cli_harness import cli_signup, client_env, cozy
from tests.relay_harness import relay_config, running_relay

if TYPE_CHECKING:
    from pathlib import Path


class Tap:
    """A loopback TCP proxy that records both directions of every connection through it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.streams: list[bytearray] = []
        self.connections = 0

    def payloads(self) -> bytes:
        """Every WebSocket payload seen, unmasked (client frames are XOR-masked on the wire,
        so a search of the raw bytes would miss everything the clients sent)."""
        return b"".join(_unmasked_payloads(bytes(s)) for s in self.streams)

    async def serve(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        return int(listeners[0].socket.getsockname()[1])

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client, await trio.open_tcp_stream("127.0.0.1", self.upstream_port) as upstream:
            async with trio.open_nursery() as nursery:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    captured = bytearray()
                    self.streams.append(captured)
                    try:
                        async for chunk in src:
                            captured += chunk
                            await dst.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)


@pytest.mark.objective("SO-1")
async def test_no_content_key_or_passphrase_crosses_the_wire(
    database_url: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    canaries = ["CANARY-wire-4f1d quarterly numbers", "CANARY-room-9b2e"]
    async with running_relay(relay_config(database_url, tmp_path / "relay")) as relay:
        tap = Tap(int(relay.url.rsplit(":", 1)[1]))
        url = f"ws://127.0.0.1:{await tap.serve(nursery)}"
        home = tmp_path / "ivy"
        env = client_env(home)
        code = await cli_signup(url, home, "ivy")
        collab = (await cozy("collab", "create", canaries[1], env=env)).stdout.decode().strip()
        await cozy("post", collab, canaries[0], env=env)
        tail = (await cozy("tail", collab, env=env)).stdout.decode()
        assert canaries[0] in tail  # the content was really there, end to end
        restored = tmp_path / "ivy-phone"
        await cozy(
            "account", "restore", "--relay", url, "--handle", "ivy", env=client_env(restored)
        )
    assert tap.connections >= 5
    sealed = Home(home).load_keystore()
    key = keystore.unwrap_key(sealed, env["COZY_PASSPHRASE"])
    content = keystore.open_content(sealed, key)
    never: dict[str, bytes] = {
        "message canary": b"CANARY-wire",
        "collab-name canary": b"CANARY-room",
        "passphrase": env["COZY_PASSPHRASE"].encode(),
        "recovery code": code.encode(),
        "recovery secret": recovery.parse_code(code),
        "signing key": content.sign_seed,
        "box key": content.box_sk,
        "keystore key": key,
    }
    wire = tap.payloads()
    # Positive control: the tap sees frame contents. The login password does cross the wire (it
    # is the server-verified secret; TLS at the edge protects it), so it must show up here.
    assert env["COZY_PASSWORD"].encode() in wire
    assert b"ivy" in wire
    for what, value in never.items():
        for form in (value, value.hex().encode(), base64.b64encode(value)):
            assert form not in wire, f"the {what} crossed the wire"


def _unmasked_payloads(stream: bytes) -> bytes:
    """Parse one direction of a WebSocket connection (RFC 6455 §5.2) after the HTTP handshake."""
    end = stream.find(b"\r\n\r\n")
    pos = 0 if end < 0 else end + 4
    out = bytearray(stream[:pos])
    while pos + 2 <= len(stream):
        b1 = stream[pos + 1]
        masked, length = b1 & 0x80, b1 & 0x7F
        pos += 2
        if length == 126:
            length, pos = int.from_bytes(stream[pos : pos + 2], "big"), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(stream[pos : pos + 8], "big"), pos + 8
        mask = stream[pos : pos + 4] if masked else b"\0\0\0\0"
        pos += 4 if masked else 0
        payload = stream[pos : pos + length]
        out += bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        pos += length
    return bytes(out)
