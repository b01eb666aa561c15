"""The broker (SO-9) against a real OpenBao dev server and a real local HTTP upstream that
echoes its request back — in every common encoding, in error bodies and in redirects. The
canary secret must never reach the caller."""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import html
import json
import quopri
import urllib.parse
from typing import TYPE_CHECKING

import hvac
import pytest
import trio

from clientkit import RelayRefused
from model import wire
from relay.config import Secret
from relay.embedded import free_port
from tests.broker_harness import (
    CANARY,
    ENCODINGS,
    RICH,
    bao,
    broker_relay,
    elsewhere,
    tools,
    upstream,
    upstream_server,
)
from tests.relay_harness import grant, make_agent, relay_config, running_relay, session, sign_up

__all__ = ["bao", "broker_relay", "elsewhere", "upstream", "upstream_server"]  # fixtures

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay
    from tests.broker_harness import Recorder


def _leaks(text: str) -> bool:
    """Whether the canary can be read back out of `text` by decoding it."""
    candidates = [text, urllib.parse.unquote_plus(text)]
    for piece in text.replace("[REDACTED]", " ").split():
        for start in range(4):
            chunk = piece[start:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            with contextlib.suppress(binascii.Error, ValueError):
                candidates.append(base64.b64decode(chunk).decode(errors="ignore"))
        with contextlib.suppress(ValueError):
            candidates.append(bytes.fromhex(piece).decode(errors="ignore"))
    return any(CANARY in c or CANARY[7:] in c for c in candidates)


@pytest.mark.objective("SO-9")
async def test_the_secret_never_comes_back_in_any_encoding_status_or_redirect(
    broker_relay: Relay,
) -> None:
    alice = await sign_up(broker_relay.url, "alice")
    kinds = ("raw", "b64", "url", "json", "hex", "error", "redirect")
    async with session(broker_relay.url, alice) as client:
        await grant(client, alice, alice.account_id, *(f"tool:{k}" for k in kinds))
        for kind in kinds:
            result = await client.call_tool(alice.collab_id, kind, {"q": "hello"})
            assert not _leaks(result.body), (kind, result.body)
            if kind != "redirect":
                assert "[REDACTED]" in result.body, kind
                assert "hello" in urllib.parse.unquote(result.body) or kind in ("b64", "hex")
        assert (await client.call_tool(alice.collab_id, "error", {"q": "x"})).status == 500
        assert (await client.call_tool(alice.collab_id, "redirect", {"q": "x"})).status == 302


@pytest.mark.objective("SO-9")
async def test_agents_need_the_tool_capability_and_unknown_tools_are_not_found(
    broker_relay: Relay,
) -> None:
    alice = await sign_up(broker_relay.url, "alice")
    async with session(broker_relay.url, alice) as a:
        bots = {
            name: await make_agent(a, alice, caps, name)
            for name, caps in (("plain-bot", ("read", "post")), ("tool-bot", ("read", "tool:raw")))
        }
    async with session(broker_relay.url, bots["plain-bot"]) as plain:
        with pytest.raises(RelayRefused) as refused:
            await plain.call_tool(alice.collab_id, "raw", {"q": "x"})
        assert refused.value.code is wire.ErrorCode.UNAUTHORIZED
    async with session(broker_relay.url, bots["tool-bot"]) as bot:
        result = await bot.call_tool(alice.collab_id, "raw", {"q": "x"})
        assert result.status == 200
        assert not _leaks(result.body)
        with pytest.raises(RelayRefused) as other:
            await bot.call_tool(alice.collab_id, "b64", {"q": "x"})  # not granted
        assert other.value.code is wire.ErrorCode.UNAUTHORIZED
        with pytest.raises(RelayRefused) as post:
            await bot.append(bots["tool-bot"].event("no post capability"))
        assert post.value.code is wire.ErrorCode.UNAUTHORIZED
    async with session(broker_relay.url, alice) as a:
        with pytest.raises(RelayRefused) as unknown:
            await a.call_tool(alice.collab_id, "nope")
        assert unknown.value.code is wire.ErrorCode.NOT_FOUND


@pytest.mark.objective("SO-9")
async def test_failures_are_clear_scrubbed_and_quick(broker_relay: Relay) -> None:
    alice = await sign_up(broker_relay.url, "alice")
    async with session(broker_relay.url, alice) as client:
        await grant(client, alice, alice.account_id, "tool:slow", "tool:broken", "tool:pem")
        await grant(client, alice, alice.account_id, "tool:raw")
        with trio.fail_after(10), pytest.raises(RelayRefused) as slow:
            await client.call_tool(alice.collab_id, "slow", {"q": "x"})
        assert slow.value.code is wire.ErrorCode.TOOL_FAILED
        assert "did not answer" in slow.value.message
        assert not _leaks(slow.value.message)
        with pytest.raises(RelayRefused) as missing:
            await client.call_tool(alice.collab_id, "broken", {"q": "x"})
        assert "no secret at" in missing.value.message
        with pytest.raises(RelayRefused) as pem:
            await client.call_tool(alice.collab_id, "pem", {"q": "x"})
        assert pem.value.code is wire.ErrorCode.TOOL_FAILED
        assert "could not be made" in pem.value.message
        assert not _leaks(pem.value.message)
        with pytest.raises(RelayRefused) as no_arg:
            await client.call_tool(alice.collab_id, "raw")
        assert "argument 'q'" in no_arg.value.message


@pytest.mark.objective("SO-9")
async def test_openbao_down_is_a_clear_error_not_a_hang(
    database_url: str, tmp_path: Path, upstream: int
) -> None:
    config = dataclasses.replace(
        relay_config(database_url, tmp_path / "relay"),
        bao_addr=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        bao_token=Secret(b"any-token"),
        tools=tools(upstream),
    )
    async with running_relay(config) as relay:
        alice = await sign_up(relay.url, "alice")
        async with session(relay.url, alice) as client:
            await grant(client, alice, alice.account_id, "tool:raw")
            with trio.fail_after(15), pytest.raises(RelayRefused) as down:
                await client.call_tool(alice.collab_id, "raw", {"q": "x"})
    assert down.value.code is wire.ErrorCode.TOOL_FAILED
    assert "unreachable" in down.value.message


@pytest.mark.objective("SO-9")
async def test_the_secret_never_reaches_the_relays_logs(
    broker_relay: Relay, capfd: pytest.CaptureFixture[str]
) -> None:
    alice = await sign_up(broker_relay.url, "alice")
    kinds = ("raw", "b64", "error", "pem", "slow")
    async with session(broker_relay.url, alice) as client:
        await grant(client, alice, alice.account_id, *(f"tool:{k}" for k in kinds))
        for kind in kinds:
            with contextlib.suppress(RelayRefused):
                await client.call_tool(alice.collab_id, kind, {"q": "x"})
    out, err = capfd.readouterr()
    logs = out + err
    assert "tool_called" in logs  # the capture really holds the broker's log lines
    assert not _leaks(logs)


@pytest.mark.objective("SO-9")
async def test_approle_login_renewal_and_a_fresh_login_when_the_token_is_revoked(
    database_url: str, tmp_path: Path, upstream: int, bao: tuple[str, str]
) -> None:
    addr, root = bao
    admin = hvac.Client(url=addr, token=root)

    def approle() -> tuple[str, str]:
        admin.sys.enable_auth_method("approle")
        admin.sys.create_or_update_policy(
            "broker", 'path "secret/data/tools/*" { capabilities = ["read"] }'
        )
        admin.auth.approle.create_or_update_approle(
            "broker", token_policies=["broker"], token_ttl="3s", token_max_ttl="60s"
        )
        role_id = admin.auth.approle.read_role_id("broker")["data"]["role_id"]
        secret_id = admin.auth.approle.generate_secret_id("broker")["data"]["secret_id"]
        return role_id, secret_id

    role_id, secret_id = await trio.to_thread.run_sync(approle)
    config = dataclasses.replace(
        relay_config(database_url, tmp_path / "relay"),
        bao_addr=addr,
        bao_role_id=role_id,
        bao_secret_id=Secret(secret_id.encode()),
        tools=tools(upstream),
    )
    async with running_relay(config) as relay:
        alice = await sign_up(relay.url, "alice")
        async with session(relay.url, alice) as client:
            await grant(client, alice, alice.account_id, "tool:raw")
            first = await client.call_tool(alice.collab_id, "raw", {"q": "x"})
            assert first.status == 200
            # The operator revokes the broker's token; the next call logs in again by itself.
            store = relay.broker._store
            assert store is not None
            token = store._client.token
            await trio.to_thread.run_sync(lambda: admin.auth.token.revoke(token))
            second = await client.call_tool(alice.collab_id, "raw", {"q": "y"})
            assert second.status == 200
            assert store._client.token != token
            assert not _leaks(second.body)
            # A short-lived token is renewed before it runs out, not left to expire.
            await trio.sleep(2.2)
            third = await client.call_tool(alice.collab_id, "raw", {"q": "z"})
            assert third.status == 200
            assert store.renewals >= 1


# --- red team: what an attacker (or a careless upstream) tries --------------------------------------


def _stdlib_decodings(text: str) -> list[str]:
    """One layer of every decoding the stdlib offers, applied to `text` (the oracle: none of
    these is model/scrub.py)."""
    out = [
        urllib.parse.unquote(text),
        urllib.parse.unquote_plus(text),
        html.unescape(text),
        quopri.decodestring(text.encode(errors="replace")).decode(errors="replace"),
        text.encode(errors="surrogatepass").decode("utf-16-le", errors="replace"),
    ]
    with contextlib.suppress(ValueError):
        doc = json.loads(text)
        out += [str(v) for v in doc.values()] if isinstance(doc, dict) else [str(doc)]
    packed = "".join(text.split())
    for start in range(4):
        chunk = packed[start:]
        with contextlib.suppress(ValueError):
            out.append(base64.b64decode(chunk + "=" * (-len(chunk) % 4)).decode(errors="replace"))
    return out


def _oracle_recovers(text: str, secret: str) -> bool:
    stages = [text]
    for _ in range(3):
        stages = [d for stage in stages for d in _stdlib_decodings(stage)] + stages
        if any(secret in stage for stage in stages):
            return True
    return False


@pytest.mark.objective("SO-9")
async def test_no_encoding_an_upstream_echoes_gives_the_caller_the_secret(
    broker_relay: Relay,
) -> None:
    """Issue 13 item 5: lowercase percent-escapes, Go's JSON escapes, ``\\/``, UTF-16 (declared,
    BOM, undeclared), HTML references, MIME-wrapped and spaced base64, quoted-printable, and
    base64 inside JSON. Each answer is either scrubbed or withheld whole."""
    alice = await sign_up(broker_relay.url, "alice")
    outcomes = {}
    async with session(broker_relay.url, alice) as client:
        await grant(client, alice, alice.account_id, *(f"tool:rich-{k}" for k in ENCODINGS))
        for kind in ENCODINGS:
            try:
                result = await client.call_tool(alice.collab_id, f"rich-{kind}", {"q": "hello"})
            except RelayRefused as refused:
                assert refused.code is wire.ErrorCode.TOOL_FAILED, kind
                assert "withheld" in refused.message, (kind, refused.message)
                assert not _oracle_recovers(refused.message, RICH), kind
                outcomes[kind] = "withheld"
                continue
            assert result.status == 200, kind
            assert not _oracle_recovers(result.body, RICH), (kind, result.body)
            assert not _oracle_recovers(result.body, RICH[8:-8]), (kind, result.body)
            outcomes[kind] = "scrubbed"
    # Declared charsets are honoured (scrubbed, still useful); layered encodings are withheld.
    assert outcomes["utf-16le"] == outcomes["utf-16-bom"] == "scrubbed"
    assert outcomes["mime-crlf"] == outcomes["html-decimal"] == "withheld"


ESCAPES = [
    "../admin",
    "..%2fadmin",
    "..%2Fadmin",
    "%2e%2e%2fadmin",
    "%252e%252e%252fadmin",
    "..%5cadmin",
    "..\\admin",
    "..",
    ".",
    "%2E%2E",
    "..;jsessionid=x",
    "",
]


@pytest.mark.objective("SO-9")
async def test_arguments_cannot_move_a_call_outside_its_template_path(
    broker_relay: Relay, upstream_server: Recorder
) -> None:
    """A credential scoped to /v1/users/{id} never reaches /v1/admin on the same host, however
    the argument is encoded; the refusal comes before the secret is resolved."""
    alice = await sign_up(broker_relay.url, "alice")
    async with session(broker_relay.url, alice) as client:
        await grant(client, alice, alice.account_id, "tool:user", "tool:user-unresolvable")
        ok = await client.call_tool(alice.collab_id, "user", {"id": "42"})
        assert ok.body == "you reached /v1/users/42"
        for attack in ESCAPES:
            with pytest.raises(RelayRefused) as refused:
                await client.call_tool(alice.collab_id, "user", {"id": attack})
            assert refused.value.code is wire.ErrorCode.TOOL_FAILED, attack
            assert "argument 'id'" in refused.value.message, attack
            assert "nothing was sent" in refused.value.message or "empty" in refused.value.message
            # Refused before OpenBao is asked: this tool's secret path does not exist.
            with pytest.raises(RelayRefused) as early:
                await client.call_tool(alice.collab_id, "user-unresolvable", {"id": attack})
            assert "no secret at" not in early.value.message, attack
    assert upstream_server.routed == ["/v1/users/42"]
    assert all(path.startswith("/v1/users/") for path in upstream_server.paths)


@pytest.mark.objective("SO-9")
async def test_allow_hosts_holds_for_the_template_its_port_and_redirects(
    broker_relay: Relay, elsewhere: Recorder
) -> None:
    alice = await sign_up(broker_relay.url, "alice")
    other = f"http://127.0.0.1:{elsewhere.server_address[1]}"
    async with session(broker_relay.url, alice) as client:
        await grant(
            client, alice, alice.account_id, "tool:off-host", "tool:any-port", "tool:bounce"
        )
        # A template naming a host outside allow_hosts is refused before anything is sent.
        with pytest.raises(RelayRefused) as off_host:
            await client.call_tool(alice.collab_id, "off-host", {})
        assert "allowed hosts" in off_host.value.message
        # allow_hosts = ["127.0.0.1"] means that host on its default port, not every port.
        with pytest.raises(RelayRefused) as any_port:
            await client.call_tool(
                alice.collab_id, "any-port", {"port": str(elsewhere.server_address[1])}
            )
        assert "allowed hosts" in any_port.value.message
        # A redirect to another host is handed back, never followed.
        bounced = await client.call_tool(alice.collab_id, "bounce", {"to": other})
        assert bounced.status == 302
        assert not _oracle_recovers(bounced.body, CANARY)
    assert elsewhere.paths == []
    assert elsewhere.requests == []


@pytest.mark.objective("SO-9")
async def test_the_response_cap_holds(broker_relay: Relay) -> None:
    alice = await sign_up(broker_relay.url, "alice")
    async with session(broker_relay.url, alice) as client:
        await grant(client, alice, alice.account_id, "tool:sized")
        at_cap = await client.call_tool(alice.collab_id, "sized", {"n": "1000"})
        assert at_cap.status == 200
        assert at_cap.body == "x" * 1000
        for n in ("1001", "5000000"):
            with pytest.raises(RelayRefused) as over:
                await client.call_tool(alice.collab_id, "sized", {"n": n})
            assert over.value.code is wire.ErrorCode.TOOL_FAILED
            assert "larger than" in over.value.message
            assert "1000 bytes" in over.value.message
