"""Account key rotation (ADR-0017) against a real relay and Postgres, and against a lying relay.

The attacker here kept a copy of an account's keys from before `cozy account rotate-keys` (an
old keystore out of a database dump, opened with a passphrase since changed). After the
rotation, nothing that key signs is accepted — by the relay, or by any member's client when a
lying relay serves it anyway — and its box key opens nothing sealed after the rotation.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import msgspec
import nacl.public
import nacl.signing
import pytest
import trio

from clientkit import RelayRefused, TamperDetected, _collab, connect
from model import content as contentmod
from model import keystore, wire
from model.chain import next_head
from model.envelope import event_id
from model.keystore import KdfProfile, KeystoreContent
from model.membership import Proof, RekeyMember, management_event
from model.proofs import KeyPair, sign_collab_rekey
from tests.evil_relay import EvilRelay
from tests.relay_harness import User, post, seal_in_view, session, sign_up
from tests.test_membership_relay import add, texts

if TYPE_CHECKING:
    from clientkit import Client
    from ledger import Ledger
    from relay._server import Relay

TS = 1_700_000_000_000


class NewKeys:
    def __init__(self) -> None:
        self.sign = nacl.signing.SigningKey.generate()
        self.box = nacl.public.PrivateKey.generate()

    @property
    def pair(self) -> KeyPair:
        return KeyPair(bytes(self.sign.verify_key), bytes(self.box.public_key))


async def rotate_directory(client: Client, user: User, new: NewKeys, version: int = 1) -> None:
    await client.rotate_account_keys(
        user.signing_key,
        bytes(user.box_key.public_key),
        new.sign,
        new.pair.box_pk,
        version,
        # A real keystore (the relay refuses anything below its KDF floor), sealed with the
        # test profile this suite's relays allow.
        keystore.encode_sealed(
            keystore.seal_new(
                KeystoreContent(bytes(new.sign), bytes(new.box)),
                "a passphrase for the new keys",
                KdfProfile.INSECURE_TEST,
            )[0]
        ),
    )


async def repin(client: Client, user: User, new: NewKeys, cid: str) -> wire.Appended:
    """The collab's `rekey`, signed by the old key (the one its fold pins)."""
    ack, _ = await client.manage(
        user.signing_key,
        user.box_key,
        cid,
        lambda v: _collab.rekey(v, new.sign, new.pair.box_pk),
        past_box_keys=[new.box],
    )
    return ack


async def post_rotated(client: Client, user: User, new: NewKeys, cid: str, text: str) -> int:
    """Post with the new keys, reading the history with the old box key kept (as the CLI does)."""
    view = await client.read(cid, new.box, past_box_keys=[user.box_key])
    epoch, key = view.current_key()
    ack = await client.post(
        signing_key=new.sign,
        collab_key=key,
        epoch=epoch,
        collab_id=cid,
        content=contentmod.Message(text),
        ts=TS,
        evidence=view.evidence("test-device", TS),
    )
    return ack.seq


@pytest.mark.objective("SO-3")
async def test_after_rotate_keys_the_relay_and_every_members_client_refuse_the_old_key(
    relay: Relay, ledger: Ledger
) -> None:
    alice, bob = await sign_up(relay.url, "alice"), await sign_up(relay.url, "bob")
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        await add(a, alice, bob)
    new = NewKeys()
    async with session(relay.url, bob) as b, session(relay.url, bob) as thief:
        before = await post(b, bob, cid, "before the rotation")
        await rotate_directory(b, bob, new)
        # The directory moved: the relay now verifies Bob's events under the new key, and a
        # collab that still pins the old one refuses them until it is re-pinned (order: the
        # directory first, then each collab).
        view = await b.read(cid, bob.box_key)
        new_bob = dataclasses.replace(bob, signing_key=new.sign)
        with pytest.raises(RelayRefused) as refused:
            await b.append(seal_in_view(new_bob, view, "too early", ts=TS))
        assert refused.value.code is wire.ErrorCode.UNAUTHORIZED
        assert "rotate-keys" in refused.value.message
        ack = await repin(b, bob, new, cid)
        # The thief's connection was opened before the rotation, on Bob's session: the relay
        # re-bound it to the new keys, so every old-key signature is refused on it too.
        view = await thief.read(cid, new.box, past_box_keys=[bob.box_key])
        for forged in (
            seal_in_view(bob, view, "signed with the old key", ts=TS),  # content
            _collab.proposal(view, bob.signing_key, _collab.rotate(view), TS),  # a change
        ):
            with pytest.raises(RelayRefused) as refused:
                await thief.append(forged)  # type: ignore[arg-type]
            assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
        with pytest.raises(RelayRefused) as refused:  # a rekey to the thief's own keys
            thief_keys = NewKeys()
            await thief.manage(
                bob.signing_key,
                new.box,
                cid,
                lambda v: _collab.rekey(v, thief_keys.sign, thief_keys.pair.box_pk),
            )
        assert refused.value.code is wire.ErrorCode.UNAUTHORIZED
        with pytest.raises(RelayRefused) as refused:  # overwrite the keystore
            await thief.store_keystore(bob.signing_key, 2, b"the thief's keystore")
        assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
        with pytest.raises(RelayRefused) as refused:  # rotate the directory to its own keys
            await rotate_directory(thief, bob, NewKeys(), version=2)
        assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
        with pytest.raises(RelayRefused) as refused:  # create a collab in Bob's name
            await thief.create_collab(bob.signing_key, bytes(bob.box_key.public_key))
        assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
        # Bob goes on with the new key; the history before the rotation still verifies.
        after = await post_rotated(b, bob, new, cid, "after the rotation")
    async with session(relay.url, alice) as a:
        seen = await texts(a, alice, cid)
    assert (seen[before], seen[after]) == ("before the rotation", "after the rotation")
    assert ledger.verify_ledger().problems == []

    # A lying relay serves the real history plus an event the old key signed after the rekey:
    # Alice's real client kit refuses it.
    stored = await trio.to_thread.run_sync(ledger.read_range, cid, 1, 1000)
    events = [(e.seq, e.event, e.chain) for e in stored]
    async with session(relay.url, alice) as a:
        alice_view = await a.read(cid, alice.box_key)
    forged = seal_in_view(bob, alice_view, "the thief speaks as bob", ts=TS)
    events.append((events[-1][0] + 1, forged, next_head(events[-1][2], event_id(forged))))  # type: ignore[arg-type]
    evil = EvilRelay(cid, events)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(evil.serve)
        async with connect(evil.url) as liar:
            await liar.authenticate(alice.account_id)
            with pytest.raises(TamperDetected, match="signature"):
                await liar.read(cid, alice.box_key)
        nursery.cancel_scope.cancel()
    assert ack.seq > before


@pytest.mark.objective("SO-5")
async def test_the_relay_takes_a_rekey_only_from_the_pinned_key_to_the_registered_keys_with_possession(
    relay: Relay,
) -> None:
    alice, bob = await sign_up(relay.url, "alice"), await sign_up(relay.url, "bob")
    cid = alice.collab_id
    async with session(relay.url, alice) as a:
        await add(a, alice, bob)
    new = NewKeys()
    async with session(relay.url, bob) as b, session(relay.url, alice) as a:
        # Before the directory moved, a rekey (even a well-made one) is refused: the relay
        # takes a rekey only to the account's registered keys.
        with pytest.raises(RelayRefused) as refused:
            await repin(b, bob, new, cid)
        assert refused.value.code is wire.ErrorCode.UNAUTHORIZED

        # The directory rotation needs both signatures: the new key's (possession)…
        old = KeyPair(bytes(bob.signing_key.verify_key), bytes(bob.box_key.public_key))
        stranger = NewKeys()
        with pytest.raises(RelayRefused) as refused:
            await b.request(
                lambda rid: wire.RotateAccountKeys(
                    rid=rid, sign_pk=new.pair.sign_pk, box_pk=new.pair.box_pk,
                    keystore_version=1, keystore=b"k", keystore_sig=b"\0" * 64,
                    old_sig=bob.signing_key.sign(b"x").signature,
                    new_sig=stranger.sign.sign(b"x").signature,
                ),
                wire.AccountKeysRotated,
            )  # fmt: skip
        assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE
        # …and the registered key's: someone else's session cannot rotate Bob's keys.
        with pytest.raises(RelayRefused) as refused:
            await rotate_directory(a, bob, new)
        assert refused.value.code is wire.ErrorCode.BAD_SIGNATURE

        await rotate_directory(b, bob, new)
        view = await b.read(cid, bob.box_key)
        good = _collab.rekey(view, new.sign, new.pair.box_pk)
        assert isinstance(good, RekeyMember)

        async def refused_rekey(op: RekeyMember, signer: nacl.signing.SigningKey) -> wire.ErrorCode:
            proof = Proof(1, cid, bob.account_id, view.head.seq, view.head.chain, op)
            with pytest.raises(RelayRefused) as exc:
                await b.append(management_event(signer, proof, ts=TS))
            return exc.value.code

        # Without possession of the new key (signed by the old one instead).
        no_possession = msgspec.structs.replace(
            good, possession=sign_collab_rekey(bob.signing_key, cid, bob.account_id, old, new.pair)
        )
        assert await refused_rekey(no_possession, bob.signing_key) is wire.ErrorCode.INVALID_EVENT
        # Signed by the new key rather than the pinned old one.
        assert await refused_rekey(good, new.sign) is wire.ErrorCode.BAD_SIGNATURE
        # Alice (owner) re-pinning Bob: an event authored as Bob from her session is refused,
        # and one she signs in her own name re-pins only herself (her keys are not rotated).
        alice_view = await a.read(cid, alice.box_key)
        as_bob = Proof(1, cid, bob.account_id, alice_view.head.seq, alice_view.head.chain, good)
        with pytest.raises(RelayRefused) as exc:
            await a.append(management_event(alice.signing_key, as_bob, ts=TS))
        assert exc.value.code is wire.ErrorCode.UNAUTHORIZED
        mine = Proof(1, cid, alice.account_id, alice_view.head.seq, alice_view.head.chain, good)
        with pytest.raises(RelayRefused) as exc:
            await a.append(management_event(alice.signing_key, mine, ts=TS))
        assert exc.value.code is wire.ErrorCode.UNAUTHORIZED
        # The well-made rekey, signed by the pinned key, goes through.
        await repin(b, bob, new, cid)
