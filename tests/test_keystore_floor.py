"""What a database thief finds in the keystores table, and what a hostile relay can make a
client derive (SO-2; issue 13, item 10).

The KDF header of a stored keystore is plaintext. Before this, the relay stored a keystore
sealed with any cost — an 8 MiB, one-pass header was accepted — so a thief would crack those
first. Now the relay refuses to store anything below Argon2id MODERATE, except the documented
test profile where its own configuration allows it; and a client refuses to seal below
MODERATE, or to derive with the absurd parameters a malicious relay could plant.
"""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import msgspec
import nacl.public
import nacl.signing
import nacl.utils
import pytest
import trio

from clientkit import RelayRefused, _home, connect
from ledger import Ledger
from model import keystore, wire
from model.keystore import KdfCostRefused, KdfParams, KdfProfile, KeystoreContent, SealedKeystore
from model.proofs import sign_keystore_write
from relay.config import load_config
from tests.relay_harness import PASSWORD, relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from relay._server import Relay

PASSPHRASE = "violet tractor minus seventeen oysters"
MiB = 1024 * 1024


def _header_only(opslimit: int, memlimit: int, alg: str = "argon2id13") -> bytes:
    """A keystore as a client would upload it, with the KDF header an attacker chooses. The
    relay never derives, so the wrap itself need not open (it is random bytes here)."""
    return keystore.encode_sealed(
        SealedKeystore(
            v=keystore.KEYSTORE_VERSION,
            kdf=KdfParams(alg, opslimit, memlimit, nacl.utils.random(16)),
            wrapped_key=nacl.utils.random(72),
            sealed=nacl.utils.random(120),
        )
    )


def _test_profile_keystore(sign: nacl.signing.SigningKey, box: nacl.public.PrivateKey) -> bytes:
    content = KeystoreContent(bytes(sign), bytes(box))
    sealed, _ = keystore.seal_new(content, PASSPHRASE, KdfProfile.INSECURE_TEST)
    return keystore.encode_sealed(sealed)


@asynccontextmanager
async def _strict_relay(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[Relay, Ledger]]:
    """A relay whose configuration does not allow the test KDF profile, and the ledger it
    stores into (to see what it kept)."""
    config = dataclasses.replace(
        relay_config(database_url, tmp_path / "relay"), allow_test_kdf=False
    )
    store = Ledger(database_url)
    store.open()
    try:
        async with running_relay(config) as relay:
            yield relay, store
    finally:
        store.close()


WEAK = {
    "test-profile-8MiB-1-pass": (1, 8 * MiB),
    "moderate-passes-little-memory": (3, 64 * MiB),
    "one-pass-moderate-memory": (1, 256 * MiB),
    "absurd-passes": (1_000_000, 256 * MiB),
    "absurd-memory": (3, 64 * 1024 * MiB),
}


@pytest.mark.objective("SO-2")
async def test_the_relay_refuses_to_store_a_keystore_sealed_below_moderate(
    database_url: str, tmp_path: Path
) -> None:
    async with _strict_relay(database_url, tmp_path) as (relay, store):
        with trio.fail_after(60):
            async with connect(relay.url) as client:
                # At sign-up: a real test-profile keystore, and hand-made weak headers.
                for n, (name, (ops, mem)) in enumerate(WEAK.items()):
                    sign = nacl.signing.SigningKey.generate()
                    box = nacl.public.PrivateKey.generate()
                    blob = (
                        _test_profile_keystore(sign, box)
                        if name.startswith("test-profile")
                        else _header_only(ops, mem)
                    )
                    with pytest.raises(RelayRefused) as refused:
                        await client.signup(
                            f"weak-{n}", PASSWORD, sign, bytes(box.public_key),
                            sealed_keystore=blob,
                        )  # fmt: skip
                    assert refused.value.code is wire.ErrorCode.WEAK_KEYSTORE, name
                    assert "seal it again" in refused.value.message, refused.value.message
                    assert store.account_by_handle(f"weak-{n}") is None  # nothing stored
                garbage = b"\x81\xa1v\x01"
                with pytest.raises(RelayRefused) as not_one:
                    await client.signup(
                        "garbage", PASSWORD, sign, bytes(box.public_key),
                        sealed_keystore=garbage,
                    )  # fmt: skip
                assert not_one.value.code is wire.ErrorCode.WEAK_KEYSTORE

                # MODERATE is stored.
                sign = nacl.signing.SigningKey.generate()
                box = nacl.public.PrivateKey.generate()
                moderate = _header_only(3, 256 * MiB)
                account_id = await client.signup(
                    "strong", PASSWORD, sign, bytes(box.public_key), sealed_keystore=moderate
                )
                stored = store.keystore(account_id)
                assert stored is not None
                assert stored.blob == moderate

                # put_keystore: a weaker replacement is refused, the stored one stays.
                await client.login("strong", PASSWORD)
                for ops, mem in WEAK.values():
                    blob = _header_only(ops, mem)
                    with pytest.raises(RelayRefused) as replaced:
                        await client.store_keystore(sign, 2, blob)
                    assert replaced.value.code is wire.ErrorCode.WEAK_KEYSTORE
                again = store.keystore(account_id)
                assert again is not None
                assert (again.version, again.blob) == (1, moderate)
                # Deleting (an empty, signed blob) is not a weak keystore.
                await client.request(
                    lambda rid: wire.PutKeystore(
                        rid=rid,
                        version=2,
                        blob=b"",
                        sig=sign_keystore_write(sign, account_id, 2, b""),
                    ),
                    wire.KeystoreStored,
                )


@pytest.mark.objective("SO-2")
async def test_the_test_profile_is_stored_only_where_the_relay_config_allows_it(
    database_url: str, tmp_path: Path
) -> None:
    # Never on by default, from the environment, a TOML file or `cozy dev` alike.
    assert load_config(env={}, data_dir=tmp_path).allow_test_kdf is False
    assert load_config(env={"COZY_ALLOW_TEST_KDF": "1"}, data_dir=tmp_path).allow_test_kdf
    config = relay_config(database_url, tmp_path / "relay")
    assert config.allow_test_kdf  # the harness turns it on for the suite's cheap keystores
    async with running_relay(config) as relay:
        with trio.fail_after(60):
            async with connect(relay.url) as client:
                sign = nacl.signing.SigningKey.generate()
                box = nacl.public.PrivateKey.generate()
                await client.signup(
                    "tester", PASSWORD, sign, bytes(box.public_key),
                    sealed_keystore=_test_profile_keystore(sign, box),
                )  # fmt: skip
                # Even then, nothing below the test profile.
                with pytest.raises(RelayRefused) as refused:
                    await client.signup(
                        "tester2", PASSWORD, sign, bytes(box.public_key),
                        sealed_keystore=_header_only(1, 4 * MiB),
                    )  # fmt: skip
                assert refused.value.code is wire.ErrorCode.WEAK_KEYSTORE


@pytest.mark.objective("SO-2")
@pytest.mark.parametrize(
    ("opslimit", "memlimit"),
    [(keystore.MAX_OPSLIMIT + 2, 8 * MiB), (2**32 - 1, 8 * MiB), (3, 2**42)],
    ids=["twelve-passes", "four-billion-passes", "four-TiB"],
)
def test_unwrapping_refuses_a_kdf_cost_a_malicious_relay_planted(
    opslimit: int, memlimit: int
) -> None:
    # The victim's real keystore, as the relay serves it back with its header rewritten.
    content = KeystoreContent(nacl.utils.random(32), nacl.utils.random(32))
    sealed, _ = keystore.seal_new(content, PASSPHRASE, KdfProfile.INSECURE_TEST)
    planted = msgspec.structs.replace(
        sealed, kdf=msgspec.structs.replace(sealed.kdf, opslimit=opslimit, memlimit=memlimit)
    )
    served = keystore.decode_sealed(keystore.encode_sealed(planted))
    # Refused before any derivation (a derivation with the right passphrase would end in
    # "wrong passphrase", not in this refusal).
    with pytest.raises(KdfCostRefused, match="refusing to derive"):
        keystore.unwrap_key(served, PASSPHRASE)


class _LookAlike:
    """Something shaped like a KdfProfile that a caller might pass to get a cheap seal."""

    value = (1, 8 * 1024)


@pytest.mark.objective("SO-2")
def test_sealing_below_moderate_is_refused_outside_the_test_profile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    content = KeystoreContent(nacl.utils.random(32), nacl.utils.random(32))
    for call in (
        lambda: keystore.new_kdf_params(_LookAlike()),  # type: ignore[arg-type]
        lambda: keystore.seal_new(content, PASSPHRASE, _LookAlike()),  # type: ignore[arg-type]
    ):
        with pytest.raises(KdfCostRefused):
            call()
    sealed, key = keystore.seal_new(content, PASSPHRASE, KdfProfile.INSECURE_TEST)
    with pytest.raises(KdfCostRefused):
        keystore.rewrap_passphrase(sealed, key, PASSPHRASE, _LookAlike())  # type: ignore[arg-type]
    # The CLI picks the test profile for exactly one spelling, and MODERATE for anything else.
    for value in ("min", "INSECURE_TEST", "insecure-test ", "interactive", "0", ""):
        monkeypatch.setenv(_home.KDF_PROFILE_ENV, value)
        assert _home.kdf_profile() is KdfProfile.MODERATE, value
    monkeypatch.setenv(_home.KDF_PROFILE_ENV, "insecure-test")
    assert _home.kdf_profile() is KdfProfile.INSECURE_TEST
    # The floor a relay applies says the same, as a pure check of the plaintext header.
    params = keystore.kdf_header(keystore.encode_sealed(sealed))
    with pytest.raises(KdfCostRefused):
        keystore.check_kdf_floor(params)
    keystore.check_kdf_floor(params, allow_test_profile=True)
    keystore.check_kdf_floor(keystore.new_kdf_params())


@pytest.mark.objective("SO-2")
async def test_a_key_rotation_cannot_store_a_keystore_below_the_floor(
    database_url: str, tmp_path: Path
) -> None:
    async with _strict_relay(database_url, tmp_path) as (relay, store):
        user = await sign_up(relay.url)
        new_sign = nacl.signing.SigningKey.generate()
        new_box = nacl.public.PrivateKey.generate()
        with trio.fail_after(60):
            async with session(relay.url, user) as client:
                with pytest.raises(RelayRefused) as refused:
                    await client.rotate_account_keys(
                        user.signing_key,
                        bytes(user.box_key.public_key),
                        new_sign,
                        bytes(new_box.public_key),
                        1,
                        _test_profile_keystore(new_sign, new_box),
                    )
                assert refused.value.code is wire.ErrorCode.WEAK_KEYSTORE
        row = store.account_by_id(user.account_id)
        assert row is not None
        assert row.sign_pk == bytes(user.signing_key.verify_key)  # nothing changed
        assert store.keystore(user.account_id) is None
