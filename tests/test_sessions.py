"""A login session alone is content-blind and mutation-incapable; keystore writes need the
account key (SO-2, SO-5). Real relay, real Postgres, real WebSockets."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import pytest
import trio

from clientkit import RelayRefused, _collab, connect
from ledger import Ledger
from model import content as contentmod
from model import keystore, wire
from model._crypto import CryptoError, random_bytes
from model.envelope import open_content, seal_event, verify_event
from model.ids import new_id
from model.keystore import KdfProfile, KeystoreContent
from model.proofs import sign_keystore_write
from tests.relay_harness import PASSWORD

if TYPE_CHECKING:
    from relay._server import Relay

PASSPHRASE = "violet tractor minus seventeen oysters"


class Victim:
    """An honest account with a sealed keystore on the relay, a collab and a secret post."""

    def __init__(self) -> None:
        self.sign = nacl.signing.SigningKey.generate()
        self.box = nacl.public.PrivateKey.generate()
        self.collab_key = b""
        self.content = KeystoreContent(bytes(self.sign), bytes(self.box))
        self.account_id = ""
        self.collab_id = ""

    async def enrol(self, url: str) -> None:
        async with connect(url) as client:
            sealed, _ = keystore.seal_new(self.content, PASSPHRASE, KdfProfile.INSECURE_TEST)
            self.account_id = await client.signup(
                "victim",
                PASSWORD,
                self.sign,
                bytes(self.box.public_key),
                sealed_keystore=keystore.encode_sealed(sealed),
            )
            await client.login("victim", PASSWORD)
            self.collab_id, self.collab_key = await client.create_collab(
                self.sign, bytes(self.box.public_key)
            )
            await client.post(
                signing_key=self.sign,
                collab_key=self.collab_key,
                collab_id=self.collab_id,
                content=contentmod.Message("the secret plan"),
                ts=1_700_000_000_000,
            )


def stored_events(database_url: str, collab_id: str) -> int:
    store = Ledger(database_url)
    store.open()
    try:
        return len(store.read_range(collab_id, 1, 1000))
    finally:
        store.close()


@pytest.mark.objective("SO-5")
@pytest.mark.objective("SO-2")
async def test_the_login_password_cracker_can_read_metadata_but_not_content_or_change_anything(
    relay: Relay, database_url: str
) -> None:
    victim = Victim()
    await victim.enrol(relay.url)
    # The attacker cracked the login password: a valid session, but none of the keys.
    mallory_key = nacl.signing.SigningKey.generate()
    with trio.fail_after(30):
        async with connect(relay.url) as attacker:
            await attacker.login("victim", PASSWORD)

            async def refused(coro: object, code: wire.ErrorCode) -> None:
                with pytest.raises(RelayRefused) as err:
                    await coro  # type: ignore[misc]
                assert err.value.code is code

            # Every mutation needs the account key.
            forged = seal_event(
                signing_key=mallory_key,
                collab_key=random_bytes(32),
                collab_id=victim.collab_id,
                actor_id=victim.account_id,
                kind="msg",
                ts=1_700_000_000_001,
                content=b"injected",
            )
            await refused(attacker.append(forged), wire.ErrorCode.BAD_SIGNATURE)
            await refused(
                attacker.create_collab(mallory_key, bytes(victim.box.public_key)),
                wire.ErrorCode.BAD_SIGNATURE,
            )
            for blob in (b"attacker keystore", b""):  # overwrite, then delete
                await refused(
                    attacker.store_keystore(mallory_key, 2, blob), wire.ErrorCode.BAD_SIGNATURE
                )
            # Replaying the victim's own signed keystore write (version 1) is a rollback: refused.
            stored = await attacker.fetch_keystore()
            replay = sign_keystore_write(victim.sign, victim.account_id, 1, stored.blob)
            await refused(
                attacker.request(
                    lambda rid: wire.PutKeystore(rid=rid, version=1, blob=stored.blob, sig=replay),
                    wire.KeystoreStored,
                ),
                wire.ErrorCode.STALE,
            )
            # Reads work, and give only sealed or encrypted bytes.
            sealed = keystore.decode_sealed(stored.blob)
            with pytest.raises(CryptoError):
                keystore.unwrap_key(sealed, PASSWORD)  # the login password is not the passphrase
            events: list[wire.Event] = []
            async with attacker.subscribe(victim.collab_id, follow=False) as frames:
                async for frame in frames:
                    if isinstance(frame, wire.CaughtUp):
                        break
                    assert isinstance(frame, wire.Event)
                    events.append(frame)
            assert len(events) == 2  # the genesis (with the key wrapped to the victim), the post
            verified = verify_event(events[1].event, bytes(victim.sign.verify_key))
            assert b"secret plan" not in events[1].event.body
            with pytest.raises(CryptoError):
                open_content(verified, random_bytes(32))
    assert stored_events(database_url, victim.collab_id) == 2


@pytest.mark.objective("SO-2")
async def test_keystore_writes_are_versioned_and_signed_by_the_account_key(relay: Relay) -> None:
    victim = Victim()
    await victim.enrol(relay.url)
    async with connect(relay.url) as client:
        await client.login("victim", PASSWORD)
        first = await client.fetch_keystore()
        assert first.version == 1
        # Real keystores (the relay refuses anything that is not one sealed at its KDF floor).
        two, out_of_order = (
            keystore.encode_sealed(
                keystore.seal_new(victim.content, PASSPHRASE, KdfProfile.INSECURE_TEST)[0]
            )
            for _ in range(2)
        )
        await client.store_keystore(victim.sign, 2, two)
        assert (await client.fetch_keystore()).blob == two
        for stale in (1, 2, 4):
            with pytest.raises(RelayRefused) as err:
                await client.store_keystore(victim.sign, stale, out_of_order)
            assert err.value.code is wire.ErrorCode.STALE
            assert "version 2" in err.value.message
        await client.store_keystore(victim.sign, 3, b"")  # a signed delete
        with pytest.raises(RelayRefused) as gone:
            await client.fetch_keystore()
        assert gone.value.code is wire.ErrorCode.NOT_FOUND
        # A keystore signed for another account does not verify here.
        other = new_id("a")
        sig = sign_keystore_write(victim.sign, other, 4, b"x")
        with pytest.raises(RelayRefused) as cross:
            await client.request(
                lambda rid: wire.PutKeystore(rid=rid, version=4, blob=b"x", sig=sig),
                wire.KeystoreStored,
            )
        assert cross.value.code is wire.ErrorCode.BAD_SIGNATURE


@pytest.mark.objective("SO-5")
async def test_collab_creation_proofs_cannot_be_replayed_or_backdated(relay: Relay) -> None:
    victim = Victim()
    await victim.enrol(relay.url)
    async with connect(relay.url) as client:
        await client.login("victim", PASSWORD)
        collab_id = new_id("c")
        ts = 1_000  # 1970: far too old
        box_pk = bytes(victim.box.public_key)
        old, _ = _collab.genesis(victim.sign, victim.account_id, box_pk, collab_id, ts)
        with pytest.raises(RelayRefused) as stale:
            await client.request(
                lambda rid: wire.CreateCollab(rid=rid, event=old), wire.CollabCreated
            )
        assert stale.value.code is wire.ErrorCode.INVALID_REQUEST
        now = int(time.time() * 1000)
        genesis, _ = _collab.genesis(victim.sign, victim.account_id, box_pk, collab_id, now)
        created = await client.request(
            lambda rid: wire.CreateCollab(rid=rid, event=genesis), wire.CollabCreated
        )
        assert created.collab_id == collab_id
        with pytest.raises(RelayRefused) as replay:
            await client.request(
                lambda rid: wire.CreateCollab(rid=rid, event=genesis), wire.CollabCreated
            )
        assert replay.value.code is wire.ErrorCode.INVALID_REQUEST
