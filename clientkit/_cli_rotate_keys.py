"""`cozy account rotate-keys`: replace an account's keys after a suspected compromise
(ADR-0017), resumable step by step."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import msgspec
import nacl.public
import nacl.signing

from clientkit import _collab
from clientkit._cli_accounts import _seal_new, _show_recovery_code
from clientkit._cli_session import (
    CliError,
    Unlocked,
    _password_for,
    _pin,
    _read,
    _session,
    _unlock_with_passphrase,
)
from clientkit._client import Client, connect
from clientkit._collab import fingerprint
from clientkit._home import Home
from clientkit.errors import RelayRefused
from model import keystore, recovery

if TYPE_CHECKING:
    import argparse


async def cmd_rotate_keys(args: argparse.Namespace) -> None:
    """Replace this account's keys after a suspected compromise (ADR-0017).

    Steps, each safe to repeat: (1) new keys, sealed with the current passphrase under a fresh
    keystore key and a new recovery code, saved here; (2) the relay's directory moves to the
    new keys (signed by the old and the new key), storing that keystore; (3) in every collab a
    `rekey` proof, signed by the old key, re-pins the new keys and rotates the collab key;
    (4) the old signing seed is dropped from the keystore. An interrupted run is finished by
    running the command again: it starts where the keystore and the relay say it stopped.
    """
    home = Home.from_env()
    me, passphrase = await _unlock_with_passphrase(home)
    resuming = me.rotating
    if not resuming:
        _confirm_rotation(args)
        code = recovery.new_recovery_code()
        old_seed, old_box = me.keys.sign_seed, me.keys.box_sk
        new_sign = nacl.signing.SigningKey.generate()
        new_box = nacl.public.PrivateKey.generate()
        retired = keystore.RetiredKeys(bytes(nacl.signing.SigningKey(old_seed).verify_key), old_box)
        content = keystore.KeystoreContent(
            sign_seed=bytes(new_sign),
            box_sk=bytes(new_box),
            retired=[*me.keys.retired, retired],
            rotating_from=old_seed,
        )
        print("[1/4] sealing new keys with your passphrase (Argon2id)…", file=sys.stderr)
        sealed, key = await _seal_new(content, passphrase, code)
        # Shown before anything is stored: a run interrupted later keeps this code valid (the
        # keystore it opens is the one saved next); one interrupted before the save never
        # used it, and the next run prints another.
        _show_recovery_code(code)
        print("(it replaces your old recovery code, which opens only the old keys)\n")
        me.adopt(sealed, key, content)
    else:
        print("resuming the unfinished key rotation of this account", file=sys.stderr)
    old_key = nacl.signing.SigningKey(me.keys.rotating_from)
    old_box_pk = bytes(nacl.public.PrivateKey(me.keys.retired[-1].box_sk).public_key)
    new_pair = (bytes(me.signing_key.verify_key), bytes(me.box_key.public_key))
    password = _password_for(me.profile)
    async with connect(me.profile.relay_url, pinned_relay_pk=_pin(me.profile)) as client:
        await _session(client, me.home, me.profile, password)
        client.on_receipt = me.home.state.add_receipt
        client.checkpoints.store = me.home.state
        print("[2/4] replacing your keys in the relay's directory…", file=sys.stderr)
        await _rotate_in_directory(client, me, old_key, old_box_pk, new_pair)
        ids = sorted({*await client.collabs(), *me.home.state.collabs()})
        print(f"[3/4] re-pinning your keys in {len(ids)} collab(s)…", file=sys.stderr)
        failed: list[str] = []
        for collab_id in ids:
            outcome = await _repin(client, me, old_key, collab_id)
            print(f"  {collab_id}: {outcome}", file=sys.stderr)
            if outcome.startswith("NOT"):
                failed.append(collab_id)
        if failed:
            raise CliError(
                f"{len(failed)} collab(s) still pin your old key ({', '.join(failed)}); run"
                " `cozy account rotate-keys` again to retry them (the rotation stays unfinished)"
            )
        print("[4/4] dropping the old signing key from your keystore…", file=sys.stderr)
        done = msgspec.structs.replace(me.keys, rotating_from=b"")
        me.keys = done
        me.replace_sealed(keystore.reseal(me.sealed, me.keystore_key, done))
        await me.sync_keystore(client)
    print(
        "your account keys are replaced: new fingerprint"
        f" {fingerprint(*new_pair)}. The old keys can no longer post, change anything or read"
        " what is sealed from now on; tell your collabs' members to expect the new fingerprint"
    )


def _confirm_rotation(args: argparse.Namespace) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CliError("rotating the account keys needs --yes when not run interactively")
    print(
        "This replaces your account keys in every collab, rotates each collab's key and gives"
        " you a NEW recovery code (the old one stops mattering)."
    )
    if input("Type 'rotate' to go on: ").strip() != "rotate":
        raise CliError("not confirmed: nothing was changed")


async def _rotate_in_directory(
    client: Client,
    me: Unlocked,
    old_key: nacl.signing.SigningKey,
    old_box_pk: bytes,
    new_pair: tuple[bytes, bytes],
) -> None:
    """Step 2: the relay's directory moves from the old keys to the new ones (or already has)."""
    info = await client.account(me.profile.account_id)
    registered = (info.sign_pk, info.box_pk)
    if registered == new_pair:  # done by an earlier run whose reply was lost: adopt the
        await me.sync_keystore(client)  # version it stored (our own keystore)
        return
    if registered != (bytes(old_key.verify_key), old_box_pk):
        raise CliError(
            "the relay's directory holds keys for your account that are neither your old nor"
            " your new ones: someone who has your old key rotated them first. Nothing more was"
            " changed. Tell your collabs' owners to remove this account, and report it to the"
            " relay's operator"
        )
    version = me.profile.keystore_version + 1
    try:
        await client.rotate_account_keys(
            old_key,
            old_box_pk,
            me.signing_key,
            new_pair[1],
            version,
            keystore.encode_sealed(me.sealed),
        )
    except RelayRefused as exc:
        raise CliError(
            f"the relay refused the key rotation: {exc.message}. Run `cozy account"
            " rotate-keys` again to retry"
        ) from None
    me.profile.keystore_version, me.profile.keystore_synced = version, True
    me.home.save_profile(me.profile)


async def _repin(
    client: Client, me: Unlocked, old_key: nacl.signing.SigningKey, collab_id: str
) -> str:
    """Step 3 for one collab: a `rekey` signed by the old key, unless it pins the new one."""
    try:
        view = await _read(client, me, collab_id)
    except CliError:
        return "skipped: you are not a member"
    pinned = None if view.membership is None else view.membership.members.get(view.account_id)
    if pinned is None:
        return "skipped: you are not a member"
    if pinned.sign_pk == bytes(me.signing_key.verify_key):
        return "already pins your new keys"
    if pinned.sign_pk != bytes(old_key.verify_key):
        return (
            "NOT re-pinned: it pins a key from before an earlier rotation that this device no"
            " longer holds; ask an owner to remove and re-add you"
        )
    new_box_pk = bytes(me.box_key.public_key)
    try:
        ack, _ = await me.session_on(client).manage(
            collab_id, lambda v: _collab.rekey(v, me.signing_key, new_box_pk), signing_key=old_key
        )
    except RelayRefused as exc:
        return f"NOT re-pinned: {exc.message}"
    return f"re-pinned at seq {ack.seq}; the collab key rotated"
