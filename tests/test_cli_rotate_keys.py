"""`cozy account rotate-keys` as a person runs it, and the thief who kept an old keystore copy.

Real `cozy` processes against a real relay and Postgres. The thief's copy is the keystore row
as a database dump held it before the rotation, opened with the passphrase (the issue's item
10: a passphrase change never replaced the keys, so such a copy held the current keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import nacl.public
import nacl.signing
import psycopg
import pytest

from clientkit import RelayRefused, connect
from clientkit._home import Home
from model import content as contentmod
from model import keystore, recovery, wire
from model._crypto import CryptoError
from model.envelope import KIND_MANAGEMENT, decode_body, seal_event
from model.epochs import open_wrap
from model.membership import RekeyMember, proof_of
from tests.cli_harness import CODE_RE, cli_signup, client_env, cozy

if TYPE_CHECKING:
    from pathlib import Path

    from ledger import Ledger
    from relay._server import Relay

PASSPHRASE = "a different, longer encryption passphrase"  # tests/cli_harness.py's


def _stored_keystore(database_url: str, account_id: str) -> bytes:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT blob FROM keystores WHERE account_id = %s", (account_id,)
        ).fetchone()
    assert row is not None
    return bytes(row[0])


@pytest.mark.objective("SO-2")
async def test_rotate_keys_replaces_the_keys_everywhere_and_an_old_keystore_copy_opens_only_dead_keys(
    relay: Relay, tmp_path: Path, database_url: str, ledger: Ledger
) -> None:
    laptop, phone, bob_home = tmp_path / "laptop", tmp_path / "phone", tmp_path / "bob"
    old_code = await cli_signup(relay.url, laptop, "erin")
    await cli_signup(relay.url, bob_home, "bobby")
    erin, bob = client_env(laptop), client_env(bob_home)
    collab = (await cozy("collab", "create", "plans", env=erin)).stdout.decode().strip()
    await cozy("collab", "add", collab, "bobby", env=erin)
    bobs = (await cozy("collab", "create", "bobs room", env=bob)).stdout.decode().strip()
    await cozy("collab", "add", bobs, "erin", env=bob)
    await cozy("post", collab, "before the rotation", env=erin)
    await cozy("dm", collab, "bobby", "a DM before the rotation", env=erin)
    await cozy(
        "account", "restore", "--relay", relay.url, "--handle", "erin", env=client_env(phone)
    )
    account_id = Home(laptop).load_profile().account_id
    # The thief's copy: the keystore row as a database dump held it before the rotation.
    stolen_blob = _stored_keystore(database_url, account_id)
    stolen_sealed = keystore.decode_sealed(stolen_blob)
    stolen = keystore.open_content(stolen_sealed, keystore.unwrap_key(stolen_sealed, PASSPHRASE))

    # Without --yes a non-interactive run changes nothing.
    unconfirmed = await cozy("account", "rotate-keys", env=erin, check=False)
    assert unconfirmed.returncode == 1
    assert b"--yes" in unconfirmed.stderr

    # Interrupted: the relay cannot be reached after step 1 (new keys sealed and saved here).
    profile = Home(laptop).load_profile()
    reachable = profile.relay_url
    profile.relay_url = "ws://127.0.0.1:9"  # nothing listens there
    Home(laptop).save_profile(profile)
    cut = await cozy("account", "rotate-keys", "--yes", env=erin, check=False)
    assert cut.returncode == 1
    first_code = CODE_RE.findall(cut.stdout)
    assert len(first_code) == 1
    profile = Home(laptop).load_profile()
    profile.relay_url = reachable
    Home(laptop).save_profile(profile)
    # Meanwhile everything else refuses, saying how to finish.
    blocked = await cozy("post", collab, "half way", env=erin, check=False)
    assert blocked.returncode == 1
    assert b"rotate-keys" in blocked.stderr
    # Running it again resumes (no second code) and finishes.
    done = await cozy("account", "rotate-keys", "--yes", env=erin)
    assert b"resuming" in done.stderr
    assert CODE_RE.findall(done.stdout) == []
    assert b"your account keys are replaced" in done.stdout
    assert done.stderr.count(b"re-pinned at seq") == 2  # both collabs
    again = await cozy("account", "rotate-keys", "--yes", env=erin)  # a whole new rotation
    assert b"re-pinned at seq" in again.stderr
    assert CODE_RE.findall(again.stdout)  # with its own new code

    # Life goes on, for Erin, her other device and Bob; the history before still reads.
    await cozy("post", collab, "after the rotation", env=erin)
    await cozy("post", collab, "from the phone", env=client_env(phone))  # adopts the new keys
    tail = (await cozy("tail", collab, env=bob)).stdout.decode()
    for text in ("before the rotation", "after the rotation", "from the phone"):
        assert text in tail
    assert tail.count("replaced their account keys") == 2
    mine = (await cozy("tail", collab, env=erin)).stdout.decode()
    assert "a DM before the rotation" in mine
    assert "from the phone" in mine
    assert ledger.verify_ledger().problems == []

    # The thief's old copy opens — and holds keys that no longer act or read.
    current = keystore.decode_sealed(_stored_keystore(database_url, account_id))
    now = keystore.open_content(current, keystore.unwrap_key(current, PASSPHRASE))
    assert now.sign_seed != stolen.sign_seed
    assert now.box_sk != stolen.box_sk
    assert now.rotating_from == b""
    # Its keystore key opens nothing new, and neither does the old recovery code.
    with pytest.raises(CryptoError):
        keystore.open_content(current, keystore.unwrap_key(stolen_sealed, PASSPHRASE))
    with pytest.raises(CryptoError):
        keystore.unwrap_with_recovery(current, recovery.recovery_key(recovery.parse_code(old_code)))
    old_sign = nacl.signing.SigningKey(stolen.sign_seed)
    old_box = nacl.public.PrivateKey(stolen.box_sk)
    async with connect(relay.url) as thief:  # with the login password too
        await thief.login("erin", erin["COZY_PASSWORD"])
        with pytest.raises(RelayRefused) as refused:
            await thief.store_keystore(old_sign, 99, b"x")
        assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
        posted = seal_event(
            signing_key=old_sign, collab_key=b"\0" * 32, collab_id=collab, actor_id=account_id,
            kind=contentmod.KIND_MESSAGE, ts=1, content=b"x", epoch=0,
        )  # fmt: skip
        with pytest.raises(RelayRefused) as refused:
            await thief.append(posted)
        assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
    # Every epoch key drawn since the first rekey is wrapped to keys the thief does not hold.
    rekeys = wraps_checked = 0
    for e in ledger.read_range(collab, 1, 1000):
        body = decode_body(e.event.body)
        if body.kind != KIND_MANAGEMENT:
            continue
        op = proof_of(body).op
        if isinstance(op, RekeyMember):
            rekeys += 1
        if rekeys and account_id in getattr(op, "wraps", {}):
            with pytest.raises(CryptoError):
                open_wrap(op.wraps, account_id, old_box)  # type: ignore[union-attr]
            wraps_checked += 1
    assert rekeys == 2
    assert wraps_checked, "no epoch key drawn after the first rekey was wrapped for the account"
    assert msgspec.structs.asdict(now)["retired"]  # the old box key is kept to read the past
