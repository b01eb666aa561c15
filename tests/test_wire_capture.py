"""SO-1 on the wire: record every byte between real CLI processes and a real relay, and find no
content, no key and no passphrase in it — in raw, hex or base64 form (at every offset)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from clientkit._home import Home
from model import keystore, recovery
from tests.cli_harness import cli_signup, client_env, cozy
from tests.helpers import find_leaks
from tests.relay_harness import relay_config, running_relay
from tests.wire_tap import Tap

if TYPE_CHECKING:
    from pathlib import Path


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
    # Raw, hex, and base64 at every offset (a value inside a longer base64 stream).
    assert find_leaks(wire, never) == [], "these crossed the wire"
