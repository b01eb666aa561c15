"""Logs never carry secrets, tokens, passwords, content or ciphertext (guide; SO-1, SO-2)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import pytest
import trio

from clientkit import RelayRefused
from model import content as contentmod
from model.envelope import SignedEvent
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
        "receipt": ack.receipt_sig.hex(),
    }
    for what, value in forbidden.items():
        assert value not in logs, f"the {what} reached the logs"
