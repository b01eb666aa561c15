"""Agents (SO-5, SO-7, SO-9): a human creates a bot with explicit capabilities and a 0600
credential file; the bot reads and posts with it and nothing more; revoking it kills its token
at once and rotates the collab key so it cannot read what follows."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import pytest
import trio
import trio_websocket

from clientkit import ConnectionLost, RelayRefused, _collab, connect
from clientkit._agent import CredentialsError, load_credentials
from model import content as contentmod
from model import wire
from model.epochs import NotARecipient
from tests.cli_harness import cli_signup, client_env, cozy

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay


@pytest.mark.objective("SO-7")
async def test_create_use_and_revoke_an_agent(relay: Relay, tmp_path: Path) -> None:
    env = client_env(tmp_path / "alice")
    await cli_signup(relay.url, tmp_path / "alice", "alice")
    collab = (await cozy("collab", "create", "ops", env=env)).stdout.decode().strip()
    creds_path = tmp_path / "bot.cozy-agent"
    created = await cozy(
        "agent", "create", collab, "helper-bot", "--cap", "read", "--cap", "post",
        "--out", str(creds_path), env=env,
    )  # fmt: skip
    assert b"mode 0600" in created.stdout
    assert creds_path.stat().st_mode & 0o777 == 0o600
    creds = load_credentials(creds_path)
    assert "token" not in repr(creds).replace("token redacted", "")
    await cozy("post", collab, "hello bot", env=env)

    sign, box = nacl.signing.SigningKey(creds.sign_seed), nacl.public.PrivateKey(creds.box_sk)
    async with connect(creds.relay_url, pinned_relay_pk=bytes.fromhex(creds.relay_pk)) as bot:
        await bot.authenticate(creds.token)
        view = await bot.read(collab, box)
        texts = []
        async with bot.history(collab, box, keys=view.known_keys()) as events:
            texts = [
                e.content.text async for e in events if isinstance(e.content, contentmod.Message)
            ]
        assert texts == ["hello bot"]
        epoch, key = view.current_key()
        ack = await bot.post(
            signing_key=sign, collab_key=key, epoch=epoch, collab_id=collab,
            content=contentmod.Message("hi, human"), ts=int(time.time() * 1000),
            evidence=view.evidence("bot", int(time.time() * 1000)),
        )  # fmt: skip
        assert ack.seq > 0
        # No management surface: a change signed by the agent's key is refused.
        view = await bot.read(collab, box)
        with pytest.raises(RelayRefused) as refused:
            await bot.append(_collab.proposal(view, sign, _collab.rotate(view), ack.seq))
        assert refused.value.code is wire.ErrorCode.UNAUTHORIZED
        # Nor can the bot log in with a password, or create agents of its own.
        with pytest.raises(RelayRefused):
            await bot.create_agent(creds.account_id, "spawn-bot", b"\x01" * 32, b"\x02" * 32)

        # The human revokes it while the bot stays connected: its connection is closed at once.
        revoked = await cozy("agent", "revoke", collab, "helper-bot", env=env)
        assert b"every token revoked" in revoked.stdout
        assert b"key rotated" in revoked.stdout
        with trio.fail_after(10), pytest.raises((ConnectionLost, trio_websocket.ConnectionClosed)):
            await bot.read(collab, box)
    # The token is dead for new connections too.
    async with connect(creds.relay_url) as again:
        with pytest.raises(RelayRefused) as dead:
            await again.authenticate(creds.token)
        assert dead.value.code is wire.ErrorCode.UNAUTHENTICATED
    # And what the human posts next is sealed under a key the bot never received: even handed
    # the ledger's events, the bot's own fold opens none of it.
    await cozy("post", collab, "after the bot", env=env)
    leaked = await trio.to_thread.run_sync(relay.ledger.read_range, collab, view.head.seq + 1, 100)
    entries = [view.ingest(e.seq, e.event, e.chain) for e in leaked]
    assert entries[-1].content is None
    assert "removed" in entries[-1].unreadable
    with pytest.raises(NotARecipient):
        view.current_key()


def test_a_credential_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "leaky.cozy-agent"
    path.write_text("{}")
    path.chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load_credentials(path)
