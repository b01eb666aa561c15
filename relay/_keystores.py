"""The relay's floor for stored keystores (SO-2; issue 13, item 10).

A keystore's KDF header is plaintext, so a database thief would crack the cheaply sealed ones
first. The relay reads the header (`model.keystore.kdf_header`, pure) and refuses to store a
keystore sealed below Argon2id MODERATE — at sign-up and on every `put_keystore` — so every
stored keystore costs a thief the same. The documented test profile is accepted only where the
relay's own configuration says so (`allow_test_kdf`, `COZY_ALLOW_TEST_KDF`; never by default,
not in `cozy dev`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model import wire
from model._crypto import CryptoError
from model.keystore import check_kdf_floor, kdf_header
from relay._context import RequestRefused

if TYPE_CHECKING:
    from relay.config import RelayConfig


def check_stored_kdf(blob: bytes, config: RelayConfig) -> None:
    """Refuse (`weak_keystore`) unless `blob` is a keystore sealed at or above the floor."""
    try:
        params = kdf_header(blob)
        check_kdf_floor(params, allow_test_profile=config.allow_test_kdf)
    except CryptoError as exc:
        raise RequestRefused(
            wire.ErrorCode.WEAK_KEYSTORE,
            f"{exc}. Nothing was stored: seal it again with a current client"
            " (`cozy account passphrase` re-seals at MODERATE)",
        ) from None
