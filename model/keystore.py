"""The sealed keystore: an account's private keys, sealed so only the passphrase opens them.

Layout: the private material is sealed (XSalsa20-Poly1305 secretbox) under a random 32-byte
keystore key; that key is wrapped twice: under a key derived from the encryption passphrase with
Argon2id, and under a key derived from the recovery code (see model/recovery.py). Changing the
passphrase or recovering replaces only the passphrase wrap; the keystore key and the account
keys stay the same. Rotating the account keys (ADR-0017) seals a new keystore under a *fresh*
keystore key and a new recovery code, so an old copy's secrets open none of what follows.
The KDF parameters travel with the keystore, in plaintext, so a later client can open it.

Cost bounds, checked on both sides (SO-2):
- sealing: only the named profiles exist — MODERATE, and the documented test profile that a
  caller must ask for by name; anything else is refused (`KdfCostRefused`);
- unwrapping: a client refuses to derive with parameters above MAX_OPSLIMIT / MAX_MEMLIMIT, so
  a hostile relay cannot plant a keystore that makes a device derive for minutes or exhaust
  its memory;
- storing: the relay reads the plaintext header with `kdf_header` (pure, no secret needed)
  and refuses a keystore below the floor (`check_kdf_floor`), so a database thief never finds
  a cheaply sealed keystore to crack first. The test profile passes only where the relay's
  own configuration allows it.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from model._crypto import CryptoError
from model.errors import DECODE_ERRORS

KEYSTORE_VERSION: Final = 1
KEY_BYTES: Final = nacl.secret.SecretBox.KEY_SIZE
# The most a client derives with (libsodium's SENSITIVE memory, a little over twice its passes):
# above MODERATE so a future, stronger default still opens, and bounded so it cannot hang or
# exhaust a device.
MAX_OPSLIMIT: Final = 10
MAX_MEMLIMIT: Final = 1024 * 1024 * 1024
KDF_ALG: Final = "argon2id13"


class KdfProfile(enum.Enum):
    """Named Argon2id cost profiles. MODERATE is the floor for real keystores."""

    MODERATE = (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE)
    # For tests only: cheap enough to run hundreds of times, far too cheap for real secrets.
    INSECURE_TEST = (nacl.pwhash.argon2id.OPSLIMIT_MIN, 8 * 1024 * 1024)


class KdfParams(msgspec.Struct, frozen=True):
    alg: str
    opslimit: int
    memlimit: int
    salt: bytes


class RetiredKeys(msgspec.Struct, frozen=True, array_like=True):
    """Keys an account had before a rotation (`cozy account rotate-keys`, ADR-0017): the public
    signing key, to recognise this account's own past `rekey` proofs, and the private box key,
    which still opens the epoch keys and DMs sealed to it before the rotation. The old signing
    seed is not kept: it signs nothing any more."""

    sign_pk: bytes
    box_sk: bytes

    def __repr__(self) -> str:
        return "RetiredKeys(<redacted>)"


class KdfCostRefused(CryptoError):
    """The keystore's KDF parameters are outside the accepted bounds: too cheap to protect a
    passphrase (below the floor), or too costly to derive safely (above the caps)."""


class _Header(msgspec.Struct):
    """The plaintext part of an encoded keystore that says how its passphrase wrap was made."""

    v: int
    kdf: KdfParams


def kdf_header(blob: bytes) -> KdfParams:
    """The KDF parameters an encoded keystore declares, read without any secret. Pure.

    Raises `CryptoError` when `blob` is not an encoded keystore.
    """
    try:
        return msgspec.msgpack.decode(blob, type=_Header).kdf
    except DECODE_ERRORS:
        raise CryptoError("the keystore is damaged or not a keystore") from None


def kdf_floor(*, allow_test_profile: bool = False) -> tuple[int, int]:
    """The least (opslimit, memlimit) accepted: MODERATE, or the test profile's when allowed."""
    profile = KdfProfile.INSECURE_TEST if allow_test_profile else KdfProfile.MODERATE
    ops, mem = profile.value
    return ops, mem


def check_kdf_floor(params: KdfParams, *, allow_test_profile: bool = False) -> None:
    """Refuse parameters below the floor or above the caps with `KdfCostRefused`. Pure.

    The floor is MODERATE (t=3, m=256 MiB) — both numbers, not a trade of one for the other —
    or, only with `allow_test_profile`, the documented test profile (t=1, m=8 MiB).
    """
    if params.alg != KDF_ALG:
        raise KdfCostRefused(f"keystores are sealed with {KDF_ALG}, not {params.alg[:32]!r}")
    least_ops, least_mem = kdf_floor(allow_test_profile=allow_test_profile)
    if params.opslimit < least_ops or params.memlimit < least_mem:
        raise KdfCostRefused(
            f"the keystore is sealed with Argon2id t={params.opslimit},"
            f" m={params.memlimit // (1024 * 1024)} MiB; the least accepted is t={least_ops},"
            f" m={least_mem // (1024 * 1024)} MiB (libsodium MODERATE)"
        )
    _check_kdf_caps(params)


def _check_kdf_caps(params: KdfParams) -> None:
    if params.opslimit > MAX_OPSLIMIT or params.memlimit > MAX_MEMLIMIT:
        # A keystore comes from the server on restore: never let it demand unbounded work.
        raise KdfCostRefused("the keystore asks for an unreasonable KDF cost; refusing to derive")


class KeystoreContent(msgspec.Struct):
    """The private material. Never logged: the repr shows only which collabs have keys."""

    sign_seed: bytes
    box_sk: bytes
    # Collab keys are not kept here: each epoch's key is wrapped to `box_sk` on the collab's
    # own ledger (model/membership.py), so the account keys alone restore every collab.
    # Keys from before each rotation, oldest first (to read the history sealed to them).
    retired: list[RetiredKeys] = msgspec.field(default_factory=list)
    # While a rotation is unfinished: the old signing seed. The collabs not yet re-pinned still
    # pin its key, and their `rekey` proofs must be signed with it. Emptied when every collab
    # is re-pinned.
    rotating_from: bytes = b""

    def __repr__(self) -> str:
        return "KeystoreContent(<keys redacted>)"


class SealedKeystore(msgspec.Struct, frozen=True):
    v: int
    kdf: KdfParams
    wrapped_key: bytes
    sealed: bytes
    recovery_wrap: bytes = b""

    def __repr__(self) -> str:
        return f"SealedKeystore(v={self.v}, kdf={self.kdf.alg}/{self.kdf.opslimit}/{self.kdf.memlimit})"


_encoder = msgspec.msgpack.Encoder()
_content_decoder = msgspec.msgpack.Decoder(KeystoreContent)


def derive_passphrase_key(passphrase: str, params: KdfParams) -> bytes:
    """Argon2id. Slow by design (≈0.5 s and 256 MiB at MODERATE): call it off the event loop."""
    if params.alg != KDF_ALG:
        raise CryptoError("unsupported keystore KDF")
    _check_kdf_caps(params)
    return nacl.pwhash.argon2id.kdf(
        KEY_BYTES,
        passphrase.encode("utf-8"),
        params.salt,
        opslimit=params.opslimit,
        memlimit=params.memlimit,
    )


def new_kdf_params(profile: KdfProfile = KdfProfile.MODERATE) -> KdfParams:
    """Fresh parameters for `profile`. Raises `KdfCostRefused` for anything but a named
    profile: no caller can seal with home-made, cheaper numbers."""
    if not isinstance(profile, KdfProfile):
        raise KdfCostRefused("seal with KdfProfile.MODERATE (or the named test profile)")
    ops, mem = profile.value
    return KdfParams(
        alg=KDF_ALG,
        opslimit=ops,
        memlimit=mem,
        salt=nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES),
    )


def seal_new(
    content: KeystoreContent,
    passphrase: str,
    profile: KdfProfile = KdfProfile.MODERATE,
    *,
    recovery_key: bytes | None = None,
) -> tuple[SealedKeystore, bytes]:
    """Seal `content` under a fresh keystore key wrapped by the passphrase (and, when given,
    by the recovery code's key). Returns the sealed keystore and the keystore key."""
    keystore_key = nacl.utils.random(KEY_BYTES)
    params, wrapped = _wrap_for_passphrase(keystore_key, passphrase, profile)
    recovery_wrap = b""
    if recovery_key is not None:
        recovery_wrap = bytes(nacl.secret.SecretBox(recovery_key).encrypt(keystore_key))
    sealed = SealedKeystore(
        v=KEYSTORE_VERSION,
        kdf=params,
        wrapped_key=wrapped,
        sealed=b"",
        recovery_wrap=recovery_wrap,
    )
    return reseal(sealed, keystore_key, content), keystore_key


def unwrap_with_recovery(sealed: SealedKeystore, recovery_key: bytes) -> bytes:
    """Recover the keystore key with the recovery code's key. Raises `CryptoError`."""
    if not sealed.recovery_wrap:
        raise CryptoError("this keystore has no recovery wrap")
    try:
        return nacl.secret.SecretBox(recovery_key).decrypt(sealed.recovery_wrap)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise CryptoError("the recovery code does not open this keystore") from None


def rewrap_passphrase(
    sealed: SealedKeystore,
    keystore_key: bytes,
    new_passphrase: str,
    profile: KdfProfile = KdfProfile.MODERATE,
) -> SealedKeystore:
    """Wrap the same keystore key under a new passphrase (fresh salt); the old one stops working."""
    params, wrapped = _wrap_for_passphrase(keystore_key, new_passphrase, profile)
    return msgspec.structs.replace(sealed, kdf=params, wrapped_key=wrapped)


def _wrap_for_passphrase(
    keystore_key: bytes, passphrase: str, profile: KdfProfile
) -> tuple[KdfParams, bytes]:
    """Fresh salt, Argon2id at `profile` (MODERATE unless the documented test profile is asked
    for: no weaker profile exists), then secretbox the keystore key under the derived key."""
    params = new_kdf_params(profile)
    wrapping = derive_passphrase_key(passphrase, params)
    return params, bytes(nacl.secret.SecretBox(wrapping).encrypt(keystore_key))


def unwrap_key(sealed: SealedKeystore, passphrase: str) -> bytes:
    """Recover the keystore key. Raises `CryptoError` for a wrong passphrase or damaged data."""
    try:
        wrapping = derive_passphrase_key(passphrase, sealed.kdf)
        return nacl.secret.SecretBox(wrapping).decrypt(sealed.wrapped_key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise CryptoError(
            "cannot unseal the keystore: wrong passphrase or damaged keystore"
        ) from None


def open_content(sealed: SealedKeystore, keystore_key: bytes) -> KeystoreContent:
    try:
        raw = nacl.secret.SecretBox(keystore_key).decrypt(sealed.sealed)
        return _content_decoder.decode(raw)
    except (nacl.exceptions.CryptoError, msgspec.DecodeError, ValueError, TypeError):
        raise CryptoError("cannot unseal the keystore: wrong key or damaged keystore") from None


def reseal(sealed: SealedKeystore, keystore_key: bytes, content: KeystoreContent) -> SealedKeystore:
    """The same wrapping, new sealed content (e.g. after a collab key was added)."""
    box = nacl.secret.SecretBox(keystore_key)
    return msgspec.structs.replace(sealed, sealed=bytes(box.encrypt(_encoder.encode(content))))


def encode_sealed(sealed: SealedKeystore) -> bytes:
    return _encoder.encode(sealed)


def decode_sealed(data: bytes) -> SealedKeystore:
    try:
        return msgspec.msgpack.decode(data, type=SealedKeystore)
    except DECODE_ERRORS:
        raise CryptoError("the keystore file is damaged or not a keystore") from None
