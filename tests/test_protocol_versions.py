"""A client and a relay of different protocol versions find out at once, and say who must
upgrade in one line (docs/protocol.md "Versions", ADR-0021).

The relay announces `model.wire.PROTOCOL` in its `welcome`; clients compare it with the name
they were built with (`model.protocol.PROTOCOL`). Setting the first makes a real relay announce
another version while the client in this process, and the `cozy` child processes, keep theirs.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import msgspec
import nacl.public
import nacl.signing
import pytest
import trio
import trio_websocket

from model import protocol, wire
from model.ids import new_id
from tests.cli_harness import client_env, cozy

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay

NEWER = "cozylabs/3"


async def test_a_client_refuses_a_relay_of_a_newer_protocol_with_a_typed_error(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clientkit import ProtocolMismatch, connect

    monkeypatch.setattr(wire, "PROTOCOL", NEWER)
    with trio.fail_after(20), pytest.raises(ProtocolMismatch) as caught:
        async with connect(relay.url):
            pytest.fail("connected to a relay of another protocol version")
    assert caught.value.relay_protocol == NEWER
    message = str(caught.value)
    assert "\n" not in message
    assert "upgrade this client" in message
    assert NEWER in message


async def test_the_cli_tells_an_old_client_to_upgrade_in_one_line(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(wire, "PROTOCOL", NEWER)
    result = await cozy(
        "account",
        "signup",
        "--relay",
        relay.url,
        "--handle",
        "newrelay",
        env=client_env(tmp_path / "home"),
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 1, err
    # Progress lines ("sealing your keystore …") may come first; the error is one line.
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0]
    assert lines[0].startswith("error: the relay speaks cozylabs/3, newer than this client")
    assert "upgrade this client" in lines[0]
    assert "Traceback" not in err


async def _future_relay(
    welcome: dict[str, object], request: trio_websocket.WebSocketRequest
) -> None:
    ws = await request.accept()
    await ws.send_message(msgspec.msgpack.encode(welcome))
    with trio.move_on_after(5):
        await ws.get_message()  # until the client closes


async def test_a_newer_welcome_this_client_cannot_decode_is_a_version_error_not_a_decode_error(
    nursery: trio.Nursery,
) -> None:
    # What a relay of a later version sends: the two keys every version keeps, and a field this
    # client's strict frame types refuse.
    from clientkit import ProtocolMismatch, connect

    welcome = {
        "t": "welcome",
        "protocol": NEWER,
        "relay_pk": bytes(32),
        "max_frame_bytes": 1,
        "max_body_bytes": 1,
        "challenge": bytes(32),
        "checkpoint_key": bytes(32),
    }
    with pytest.raises(wire.MalformedFrame):
        wire.decode_reply(msgspec.msgpack.encode(welcome))
    server = await nursery.start(
        partial(trio_websocket.serve_websocket, partial(_future_relay, welcome)),
        "127.0.0.1",
        0,
        None,
    )
    url = f"ws://127.0.0.1:{server.port}/"
    with trio.fail_after(20), pytest.raises(ProtocolMismatch) as caught:
        async with connect(url):
            pytest.fail("connected to a relay of another protocol version")
    assert caught.value.relay_protocol == NEWER
    assert "upgrade this client" in str(caught.value)


async def test_a_server_that_announces_no_protocol_is_named_as_not_a_relay(
    nursery: trio.Nursery,
) -> None:
    from clientkit import ProtocolMismatch, connect

    server = await nursery.start(
        partial(trio_websocket.serve_websocket, partial(_future_relay, {"hello": "world"})),
        "127.0.0.1",
        0,
        None,
    )
    with trio.fail_after(20), pytest.raises(ProtocolMismatch) as caught:
        async with connect(f"ws://127.0.0.1:{server.port}/"):
            pytest.fail("connected to something that is not a relay")
    assert caught.value.relay_protocol is None
    assert "check the relay URL" in str(caught.value)


@pytest.mark.parametrize(
    ("relay_says", "client_speaks", "expected"),
    [
        ("cozylabs/2", "cozylabs/1", "upgrade this client to a release that speaks cozylabs/2"),
        ("cozylabs/1", "cozylabs/2", "ask its operator to upgrade the relay"),
        ("matrix/1", "cozylabs/1", "not cozylabs/1: check the relay URL"),
        (None, "cozylabs/1", "did not introduce itself as a CozyLabs relay"),
    ],
)
def test_the_mismatch_message_says_who_must_upgrade(
    relay_says: str | None, client_speaks: str, expected: str
) -> None:
    message = protocol.mismatch_message(relay_says, client_speaks)
    assert expected in message
    assert "\n" not in message


def test_the_announced_protocol_is_read_from_any_versions_welcome() -> None:
    enc = msgspec.msgpack.encode
    assert protocol.announced_protocol(enc({"t": "welcome", "protocol": "cozylabs/9", "x": 1})) == (
        "cozylabs/9"
    )
    # A welcome coalesced with the frames after it.
    first = wire.encode(
        wire.Welcome(protocol="cozylabs/1", relay_pk=bytes(32), max_frame_bytes=1, max_body_bytes=1)
    )
    coalesced = wire.batch([first, wire.encode(wire.Pong(rid=1))])
    assert protocol.announced_protocol(coalesced) == "cozylabs/1"
    for junk in (b"", b"\xc1", enc({"t": "pong", "rid": 1}), enc({"t": "welcome", "protocol": 1})):
        assert protocol.announced_protocol(junk) is None


async def test_a_client_of_this_version_connects_to_a_relay_of_this_version(relay: Relay) -> None:
    from clientkit import connect

    with trio.fail_after(20):
        async with connect(relay.url) as client:
            await client.request(lambda rid: wire.Ping(rid=rid), wire.Pong)


async def test_a_bot_stops_on_a_version_mismatch_instead_of_reconnecting(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from clientkit import ProtocolMismatch
    from clientkit._agent import AgentCredentials, save_credentials
    from clientkit.bot import Bot

    monkeypatch.setattr(wire, "PROTOCOL", NEWER)
    creds = tmp_path / "bot.cozy-agent"
    save_credentials(
        creds,
        AgentCredentials(
            relay_url=relay.url,
            relay_pk=relay.relay_pk.hex(),
            account_id=new_id("a"),
            handle="old-bot",
            collab_id=new_id("c"),
            sign_seed=bytes(nacl.signing.SigningKey.generate()),
            box_sk=bytes(nacl.public.PrivateKey.generate()),
            token="t",
            expires_at=0,
        ),
    )
    bot = Bot.from_credentials(creds, store=tmp_path / "store")
    with trio.fail_after(20), pytest.raises(ProtocolMismatch, match="upgrade this client"):
        await bot.run()
