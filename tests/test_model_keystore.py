"""The sealed keystore (SO-2: a database dump is useless without the user's passphrase).

Everything except one test uses the cheap INSECURE_TEST Argon2id profile; that one test runs a
real MODERATE derivation (~1 s, 256 MiB) to prove the default is the documented floor.
"""

from __future__ import annotations

import inspect

import msgspec
import nacl.pwhash
import nacl.utils
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import keystore
from model._crypto import CryptoError
from model.keystore import KdfProfile, KeystoreContent, SealedKeystore

PASSPHRASE = "correct horse battery staple, but longer"
TEST = KdfProfile.INSECURE_TEST


def _content() -> KeystoreContent:
    return KeystoreContent(
        sign_seed=nacl.utils.random(32),
        box_sk=nacl.utils.random(32),
    )


@pytest.fixture(scope="module")
def sealed_pair() -> tuple[SealedKeystore, bytes, KeystoreContent]:
    content = _content()
    sealed, key = keystore.seal_new(content, PASSPHRASE, TEST)
    return sealed, key, content


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos % len(out)] ^= 0x01
    return bytes(out)


# --- round trips ----------------------------------------------------------------------------


def test_seal_unwrap_open_round_trip(
    sealed_pair: tuple[SealedKeystore, bytes, KeystoreContent],
) -> None:
    sealed, key, content = sealed_pair
    assert sealed.v == keystore.KEYSTORE_VERSION
    assert len(key) == keystore.KEY_BYTES
    assert keystore.unwrap_key(sealed, PASSPHRASE) == key
    assert keystore.open_content(sealed, key) == content


def test_sealed_keystore_survives_encoding(
    sealed_pair: tuple[SealedKeystore, bytes, KeystoreContent],
) -> None:
    sealed, _, content = sealed_pair
    back = keystore.decode_sealed(keystore.encode_sealed(sealed))
    assert back == sealed
    assert keystore.open_content(back, keystore.unwrap_key(back, PASSPHRASE)) == content


def test_reseal_keeps_the_wrapping_and_replaces_the_content(
    sealed_pair: tuple[SealedKeystore, bytes, KeystoreContent],
) -> None:
    sealed, key, content = sealed_pair
    grown = KeystoreContent(sign_seed=content.sign_seed, box_sk=nacl.utils.random(32))
    resealed = keystore.reseal(sealed, key, grown)
    assert (resealed.kdf, resealed.wrapped_key) == (sealed.kdf, sealed.wrapped_key)
    assert resealed.sealed != sealed.sealed
    assert keystore.open_content(resealed, keystore.unwrap_key(resealed, PASSPHRASE)) == grown


@settings(max_examples=10, deadline=None)
@given(passphrase=st.text(min_size=1, max_size=64))
def test_any_unicode_passphrase_round_trips(passphrase: str) -> None:
    content = KeystoreContent(sign_seed=b"\x01" * 32, box_sk=b"\x02" * 32)
    sealed, key = keystore.seal_new(content, passphrase, TEST)
    assert keystore.unwrap_key(sealed, passphrase) == key
    assert keystore.open_content(sealed, key) == content


# --- SO-2: what the server stores is useless without the passphrase --------------------------


@pytest.mark.objective("SO-2")
@pytest.mark.parametrize(
    "wrong",
    ["", PASSPHRASE[:-1], PASSPHRASE + " ", PASSPHRASE.upper(), "correct horse battery staple"],
    ids=["empty", "truncated", "trailing-space", "upper-case", "prefix"],
)
def test_wrong_passphrase_is_a_crypto_error(
    sealed_pair: tuple[SealedKeystore, bytes, KeystoreContent], wrong: str
) -> None:
    sealed, _, _ = sealed_pair
    with pytest.raises(CryptoError):
        keystore.unwrap_key(sealed, wrong)


@pytest.mark.objective("SO-2")
def test_wrong_keystore_key_is_a_crypto_error(
    sealed_pair: tuple[SealedKeystore, bytes, KeystoreContent],
) -> None:
    sealed, key, _ = sealed_pair
    for bad_key in (nacl.utils.random(32), _flip(key, 0), key[:-1], b""):
        with pytest.raises(CryptoError):
            keystore.open_content(sealed, bad_key)


@pytest.mark.objective("SO-2")
@settings(max_examples=40, deadline=None)
@given(pos=st.integers(min_value=0))
def test_tampered_wrapped_key_is_a_crypto_error(pos: int) -> None:
    sealed, _ = keystore.seal_new(_content(), PASSPHRASE, TEST)
    tampered = msgspec.structs.replace(sealed, wrapped_key=_flip(sealed.wrapped_key, pos))
    with pytest.raises(CryptoError):
        keystore.unwrap_key(tampered, PASSPHRASE)


@pytest.mark.objective("SO-2")
@settings(max_examples=60, deadline=None)
@given(pos=st.integers(min_value=0))
def test_tampered_sealed_content_is_a_crypto_error(pos: int) -> None:
    sealed, key = keystore.seal_new(_content(), PASSPHRASE, TEST)
    tampered = msgspec.structs.replace(sealed, sealed=_flip(sealed.sealed, pos))
    with pytest.raises(CryptoError):
        keystore.open_content(tampered, key)


@pytest.mark.objective("SO-2")
@pytest.mark.parametrize(
    "change",
    [
        {"salt": b"\x00" * nacl.pwhash.argon2id.SALTBYTES},
        {"salt": b"short"},
        {"opslimit": KdfProfile.INSECURE_TEST.value[0] + 1},
        {"memlimit": KdfProfile.INSECURE_TEST.value[1] * 2},
        {"alg": "argon2i13"},
        {"alg": "none"},
    ],
    ids=["salt", "short-salt", "opslimit", "memlimit", "alg-argon2i", "alg-none"],
)
def test_tampered_kdf_parameters_are_a_crypto_error(
    sealed_pair: tuple[SealedKeystore, bytes, KeystoreContent], change: dict[str, object]
) -> None:
    sealed, _, _ = sealed_pair
    tampered = msgspec.structs.replace(sealed, kdf=msgspec.structs.replace(sealed.kdf, **change))
    with pytest.raises(CryptoError):
        keystore.unwrap_key(tampered, PASSPHRASE)


@pytest.mark.objective("SO-2")
def test_sealed_keystore_holds_no_private_material_in_clear(
    sealed_pair: tuple[SealedKeystore, bytes, KeystoreContent],
) -> None:
    sealed, key, content = sealed_pair
    stored = keystore.encode_sealed(sealed)
    secrets = [content.sign_seed, content.box_sk, key]
    for secret in secrets:
        assert secret not in stored
        assert secret.hex().encode() not in stored
    assert PASSPHRASE.encode() not in stored
    for text in (repr(sealed), repr(content)):
        for secret in secrets:
            assert secret.hex() not in text
            assert repr(secret) not in text


@pytest.mark.objective("SO-2")
def test_each_seal_uses_a_fresh_salt_and_key() -> None:
    content = _content()
    a, key_a = keystore.seal_new(content, PASSPHRASE, TEST)
    b, key_b = keystore.seal_new(content, PASSPHRASE, TEST)
    assert a.kdf.salt != b.kdf.salt
    assert key_a != key_b
    assert a.wrapped_key != b.wrapped_key
    assert a.sealed != b.sealed
    with pytest.raises(CryptoError):
        keystore.open_content(a, key_b)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"not a keystore",
        msgspec.msgpack.encode({"v": 1}),
        msgspec.msgpack.encode([1, 2]),
    ],
)
def test_damaged_keystore_files_are_a_crypto_error(data: bytes) -> None:
    with pytest.raises(CryptoError):
        keystore.decode_sealed(data)


@pytest.mark.parametrize("damage", ["bad-utf8", "nested"])
def test_hostile_keystore_files_are_a_crypto_error(
    sealed_pair: tuple[SealedKeystore, bytes, KeystoreContent], damage: str
) -> None:
    good = keystore.encode_sealed(sealed_pair[0])
    if damage == "bad-utf8":
        data = good.replace(b"\xaaargon2id13", b"\xaaargon2id1\xff")
        assert data != good
    else:
        data = b"\x81\xa1z" + b"\x91" * 5000 + b"\xc0"
    with pytest.raises(CryptoError):
        keystore.decode_sealed(data)


# --- the Argon2id floor ---------------------------------------------------------------------


@pytest.mark.objective("SO-2")
def test_moderate_profile_is_libsodiums_moderate() -> None:
    ops, mem = KdfProfile.MODERATE.value
    assert ops == nacl.pwhash.argon2id.OPSLIMIT_MODERATE == 3
    assert mem == nacl.pwhash.argon2id.MEMLIMIT_MODERATE == 256 * 1024 * 1024
    params = keystore.new_kdf_params()
    assert (params.alg, params.opslimit, params.memlimit) == ("argon2id13", ops, mem)
    assert len(params.salt) == nacl.pwhash.argon2id.SALTBYTES
    assert inspect.signature(keystore.seal_new).parameters["profile"].default is KdfProfile.MODERATE
    # The test profile really is cheaper, and is never the default.
    assert KdfProfile.INSECURE_TEST.value < KdfProfile.MODERATE.value


@pytest.mark.objective("SO-2")
def test_seal_new_defaults_to_moderate_and_records_it() -> None:
    # One real MODERATE derivation (about a second and 256 MiB): the default is the floor.
    content = _content()
    sealed, key = keystore.seal_new(content, PASSPHRASE)
    assert sealed.kdf.alg == "argon2id13"
    assert sealed.kdf.opslimit == nacl.pwhash.argon2id.OPSLIMIT_MODERATE
    assert sealed.kdf.memlimit == nacl.pwhash.argon2id.MEMLIMIT_MODERATE
    # The recorded parameters survive the file format, so a later client derives the same key.
    assert keystore.decode_sealed(keystore.encode_sealed(sealed)).kdf == sealed.kdf
    assert keystore.open_content(sealed, key) == content
