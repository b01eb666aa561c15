"""`cozy account …`: signup, restore, recover, passphrase, login, password, sessions.
(`rotate-keys` is in `_cli_rotate_keys`, `agents` in `_cli_agents`.)"""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import trio

from clientkit._cli_session import (
    CliError,
    Unlocked,
    _connected,
    _log_in,
    _passphrase,
    _password,
    _pin,
    _Progress,
    _secret,
    _session,
    _unlock,
    _unlock_with_passphrase,
)
from clientkit._client import connect
from clientkit._home import Home, Profile, kdf_profile
from clientkit._passphrase import WeakPassphrase, check_passphrase
from clientkit.errors import RelayRefused
from model import keystore, recovery, wire
from model._crypto import CryptoError

if TYPE_CHECKING:
    import argparse


def _new_passphrase(handle: str, login_password: str, env: str = "COZY_PASSPHRASE") -> str:
    passphrase = _secret(env, "encryption passphrase (15+ characters, not your login password)")
    try:
        check_passphrase(passphrase, handle=handle, login_password=login_password)
    except WeakPassphrase as exc:
        raise CliError(str(exc)) from None
    return passphrase


def _show_recovery_code(code: str) -> None:
    print(
        "\nYour recovery code — shown once, never sent to the relay. Write it down and keep it\n"
        "offline. It is the only way back in if you forget your encryption passphrase\n"
        "(`cozy account recover`); without both, your keys and messages are gone for good.\n\n"
        f"    {code}\n"
    )


async def _seal_new(
    content: keystore.KeystoreContent, passphrase: str, recovery_code: str
) -> tuple[keystore.SealedKeystore, bytes]:
    """`keystore.seal_new` in a worker thread (Argon2id): `content` under a fresh keystore key,
    wrapped by the passphrase and by the recovery code. Returns the sealed keystore and its key."""
    return await trio.to_thread.run_sync(
        partial(
            keystore.seal_new,
            content,
            passphrase,
            kdf_profile(),
            recovery_key=recovery.recovery_key(recovery.parse_code(recovery_code)),
        )
    )


async def cmd_signup(args: argparse.Namespace) -> None:
    home = Home.from_env()
    if home.has_keystore():
        raise CliError(f"{home.path} already holds an account; use another COZY_HOME")
    password = _password()
    passphrase = _new_passphrase(args.handle, password)
    sign = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    content = keystore.KeystoreContent(sign_seed=bytes(sign), box_sk=bytes(box))
    code = recovery.new_recovery_code()
    print("sealing your keystore (Argon2id)…", file=sys.stderr)
    sealed, _ = await _seal_new(content, passphrase, code)
    async with connect(args.relay) as client:
        account_id = await client.signup(
            args.handle,
            password,
            sign,
            bytes(box.public_key),
            sealed_keystore=keystore.encode_sealed(sealed),
        )
        reply = await client.login(args.handle, password)
        home.save_keystore(sealed)
        home.save_profile(
            Profile(
                relay_url=args.relay,
                handle=args.handle,
                account_id=account_id,
                relay_pk=client.relay_pk.hex(),
                token=reply.token,
                token_expires_at=reply.expires_at,
                keystore_version=1,
            )
        )
    print(f"signed up as {args.handle} ({account_id}); keys are in {home.path}")
    _show_recovery_code(code)
    print("next: cozy collab create NAME")


async def cmd_restore(args: argparse.Namespace) -> None:
    """A new device: log in, fetch the sealed keystore, open it with the passphrase."""
    home = Home.from_env()
    if home.has_keystore():
        raise CliError(f"{home.path} already holds an account; restore into an empty COZY_HOME")
    step = _Progress(4)
    password = _password()  # before connecting: see _password_for
    step("connecting and logging in")
    async with connect(args.relay) as client:
        reply = await client.login(args.handle, password)
        step("fetching the sealed keystore")
        stored = await client.fetch_keystore()
        sealed = keystore.decode_sealed(stored.blob)
        step("unsealing it with your passphrase (Argon2id, about a second)")
        try:
            key = await trio.to_thread.run_sync(keystore.unwrap_key, sealed, _passphrase())
            keys = keystore.open_content(sealed, key)
        except CryptoError:
            raise CliError("wrong passphrase: nothing was written to this device") from None
        if (
            bytes(nacl.signing.SigningKey(keys.sign_seed).verify_key)
            != (await client.account(reply.account_id)).sign_pk
        ):
            raise CliError("the stored keystore does not hold this account's key; refusing it")
        step("saving to this device")
        home.save_keystore(sealed)
        home.save_profile(
            Profile(
                relay_url=args.relay,
                handle=args.handle,
                account_id=reply.account_id,
                relay_pk=client.relay_pk.hex(),
                token=reply.token,
                token_expires_at=reply.expires_at,
                keystore_version=stored.version,
            )
        )
    print(f"restored {args.handle} on this device; its collabs' keys come from their ledgers")


async def cmd_recover(args: argparse.Namespace) -> None:
    """Open the keystore with the recovery code and set a new passphrase."""
    home = Home.from_env()
    local = home.load_profile() if home.has_keystore() else None
    relay_url = args.relay or (local.relay_url if local else None)
    handle = args.handle or (local.handle if local else None)
    if relay_url is None or handle is None:
        raise CliError("give --relay URL and --handle H (this device holds no account)")
    try:
        secret = recovery.parse_code(_secret("COZY_RECOVERY_CODE", "recovery code"))
    except recovery.InvalidRecoveryCode as exc:
        raise CliError(str(exc)) from None
    password = _password()
    async with connect(relay_url, pinned_relay_pk=_pin(local) if local else None) as client:
        reply = await client.login(handle, password)
        stored = await client.fetch_keystore()
        sealed = keystore.decode_sealed(stored.blob)
        try:
            key = keystore.unwrap_with_recovery(sealed, recovery.recovery_key(secret))
            keys = keystore.open_content(sealed, key)
        except CryptoError:
            raise CliError("that recovery code does not open this account's keystore") from None
        new_passphrase = _new_passphrase(handle, password, env="COZY_NEW_PASSPHRASE")
        print("re-sealing with the new passphrase (Argon2id)…", file=sys.stderr)
        resealed = await trio.to_thread.run_sync(
            keystore.rewrap_passphrase, sealed, key, new_passphrase, kdf_profile()
        )
        profile = Profile(
            relay_url=relay_url,
            handle=handle,
            account_id=reply.account_id,
            relay_pk=client.relay_pk.hex(),
            token=reply.token,
            token_expires_at=reply.expires_at,
            keystore_version=stored.version,
        )
        me = Unlocked(home, profile, sealed, key, keys)
        me.replace_sealed(resealed)
        await me.sync_keystore(client)
    print("new passphrase set; the old one no longer opens your keystore (here or on the relay)")


async def cmd_change_passphrase(_args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    password = _password()
    new_passphrase = _new_passphrase(me.profile.handle, password, env="COZY_NEW_PASSPHRASE")
    resealed = await trio.to_thread.run_sync(
        keystore.rewrap_passphrase, me.sealed, me.keystore_key, new_passphrase, kdf_profile()
    )
    async with connect(me.profile.relay_url, pinned_relay_pk=_pin(me.profile)) as client:
        await _session(client, me.home, me.profile, password)
        me.replace_sealed(resealed)
        await me.sync_keystore(client)
    print("passphrase changed; your account keys are unchanged")


async def cmd_login(args: argparse.Namespace) -> None:
    home = Home.from_env()
    profile = home.load_profile()
    pinned = None if args.repin else _pin(profile)
    async with connect(profile.relay_url, pinned_relay_pk=pinned) as client:
        reply = await _log_in(client, profile.handle)
        if args.repin and client.relay_pk.hex() != profile.relay_pk:
            print(
                f"re-pinned the relay key: {profile.relay_pk[:16]}… → {client.relay_pk.hex()[:16]}…"
                " (do this only when the operator told you the key changed)",
                file=sys.stderr,
            )
            profile.relay_pk = client.relay_pk.hex()
    profile.token, profile.token_expires_at = reply.token, reply.expires_at
    home.save_profile(profile)
    print(f"logged in as {profile.handle}; session valid until {time.ctime(reply.expires_at)}")


async def cmd_account_password(_args: argparse.Namespace) -> None:
    """Change the login password: a request signed by the account key, so it needs the
    passphrase as well. Every other session of the account ends."""
    me, passphrase = await _unlock_with_passphrase(Home.from_env())
    new_password = _secret("COZY_NEW_PASSWORD", "new login password (12+ characters)")
    if new_password == passphrase:
        raise CliError(
            "that is your encryption passphrase: the login password must be a different"
            " secret (the relay checks the password; it must never learn the passphrase)"
        )
    async with _connected(me) as client:
        try:
            reply = await client.change_password(new_password)
        except RelayRefused as exc:
            if exc.code is wire.ErrorCode.INVALID_REQUEST:
                raise CliError(exc.message) from None
            raise
    me.profile.token, me.profile.token_expires_at = reply.token, reply.expires_at
    me.home.save_profile(me.profile)
    print(
        "login password changed; every other session of your account was ended (other devices"
        " log in again with the new password)"
    )


async def cmd_account_sessions(args: argparse.Namespace) -> None:
    """End every session of the account (signed by the account key): every token issued so
    far, on every device, stops working at once."""
    if not args.end_all:
        raise CliError(
            "sessions are stateless tokens and are not listed; `cozy account sessions"
            " --end-all` ends all of them (change the password too if it may be known)"
        )
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        await client.end_sessions()
    me.profile.token, me.profile.token_expires_at = None, 0
    me.home.save_profile(me.profile)
    print(
        "every session of your account was ended, this device's too; the next command logs in"
        " again with your login password"
    )
