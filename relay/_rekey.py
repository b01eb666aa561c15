"""Account key rotation on the relay (`cozy account rotate-keys`, ADR-0017).

Two surfaces, both decided here so the request handlers only move data:

- **The directory.** `RotateAccountKeys` (people only: model/authz.py) replaces the account's
  registered keys. The old registered key signs the change (the authority), the new key signs
  it too (possession), and the keystore stored with it is signed by the new key. The account row and the keystore change
  in one transaction, compare-and-set on the old keys; afterwards every connection of the
  account is re-bound to the new keys, so nothing signed by the old key is accepted again.
- **Appends.** Every event is verified under the session account's *registered* key — except a
  `rekey` management event, which must be signed by the key its collab's fold pins so far (the
  old one) and must re-pin *exactly* the registered keys. The directory is rotated first, so a
  thief who kept the old key cannot re-pin the account to keys of their own at an honest relay.
  The sequencer still checks the signer against the fold (`signer_key`), and it refuses content
  whose registered key is not the one the fold pins (a collab not re-pinned yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ledger import KeystoreRow
from ledger.errors import KeysChanged, StaleVersion
from model import wire
from model._crypto import verify
from model.membership import RekeyMember
from model.proofs import KeyPair, account_rekey_bytes, verify_keystore_write
from relay._context import RequestRefused, require_public_keys

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from model.membership import Operation


def append_key(op: Operation, registered: KeyPair) -> bytes:
    """The key a `mgmt` event making the change `op` must verify under, for an author whose
    directory keys are `registered`: the registered signing key, or for a `rekey` the old key it
    names (which the sequencer then checks against the fold's pin). Raises `RequestRefused` for
    a `rekey` that does not re-pin exactly the registered keys."""
    if not isinstance(op, RekeyMember):
        return registered.sign_pk
    if KeyPair(op.sign_pk, op.box_pk) != registered:
        raise RequestRefused(
            wire.ErrorCode.UNAUTHORIZED,
            "a rekey must pin exactly your account's registered keys: rotate them in the"
            " directory first (`cozy account rotate-keys` does both); nothing was stored",
        )
    return op.old_sign_pk


async def rotate_account_keys(
    db: Callable[..., Awaitable[object]],
    rotate: Callable[[str, tuple[bytes, bytes], tuple[bytes, bytes], KeystoreRow], None],
    account_id: str,
    registered: KeyPair,
    req: wire.RotateAccountKeys,
    *,
    check_keystore: Callable[[bytes], None] | None = None,
) -> KeyPair:
    """Check and store a directory rotation; return the new keys. `db(rotate, …)` runs the
    ledger call in a worker thread; `check_keystore`, once every signature held, refuses a
    keystore below the relay's KDF floor (relay/_keystores.py). Raises `RequestRefused`."""
    new = KeyPair(req.sign_pk, req.box_pk)
    require_public_keys(new.sign_pk, new.box_pk)
    if new.sign_pk == registered.sign_pk or new.box_pk == registered.box_pk:
        raise RequestRefused(
            wire.ErrorCode.INVALID_REQUEST, "a rotation replaces both keys with new ones"
        )
    try:
        statement = account_rekey_bytes(
            account_id, registered, new, req.keystore_version, req.keystore
        )
    except ValueError:
        raise RequestRefused(wire.ErrorCode.INVALID_REQUEST, "bad keystore version") from None
    if not verify(registered.sign_pk, statement, req.old_sig):
        raise RequestRefused(
            wire.ErrorCode.BAD_SIGNATURE,
            "a key rotation must be signed by your account's current key",
        )
    if not verify(new.sign_pk, statement, req.new_sig):
        raise RequestRefused(
            wire.ErrorCode.BAD_SIGNATURE,
            "a key rotation must be signed by the new key too (proof of possession)",
        )
    if not req.keystore or not verify_keystore_write(
        new.sign_pk, account_id, req.keystore_version, req.keystore, req.keystore_sig
    ):
        raise RequestRefused(
            wire.ErrorCode.BAD_SIGNATURE,
            "the keystore stored with new keys must be signed by the new key",
        )
    if check_keystore is not None:
        check_keystore(req.keystore)
    row = KeystoreRow(req.keystore_version, req.keystore, req.keystore_sig)
    try:
        await db(rotate, account_id, registered, new, row)
    except KeysChanged:
        raise RequestRefused(
            wire.ErrorCode.STALE,
            "your account's keys changed meanwhile (another rotation got there first);"
            " nothing was stored",
        ) from None
    except StaleVersion as exc:
        raise RequestRefused(
            wire.ErrorCode.STALE,
            f"the stored keystore is version {exc.current}; seal the new one as version"
            f" {exc.current + 1}",
        ) from None
    return new
