"""The people's CLI: `cozy account …`, `cozy collab …`, `cozy post`, `cozy tail`.

Non-interactive when COZY_HOME, COZY_PASSWORD (login password) and COZY_PASSPHRASE (keystore
passphrase) are set (COZY_NEW_PASSWORD / COZY_NEW_PASSPHRASE for the changes); otherwise it
prompts. Every change is signed with the account key, so it needs the passphrase: a login
session alone can only read. Exit codes: 0 ok, 1 refused or failed, 2 usage,
3 integrity alarm (the relay delivered something that does not verify).
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import nacl.public
import nacl.signing
import trio

from clientkit import _collab
from clientkit._agent import AgentCredentials, CredentialsError, save_credentials
from clientkit._client import Client, connect
from clientkit._collab import describe, fingerprint
from clientkit._home import Home, HomeError, Profile, kdf_profile
from clientkit._outbox import AuthorStream, Sent
from clientkit._passphrase import WeakPassphrase, check_passphrase
from clientkit.errors import (
    ClientError,
    ConnectionLost,
    EquivocationDetected,
    ForkDetected,
    IntegrityAlarm,
    RelayRefused,
    TamperDetected,
)
from model import artifacts, dm, equivocation, keystore, recovery, wire
from model import content as contentmod
from model._crypto import CryptoError, random_bytes
from model.envelope import seal_event
from model.epochs import NotARecipient
from model.ids import is_id, new_id
from model.membership import (
    CAP_POST,
    CAP_READ,
    CAP_TOOL_PREFIX,
    AddMember,
    Member,
    MemberKind,
    Role,
    SetCaps,
    valid_cap,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
    from typing import Any

    from model.envelope import SignedEvent
    from model.membership import Operation
    from model.view import CollabView, Entry

EXIT_FAILED = 1
EXIT_INTEGRITY = 3


class CliError(Exception):
    """A message for the user; printed without a traceback."""


def _secret(env: str, prompt: str) -> str:
    value = os.environ.get(env)
    if value:
        return value
    if not sys.stdin.isatty():
        raise CliError(f"set {env} or run interactively to be prompted for the {prompt}")
    return getpass.getpass(f"{prompt}: ")


def _password() -> str:
    return _secret("COZY_PASSWORD", "login password")


def _passphrase() -> str:
    return _secret("COZY_PASSPHRASE", "encryption passphrase")


@dataclass
class Unlocked:
    home: Home
    profile: Profile
    sealed: keystore.SealedKeystore
    keystore_key: bytes
    keys: keystore.KeystoreContent

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.keys.sign_seed)

    @property
    def box_key(self) -> nacl.public.PrivateKey:
        return nacl.public.PrivateKey(self.keys.box_sk)

    @property
    def past_box_keys(self) -> list[nacl.public.PrivateKey]:
        """Box keys from before each key rotation: they open what was sealed to them then."""
        return [nacl.public.PrivateKey(r.box_sk) for r in self.keys.retired]

    @property
    def own_sign_pks(self) -> list[bytes]:
        """Every signing key this account has had: a `rekey` to any other is an alarm."""
        return [bytes(self.signing_key.verify_key), *(r.sign_pk for r in self.keys.retired)]

    @property
    def rotating(self) -> bool:
        """A key rotation was started and not finished (`cozy account rotate-keys`)."""
        return bool(self.keys.rotating_from)

    def adopt(
        self, sealed: keystore.SealedKeystore, key: bytes, keys: keystore.KeystoreContent
    ) -> None:
        """Take a whole keystore (new keys after a rotation) as this device's, unsynced."""
        self.sealed, self.keystore_key, self.keys = sealed, key, keys
        self.replace_sealed(sealed)

    def replace_sealed(self, sealed: keystore.SealedKeystore) -> None:
        self.sealed = sealed
        self.home.save_keystore(sealed)
        self.profile.keystore_synced = False
        self.home.save_profile(self.profile)

    async def sync_keystore(self, client: Client) -> None:
        """Upload the local keystore as the next version, merging another device's first.

        The keystore key is the same on every device, so a newer stored keystore can be opened
        and its collab keys merged with ours before writing version n+1.
        """
        try:
            stored = await client.fetch_keystore()
        except RelayRefused as exc:
            if exc.code is not wire.ErrorCode.NOT_FOUND:
                raise
            stored = wire.Keystore(rid=0, version=0, blob=b"")
        if stored.version < self.profile.keystore_version:
            # Versions only go up on the relay; an older one means it rolled the keystore back.
            raise CliError(
                f"the relay served keystore version {stored.version}, but this device already "
                f"saw version {self.profile.keystore_version}: it may be rolling your keystore "
                "back. Nothing was changed; report this to the relay's operator"
            )
        if stored.version > self.profile.keystore_version:
            # Another device wrote a newer keystore (a new collab key, a new passphrase):
            # adopt its wrapping and merge its keys with ours.
            await self._merge_stored(client, stored)
        for _attempt in range(3):
            if self.profile.keystore_synced:
                return
            version = self.profile.keystore_version + 1
            try:
                await client.store_keystore(
                    self.signing_key, version, keystore.encode_sealed(self.sealed)
                )
            except RelayRefused as exc:
                if exc.code is not wire.ErrorCode.STALE:
                    raise
                await self._merge_stored(client, await client.fetch_keystore())
                continue
            self.profile.keystore_version, self.profile.keystore_synced = version, True
            self.home.save_profile(self.profile)
            return
        raise CliError("could not store the keystore on the relay (it kept changing); retry")

    async def _merge_stored(self, client: Client, stored: wire.Keystore) -> None:
        theirs_sealed = keystore.decode_sealed(stored.blob)
        try:
            theirs = keystore.open_content(theirs_sealed, self.keystore_key)
        except CryptoError:
            # Another device rotated the account keys (ADR-0017): a new keystore key, sealed
            # under the same passphrase. Adopt it only if it succeeds this device's keys.
            await self._adopt_rotated(client, stored, theirs_sealed)
            return
        if (theirs.sign_seed, theirs.box_sk) != (self.keys.sign_seed, self.keys.box_sk):
            raise CliError(
                "the keystore on the relay holds other account keys than this device; refusing"
                " to adopt it"
            )
        # Adopt their wrapping (it may carry a new passphrase) around the same keys, and the
        # rest of their content (a finished rotation drops the old signing seed).
        self.profile.keystore_version = stored.version
        self.sealed, self.keys = theirs_sealed, theirs
        self.home.save_keystore(self.sealed)
        self.profile.keystore_synced = True
        self.home.save_profile(self.profile)

    async def _adopt_rotated(
        self, client: Client, stored: wire.Keystore, sealed: keystore.SealedKeystore
    ) -> None:
        try:
            key = await trio.to_thread.run_sync(keystore.unwrap_key, sealed, _passphrase())
            theirs = keystore.open_content(sealed, key)
        except CryptoError:
            raise CliError(
                "the keystore on the relay is not one this device can open; refusing to merge"
            ) from None
        mine = bytes(self.signing_key.verify_key)
        registered = await client.account(self.profile.account_id)
        theirs_pk = bytes(nacl.signing.SigningKey(theirs.sign_seed).verify_key)
        if mine not in {r.sign_pk for r in theirs.retired} or theirs_pk != registered.sign_pk:
            raise CliError(
                "the keystore on the relay holds other account keys than this device, and not"
                " ones rotated from them; refusing to adopt it"
            )
        print(
            "this account's keys were rotated on another device; adopting the new keys",
            file=sys.stderr,
        )
        self.sealed, self.keystore_key, self.keys = sealed, key, theirs
        self.home.save_keystore(sealed)
        self.profile.keystore_version, self.profile.keystore_synced = stored.version, True
        self.home.save_profile(self.profile)


async def _unlock(home: Home) -> Unlocked:
    return (await _unlock_with_passphrase(home))[0]


async def _unlock_with_passphrase(home: Home) -> tuple[Unlocked, str]:
    profile = home.load_profile()
    sealed = home.load_keystore()
    passphrase = _passphrase()
    try:
        key = await trio.to_thread.run_sync(keystore.unwrap_key, sealed, passphrase)
        keys = keystore.open_content(sealed, key)
    except CryptoError:
        raise CliError("wrong passphrase (or a damaged keystore): nothing was changed") from None
    return Unlocked(home, profile, sealed, key, keys), passphrase


def _password_for(profile: Profile) -> str | None:
    """The login password when the stored session will not do, asked *before* connecting: the
    relay closes a connection that has not authenticated within its deadline (30 s by
    default), so nobody should be typing a password into an open one."""
    if _token_fresh(profile):
        return None
    return _password()


def _token_fresh(profile: Profile) -> bool:
    return bool(profile.token) and profile.token_expires_at > time.time() + 30


async def _session(
    client: Client, home: Home, profile: Profile, password: str | None = None
) -> None:
    """Reuse the stored session token; log in again with the password when it has expired
    (`password`, read by `_password_for` before connecting)."""
    if _token_fresh(profile) and profile.token:
        try:
            await client.authenticate(profile.token)
        except RelayRefused as exc:
            if exc.code is not wire.ErrorCode.UNAUTHENTICATED:
                raise
            if not os.environ.get("COZY_PASSWORD") and not sys.stdin.isatty():
                raise CliError(
                    "the relay refused this device's session: it was ended (every session of"
                    " the account was ended, or the login password changed), revoked (the"
                    " relay's signing key was rotated) or has expired. Run `cozy account login`"
                ) from None
        else:
            return
    reply = await _log_in(client, profile.handle, password)
    profile.token, profile.token_expires_at = reply.token, reply.expires_at
    home.save_profile(profile)


async def _log_in(client: Client, handle: str, password: str | None = None) -> wire.LoggedIn:
    """Log in with the password; a throttled handle gets a message saying what to do."""
    try:
        return await client.login(handle, _password() if password is None else password)
    except RelayRefused as exc:
        if exc.code is not wire.ErrorCode.RATE_LIMITED:
            raise
        raise CliError(
            f"login refused without checking the password: {exc.message}. Wait, then run "
            f"`cozy account login` again (a relay operator can lift the lock with "
            f"`cozy relay lockouts clear {handle}`)"
        ) from None


def _pin(profile: Profile) -> bytes:
    return bytes.fromhex(profile.relay_pk)


# --- commands -------------------------------------------------------------------------------


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
    sealed, _ = await trio.to_thread.run_sync(
        partial(
            keystore.seal_new,
            content,
            passphrase,
            kdf_profile(),
            recovery_key=recovery.recovery_key(recovery.parse_code(code)),
        )
    )
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
        sealed, key = await trio.to_thread.run_sync(
            partial(
                keystore.seal_new,
                content,
                passphrase,
                kdf_profile(),
                recovery_key=recovery.recovery_key(recovery.parse_code(code)),
            )
        )
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
        ack, _ = await client.manage(
            old_key,
            me.box_key,
            collab_id,
            lambda v: _collab.rekey(v, me.signing_key, new_box_pk),
            past_box_keys=me.past_box_keys,
            own_sign_pks=me.own_sign_pks,
        )
    except RelayRefused as exc:
        return f"NOT re-pinned: {exc.message}"
    return f"re-pinned at seq {ack.seq}; the collab key rotated"


class _Progress:
    """Numbered steps on stderr, for long operations."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._n = 0

    def __call__(self, what: str) -> None:
        self._n += 1
        print(f"[{self._n}/{self._total}] {what}…", file=sys.stderr, flush=True)


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


async def cmd_collab_create(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        collab_id, _key = await client.create_collab(me.signing_key, bytes(me.box_key.public_key))
        meta = contentmod.CollabMeta(name=args.name)
        await _post(client, me, collab_id, _sealer(me, collab_id, meta))
    print(collab_id)


@asynccontextmanager
async def _connected(me: Unlocked) -> AsyncIterator[Client]:
    if me.rotating:
        raise CliError(_UNFINISHED_ROTATION)
    password = _password_for(me.profile)
    async with connect(me.profile.relay_url, pinned_relay_pk=_pin(me.profile)) as client:
        await _session(client, me.home, me.profile, password)
        client.use_key(me.signing_key)  # changes (agents, uploads, tools…) are signed with it
        await me.sync_keystore(client)  # also notices a relay rolling the keystore back
        if me.rotating:  # adopted from another device that has not finished it
            raise CliError(_UNFINISHED_ROTATION)
        client.on_receipt = me.home.state.add_receipt
        yield client


_UNFINISHED_ROTATION = (
    "a key rotation of this account is unfinished: run `cozy account rotate-keys` to finish it"
    " (nothing else was done)"
)


async def _read(client: Client, me: Unlocked, collab_id: str) -> CollabView:
    """This device's own verified view of the collab (the whole history, folded)."""
    try:
        return await client.read(
            collab_id,
            me.box_key,
            past_box_keys=me.past_box_keys,
            own_sign_pks=me.own_sign_pks,
        )
    except RelayRefused as exc:
        if exc.code is wire.ErrorCode.UNAUTHORIZED:
            raise CliError(f"you are not a member of {collab_id} (or it does not exist)") from None
        raise


async def _post(
    client: Client,
    me: Unlocked,
    collab_id: str,
    seal: tuple[Callable[[CollabView, contentmod.Evidence], SignedEvent], bytes],
) -> Sent:
    """Post in this device's author stream (clientkit/_outbox.py): an event signed by an earlier
    run whose ack was never recorded is sent again first (the same bytes), and if it was made
    for this same content it is the answer (exactly once: a rerun after an interruption does
    not post twice). The new event is kept before it is sent, sealed against a freshly
    verified view; if the key rotated meanwhile, the relay bounces it and it is sealed again
    under the new key (`Client.seal_and_append`).

    If the connection is lost before the ack, the event may be stored: it is sent again on a
    new connection, the same signed bytes kept in the stream, never sealed anew while it may
    be stored (`_after_lost_ack`)."""
    sealer, intent = seal
    view = await _read(client, me, collab_id)
    stream = AuthorStream(me.home.state, collab_id, me.profile.device)
    try:
        return await stream.send(client, me.box_key, sealer, intent=intent, view=view)
    except ConnectionLost as exc:
        if exc.unacked is None:
            raise
        async with _after_lost_ack(me) as again:
            view = await _read(again, me, collab_id)
            return await stream.send(again, me.box_key, sealer, intent=intent, view=view)


@asynccontextmanager
async def _after_lost_ack(me: Unlocked) -> AsyncIterator[Client]:
    """A new connection for resending an event whose ack the lost one never delivered."""
    print(
        "the connection to the relay was lost before it confirmed; sending the same event"
        " again (if it was stored, the relay says so and nothing is stored twice)…",
        file=sys.stderr,
    )
    async with _connected(me) as client:
        yield client


def _sealer(
    me: Unlocked, collab_id: str, content: contentmod.Content, refs: tuple[str, ...] = ()
) -> tuple[Callable[[CollabView, contentmod.Evidence], SignedEvent], bytes]:
    """The sealing of `content` with its evidence, and the intent that names it (a rerun of
    the same command with the same content is the same intent)."""

    def seal(view: CollabView, evidence: contentmod.Evidence) -> SignedEvent:
        try:
            epoch, key = view.current_key()
        except NotARecipient:
            raise CliError(f"you are not a member of {collab_id} any more") from None
        return seal_event(
            signing_key=me.signing_key,
            collab_key=key,
            collab_id=collab_id,
            actor_id=view.account_id,
            kind=contentmod.kind_of(content),
            ts=evidence.clock,
            content=contentmod.encode_content(content, evidence),
            refs=refs,
            epoch=epoch,
        )

    intent = hashlib.sha256(
        b"\0".join(
            [
                b"post",
                collab_id.encode(),
                contentmod.encode_content(content),
                *map(str.encode, refs),
            ]
        )
    ).digest()
    return seal, intent


async def cmd_post(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        sent = await _post(
            client, me, args.collab, _sealer(me, args.collab, contentmod.Message(text=args.text))
        )
    print(f"posted as seq {sent.seq}{' (already posted)' if sent.earlier else ''}")


async def _member(client: Client, view: CollabView, handle: str) -> Member:
    """The member with this handle, with the keys *this device's fold* pinned for them."""
    info = await _lookup(client, handle)
    assert view.membership is not None
    member = view.membership.members.get(info.account_id)
    if member is None:
        raise CliError(f"{handle} is not a member of {view.collab_id}")
    return member


async def _lookup(client: Client, handle: str) -> wire.AccountInfo:
    try:
        return await client.lookup(handle)
    except RelayRefused as exc:
        if exc.code is wire.ErrorCode.NOT_FOUND:
            raise CliError(f"no account is called {handle!r} on this relay") from None
        raise


async def cmd_collab_add(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    kind = MemberKind.AGENT if args.agent else MemberKind.HUMAN
    caps = tuple(args.cap or ((CAP_READ, CAP_POST) if args.agent else ()))
    _check_caps(kind, caps)
    async with _connected(me) as client:
        info = await _lookup(client, args.handle)
        new = _collab.member_for(info, Role(args.role), kind, caps)  # refuses the wrong kind
        ack, _ = await _manage(client, me, args.collab, lambda v: _collab.add(v, new))
    print(
        f"added {args.handle} as {args.role} at seq {ack.seq}; their key fingerprint is"
        f" {fingerprint(info.sign_pk, info.box_pk)} — check it with them out of band"
    )


def _check_caps(kind: MemberKind, caps: tuple[str, ...]) -> None:
    bad = [c for c in caps if not valid_cap(c)]
    if bad:
        raise CliError(f"unknown capabilities {bad}: use read, post or tool:NAME")
    if kind is MemberKind.HUMAN and any(not c.startswith(CAP_TOOL_PREFIX) for c in caps):
        raise CliError(
            "people read and post by membership: give them only tool:NAME capabilities"
            " (--agent for a bot's account)"
        )


async def cmd_collab_grant(args: argparse.Namespace) -> None:
    """Grant (or with --revoke take back) capabilities of a member: tool:NAME for anyone, read
    and post for agents. A signed `caps` change (owners; managers for plain members)."""
    me = await _unlock(Home.from_env())
    caps = tuple(args.caps)
    async with _connected(me) as client:
        view = await _read(client, me, args.collab)
        target = await _member(client, view, args.handle)
        _check_caps(target.kind, caps)
        grant, revoke = ((), caps) if args.revoke else (caps, ())
        made: list[Operation] = []

        def change(v: CollabView) -> Operation:
            made.append(_collab.set_caps(v, target.account_id, grant=grant, revoke=revoke))
            return made[-1]

        ack, _ = await _manage(client, me, args.collab, change)
    after = made[-1]
    assert isinstance(after, SetCaps)
    print(
        f"{args.handle} has {', '.join(after.caps) or 'no capabilities'} in {args.collab}"
        f" (seq {ack.seq})"
    )


async def cmd_agent_create(args: argparse.Namespace) -> None:
    """Create a bot's account with fresh keys, add it to the collab with its capabilities (a
    proof signed by this human), and write its 0600 credential file."""
    me = await _unlock(Home.from_env())
    caps = tuple(args.cap or (CAP_READ, CAP_POST))
    bad = [c for c in caps if not valid_cap(c)]
    if bad:
        raise CliError(f"unknown capabilities {bad}: use read, post or tool:NAME")
    out = _free_path(args.out or f"{args.name}.cozy-agent")  # checked before anything is created
    sign = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    account_id = new_id("a")
    async with _connected(me) as client:
        created = await client.create_agent(
            account_id, args.name, bytes(sign.verify_key), bytes(box.public_key)
        )
        new = Member(
            account_id, Role.MEMBER, MemberKind.AGENT, bytes(sign.verify_key),
            bytes(box.public_key), caps,
        )  # fmt: skip
        ack, _ = await _manage(client, me, args.collab, lambda v: _collab.add(v, new))
    save_credentials(
        out,
        AgentCredentials(
            relay_url=me.profile.relay_url,
            relay_pk=me.profile.relay_pk,
            account_id=account_id,
            handle=args.name,
            collab_id=args.collab,
            sign_seed=bytes(sign),
            box_sk=bytes(box),
            token=created.token,
            expires_at=created.expires_at,
        ),
    )
    print(
        f"agent {args.name} added to {args.collab} at seq {ack.seq} with {', '.join(caps)};"
        f" its credentials are in {out} (mode 0600): give that file to the bot and nobody else"
    )


def _free_path(name: str) -> Path:
    path = Path(name)
    if path.exists():
        raise CliError(f"{path} exists; choose another --out or move it away first")
    return path


def _find_agent(agents: list[wire.AgentInfo], name_or_id: str) -> wire.AgentInfo:
    for agent in agents:
        if name_or_id in (agent.handle, agent.account_id):
            return agent
    raise CliError(
        f"no agent you created is called {name_or_id!r}: `cozy account agents` lists yours"
    )


async def cmd_agent_revoke(args: argparse.Namespace) -> None:
    """Kill the agent's tokens at once (a request signed by this account's key), then remove
    it from each collab given with --collab (rotating its key)."""
    name, collabs = args.agent, list(args.collab or ())
    if args.legacy is not None:  # the older form: cozy agent revoke COLLAB NAME
        if not is_id(args.agent, "c"):
            raise CliError("usage: cozy agent revoke NAME|ID [--collab COLLAB]")
        name, collabs = args.legacy, [args.agent, *collabs]
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        agent = _find_agent(await client.list_agents(), name)
        done = ["already revoked" if agent.revoked else "every token revoked"]
        if not agent.revoked:
            await client.revoke_agent(agent.account_id)
        for collab_id in collabs:
            view = await _read(client, me, collab_id)
            if view.membership is not None and agent.account_id in view.membership.members:
                ack, _ = await _manage(
                    client, me, collab_id, lambda v: _collab.remove(v, agent.account_id)
                )
                done.append(f"removed from {collab_id} at seq {ack.seq}, key rotated")
            else:
                done.append(f"not a member of {collab_id}")
    print(f"agent {agent.handle} ({agent.account_id}): {'; '.join(done)}")
    if not collabs:
        print(
            "its collabs can still show it as a member: remove it from each with"
            " `cozy collab remove COLLAB NAME` (which also rotates the key)",
            file=sys.stderr,
        )


async def cmd_account_agents(_args: argparse.Namespace) -> None:
    """The agents this account created (needs only a session: metadata)."""
    home = Home.from_env()
    profile = home.load_profile()
    password = _password_for(profile)
    async with connect(profile.relay_url, pinned_relay_pk=_pin(profile)) as client:
        await _session(client, home, profile, password)
        agents = await client.list_agents()
    if not agents:
        print("you have created no agents (`cozy agent create COLLAB NAME` makes one)")
    for agent in agents:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(agent.created_at))
        status = "revoked" if agent.revoked else "active"
        print(f"{agent.handle}\t{agent.account_id}\t{created} UTC\t{status}")


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


async def cmd_collab_remove(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        view = await _read(client, me, args.collab)
        target = await _member(client, view, args.handle)
        ack, view = await _manage(
            client, me, args.collab, lambda v: _collab.remove(v, target.account_id)
        )
    assert view.membership is not None
    # A duplicate (resent after a lost ack) was answered against a view that holds it already.
    done = 0 if ack.duplicate else 1
    print(
        f"removed {args.handle} at seq {ack.seq}; the collab key rotated to epoch"
        f" {view.membership.epoch + done}, wrapped only for the"
        f" {len(view.membership.members) - done} remaining member(s)"
    )


async def cmd_collab_role(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        view = await _read(client, me, args.collab)
        target = await _member(client, view, args.handle)
        role = Role(args.role)
        ack, _ = await _manage(
            client, me, args.collab, lambda _v: _collab.change_role(target.account_id, role)
        )
    print(f"{args.handle} is now {args.role} (seq {ack.seq})")


async def cmd_collab_rotate(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        ack, view = await _manage(client, me, args.collab, _collab.rotate)
    assert view.membership is not None
    # A duplicate (resent after a lost ack) was answered against a view that holds it already.
    epoch = view.membership.epoch + (0 if ack.duplicate else 1)
    print(f"rotated the collab key to epoch {epoch} at seq {ack.seq}")


async def _manage(
    client: Client, me: Unlocked, collab_id: str, change: Callable[[CollabView], Operation]
) -> tuple[wire.Appended, CollabView]:
    """`Client.manage`; if the connection is lost before the ack, the same signed proof is sent
    again on a new connection (a change is never made twice: a stored one comes back as a
    duplicate)."""
    try:
        try:
            return await client.manage(
                me.signing_key,
                me.box_key,
                collab_id,
                change,
                past_box_keys=me.past_box_keys,
                own_sign_pks=me.own_sign_pks,
            )
        except ConnectionLost as exc:
            if exc.unacked is None:
                raise
            async with _after_lost_ack(me) as again:
                return await again.manage(
                    me.signing_key,
                    me.box_key,
                    collab_id,
                    change,
                    past_box_keys=me.past_box_keys,
                    own_sign_pks=me.own_sign_pks,
                    resend=exc.unacked,
                )
    except RelayRefused as exc:
        if exc.code in (wire.ErrorCode.UNAUTHORIZED, wire.ErrorCode.INVALID_EVENT):
            raise CliError(f"the change was refused: {exc.message}") from None
        raise


async def cmd_collab_members(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        view = await _read(client, me, args.collab)
        assert view.membership is not None
        print(f"{args.collab}: epoch {view.membership.epoch}, head seq {view.head.seq}")
        for m in view.membership.readers():
            handle = (await client.account(m.account_id)).handle
            caps = ",".join(m.caps) or "-"
            print(
                f"{handle}\t{m.role.value}\t{m.kind.value}"
                f"\t{fingerprint(m.sign_pk, m.box_pk)}\t{caps}"
            )


async def cmd_dm(args: argparse.Namespace) -> None:
    """A direct message, sealed to the recipient's key as this device's fold pinned it."""
    me = await _unlock(Home.from_env())
    async with _connected(me) as client:
        view = await _read(client, me, args.collab)
        to = await _member(client, view, args.handle)

        def seal(view: CollabView) -> SignedEvent:
            assert view.membership is not None
            return dm.seal_dm(
                signing_key=me.signing_key,
                sender_box_key=me.box_key,
                recipient_box_pk=to.box_pk,
                collab_id=args.collab,
                sender_id=view.account_id,
                recipient_id=to.account_id,
                ts=_now_ms(),
                epoch=view.membership.epoch,
                content=contentmod.encode_content(contentmod.Message(text=args.text)),
            )

        # A DM carries no author-stream evidence (docs/ordering.md): it is not kept in the
        # stream; a lost ack is answered by resending it on a new connection, as `_post` does.
        view = await _read(client, me, args.collab)
        try:
            ack, _ = await client.seal_and_append(args.collab, me.box_key, seal, view=view)
        except ConnectionLost as exc:
            if exc.unacked is None:
                raise
            async with _after_lost_ack(me) as again:
                view = await _read(again, me, args.collab)
                ack, _ = await again.seal_and_append(
                    args.collab, me.box_key, seal, view=view, resend=exc.unacked
                )
    print(f"sent a direct message to {args.handle} as seq {ack.seq}")


async def cmd_attach(args: argparse.Namespace) -> None:
    """Seal a file under a fresh file key, upload it piece by piece, and post a reference
    (with the file key, under the collab key) so exactly the collab's readers can open it."""
    me = await _unlock(Home.from_env())
    name, size = _file_facts(args.file)
    file_key = random_bytes(32)
    async with _connected(me) as client:
        stored = await client.upload_artifact(
            args.collab, artifacts.seal_stream(file_key, args.collab, _read_pieces(args.file))
        )
        attachment = contentmod.Attachment(name=name, size=size, ref=stored.ref, key=file_key)
        await _post(client, me, args.collab, _sealer(me, args.collab, attachment, (stored.ref,)))
    print(stored.ref)


async def cmd_fetch(args: argparse.Namespace) -> None:
    """Download an artifact to a spool file, then check it against its ref and decrypt it into
    OUT piece by piece; only a complete, verified file replaces OUT. Memory stays bounded.

    The file key comes from the attachment event, read through this device's verified view."""
    me = await _unlock(Home.from_env())
    out = Path(args.out)
    spool = out.with_name(f".{out.name}.download")
    async with _connected(me) as client:
        key = None
        keys = (await _read(client, me, args.collab)).known_keys()
        async with client.history(
            args.collab,
            me.box_key,
            keys=keys,
            past_box_keys=me.past_box_keys,
            own_sign_pks=me.own_sign_pks,
        ) as events:
            async for entry in events:
                if (
                    isinstance(entry.content, contentmod.Attachment)
                    and entry.content.ref == args.ref
                ):
                    key = entry.content.key
        if key is None:
            raise CliError(f"no attachment you can read in {args.collab} has the ref {args.ref}")
        with _Spool(spool) as writer:
            async with client.download_artifact(args.collab, args.ref) as pieces:
                async for piece in pieces:
                    writer.add(piece)
    try:
        written = _open_spool(spool, out, key, args.collab, args.ref)
    finally:
        spool.unlink(missing_ok=True)
    print(f"{out}: {written} bytes, verified against {args.ref}")


# Small blocking file helpers: a CLI process does nothing else while they run.


def _file_facts(file: str) -> tuple[str, int]:
    path = Path(file)
    if not path.is_file():
        raise CliError(f"{path} is not a readable file")
    return path.name, path.stat().st_size


def _read_pieces(file: str) -> Iterator[bytes]:
    with Path(file).open("rb") as f:
        while piece := f.read(artifacts.CHUNK_BYTES):
            yield piece


class _Spool:
    """Length-prefixed sealed pieces on disk, so a download is never held in memory whole."""

    def __init__(self, path: Path) -> None:
        self._f = path.open("wb")

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._f.close()

    def add(self, piece: bytes) -> None:
        self._f.write(len(piece).to_bytes(4, "big") + piece)


def _spooled(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while head := f.read(4):
            yield f.read(int.from_bytes(head, "big"))


def _open_spool(spool: Path, out: Path, key: bytes, collab_id: str, ref: str) -> int:
    partial_out = out.with_name(f".{out.name}.partial")
    written = 0
    try:
        with partial_out.open("wb") as f:
            for plain in artifacts.open_stream(
                key, collab_id, artifacts.check_ref(ref, _spooled(spool))
            ):
                f.write(plain)
                written += len(plain)
        partial_out.replace(out)
    except CryptoError:
        partial_out.unlink(missing_ok=True)
        raise TamperDetected(
            "the download does not verify against its ref or the collab key; nothing was written",
            collab_id=collab_id,
            seq=None,
        ) from None
    return written


async def cmd_tail(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    # Verification always starts at the genesis (the membership fold needs every change), so
    # `--from` only filters what is printed. The head saved last time must be on the path.
    state = me.home.state
    saved = state.head(args.collab)
    async with _connected(me) as client:
        names: dict[str, str] = {}
        # Two passes: the first opens every epoch key this account was given (one arrives with
        # the addition, after that epoch's earlier events), the second prints with all of them.
        keys = (await _read(client, me, args.collab)).known_keys()
        async with client.history(
            args.collab,
            me.box_key,
            keys=keys,
            expect=saved,
            receipts=state.receipts(args.collab),
            follow=args.follow,
            past_box_keys=me.past_box_keys,
            own_sign_pks=me.own_sign_pks,
        ) as events:
            try:
                async for entry in events:
                    if entry.seq % 100 == 0:
                        state.save_head(args.collab, events.head)
                    if entry.seq < args.from_seq:
                        continue
                    for account_id in (entry.author_id, entry.dm_to, *_mentioned(entry)):
                        if account_id and account_id not in names:
                            names[account_id] = (await client.account(account_id)).handle
                    author = names.get(entry.author_id, "-")
                    print(f"{entry.seq}\t{author}\t{describe(entry, names)}", flush=True)
            finally:
                # Only verified positions are saved, so a relay cannot roll this device back.
                state.save_head(args.collab, events.head)


async def cmd_verify(args: argparse.Namespace) -> None:
    """Re-verify a collab's whole history from seq 1 and print the head to compare with other
    members out of band; with --against, compare with the head another member read out."""
    me = await _unlock(Home.from_env())
    against = _parse_head(args.against) if args.against else None
    state = me.home.state
    async with _connected(me) as client:
        keys = (await _read(client, me, args.collab)).known_keys()
        count = 0
        async with client.history(
            args.collab,
            me.box_key,
            keys=keys,
            expect=state.head(args.collab),
            receipts=state.receipts(args.collab),
            past_box_keys=me.past_box_keys,
            own_sign_pks=me.own_sign_pks,
        ) as events:
            async for _ in events:
                count += 1
                if count % 500 == 0:
                    print(f"\r  verified {count} events…", end="", file=sys.stderr, flush=True)
        view = events.view
    print(f"\r  verified {count} events", file=sys.stderr)
    state.save_head(args.collab, view.head)
    print(f"head {_short_head(view.head.seq, view.head.chain)}")
    if against is None:
        return
    seq, prefix = against
    mine = view.chain_at(seq)
    if mine is None:
        raise ForkDetected(
            f"the other member read seq {seq}, but the relay has shown this device only up to"
            f" {view.head.seq}: it is withholding events from one of you",
            collab_id=args.collab,
            seq=seq,
        )
    if not mine.hex().startswith(prefix):
        raise ForkDetected(
            f"at seq {seq} this device verified {_short_head(seq, mine)} but the other member"
            f" read {seq}:{prefix}: the relay showed you different histories",
            collab_id=args.collab,
            seq=seq,
        )
    print(f"matches the other member's head at seq {seq}")


def _short_head(seq: int, chain: bytes) -> str:
    return f"{seq}:{chain.hex()[:16]}"


def _parse_head(text: str) -> tuple[int, str]:
    seq, _, prefix = text.partition(":")
    if not seq.isdigit() or len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise CliError("--against takes a head as `cozy verify` prints it: SEQ:HEX (8+ hex digits)")
    return int(seq), prefix


def _mentioned(entry: Entry) -> list[str]:
    if entry.proof is None:
        return []
    op = entry.proof.op
    if isinstance(op, AddMember):
        return [op.member.account_id]
    return [getattr(op, "account_id", "")]


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- wiring ---------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands to the `cozy` parser (the composition root lives in `cozy.cli`)."""
    account = sub.add_parser("account", help="sign up, log in").add_subparsers(
        dest="action", required=True
    )
    p = account.add_parser("signup", help="create an account on a relay")
    p.add_argument("--relay", required=True, help="relay URL, e.g. ws://127.0.0.1:8765")
    p.add_argument("--handle", required=True)
    p.set_defaults(run=cmd_signup)
    p = account.add_parser("login", help="get a fresh session token")
    p.add_argument(
        "--repin", action="store_true", help="accept a new relay signing key (operator rotated it)"
    )
    p.set_defaults(run=cmd_login)
    p = account.add_parser("restore", help="set up this device from the relay's sealed keystore")
    p.add_argument("--relay", required=True)
    p.add_argument("--handle", required=True)
    p.set_defaults(run=cmd_restore)
    p = account.add_parser(
        "recover", help="open the keystore with the recovery code; set a new passphrase"
    )
    p.add_argument("--relay", help="needed when this device holds no account")
    p.add_argument("--handle")
    p.set_defaults(run=cmd_recover)
    p = account.add_parser("passphrase", help="change the encryption passphrase")
    p.set_defaults(run=cmd_change_passphrase)
    p = account.add_parser(
        "rotate-keys",
        help="replace your account keys everywhere (after a suspected compromise)",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(run=cmd_rotate_keys)
    p = account.add_parser(
        "password", help="change the login password (signed; ends your other sessions)"
    )
    p.set_defaults(run=cmd_account_password)
    p = account.add_parser("agents", help="list the agents you created")
    p.set_defaults(run=cmd_account_agents)
    p = account.add_parser("sessions", help="end every session of your account")
    p.add_argument(
        "--end-all",
        action="store_true",
        help="end every session on every device (each logs in again with the password)",
    )
    p.set_defaults(run=cmd_account_sessions)

    collab = sub.add_parser("collab", help="collabs").add_subparsers(dest="action", required=True)
    p = collab.add_parser("create", help="create a collab (prints its id)")
    p.add_argument("name")
    p.set_defaults(run=cmd_collab_create)
    p = collab.add_parser("add", help="add a member (owners and managers)")
    p.add_argument("collab")
    p.add_argument("handle")
    p.add_argument("--role", choices=[r.value for r in Role], default=Role.MEMBER.value)
    p.add_argument(
        "--agent", action="store_true", help="the account is a bot: no management powers"
    )
    p.add_argument(
        "--cap",
        action="append",
        metavar="CAP",
        help="a capability: tool:NAME, and for agents read or post (repeat; an agent's default"
        " is read and post)",
    )
    p.set_defaults(run=cmd_collab_add)
    p = collab.add_parser(
        "grant", help="grant a member capabilities (tool:NAME; read/post for agents)"
    )
    p.add_argument("collab")
    p.add_argument("handle")
    p.add_argument("caps", nargs="+", metavar="CAP", help="tool:NAME, read or post")
    p.add_argument("--revoke", action="store_true", help="take these capabilities back instead")
    p.set_defaults(run=cmd_collab_grant)
    p = collab.add_parser("remove", help="remove a member and rotate the collab key")
    p.add_argument("collab")
    p.add_argument("handle")
    p.set_defaults(run=cmd_collab_remove)
    p = collab.add_parser("role", help="change a member's role (owners)")
    p.add_argument("collab")
    p.add_argument("handle")
    p.add_argument("role", choices=[r.value for r in Role])
    p.set_defaults(run=cmd_collab_role)
    p = collab.add_parser("rotate", help="rotate the collab key without a membership change")
    p.add_argument("collab")
    p.set_defaults(run=cmd_collab_rotate)
    p = collab.add_parser("members", help="list members as this device verified them")
    p.add_argument("collab")
    p.set_defaults(run=cmd_collab_members)

    agent = sub.add_parser("agent", help="bots: create and revoke agents").add_subparsers(
        dest="action", required=True
    )
    p = agent.add_parser("create", help="create an agent in a collab; writes its credential file")
    p.add_argument("collab")
    p.add_argument("name", help="the agent's handle")
    p.add_argument("--cap", action="append", metavar="CAP", help="read, post or tool:NAME (repeat)")
    p.add_argument("--out", help="credential file to write (default NAME.cozy-agent)")
    p.set_defaults(run=cmd_agent_create)
    p = agent.add_parser(
        "revoke", help="revoke an agent's tokens; with --collab also remove it (rotates the key)"
    )
    p.add_argument("agent", metavar="NAME|ID", help="the agent's handle or account id")
    p.add_argument("legacy", nargs="?", help=argparse.SUPPRESS)  # older form: COLLAB NAME
    p.add_argument(
        "--collab",
        action="append",
        metavar="COLLAB",
        help="remove it from this collab too, rotating its key (repeat)",
    )
    p.set_defaults(run=cmd_agent_revoke)

    p = sub.add_parser("dm", help="send a direct message to one member of a collab")
    p.add_argument("collab")
    p.add_argument("handle")
    p.add_argument("text")
    p.set_defaults(run=cmd_dm)

    p = sub.add_parser("post", help="post a message to a collab")
    p.add_argument("collab")
    p.add_argument("text")
    p.set_defaults(run=cmd_post)

    p = sub.add_parser("attach", help="encrypt and upload a file; post a reference to it")
    p.add_argument("collab")
    p.add_argument("file")
    p.set_defaults(run=cmd_attach)

    p = sub.add_parser("fetch", help="download, verify and decrypt an attached file")
    p.add_argument("collab")
    p.add_argument("ref")
    p.add_argument("out")
    p.set_defaults(run=cmd_fetch)

    p = sub.add_parser(
        "verify", help="re-verify a collab from seq 1 and print its head to compare with others"
    )
    p.add_argument("collab")
    p.add_argument("--against", metavar="SEQ:HEX", help="a head another member read out")
    p.set_defaults(run=cmd_verify)

    evidence = sub.add_parser("evidence", help="proofs that a relay misbehaved").add_subparsers(
        dest="action", required=True
    )
    p = evidence.add_parser("check", help="check an equivocation proof with the relay's key")
    p.add_argument("file")
    p.set_defaults(run=cmd_evidence_check)

    p = sub.add_parser("tail", help="print a collab's verified history (seq, author, text)")
    p.add_argument("collab")
    p.add_argument("--from", dest="from_seq", type=int, default=1, help="first seq to print")
    p.add_argument("--follow", action="store_true", help="keep printing new events")
    p.set_defaults(run=cmd_tail)


def _export_proof(alarm: EquivocationDetected) -> None:
    """Keep the relay's self-contradiction where the user can hand it on."""
    home = Home.from_env()
    path = home.path / "evidence" / f"equivocation-{alarm.collab_id}-{alarm.seq}.json"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(equivocation.encode(alarm.proof))
    except OSError as exc:
        print(f"(could not save the proof: {exc.strerror})", file=sys.stderr)
        return
    print(
        f"the relay's signed contradiction is saved in {path}; anyone can check it with"
        f" `cozy evidence check {path}`",
        file=sys.stderr,
    )


async def cmd_evidence_check(args: argparse.Namespace) -> None:
    print(_check_proof_file(args.file))


def _check_proof_file(file: str) -> str:
    try:
        proof = equivocation.decode(Path(file).read_bytes())
        return f"valid proof: {equivocation.check(proof)} (relay key {proof.relay_pk.hex()[:16]}…)"
    except (OSError, equivocation.NotAProof) as exc:
        raise CliError(f"{file}: {exc}") from None


def run_command(
    fn: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], args: argparse.Namespace
) -> int:
    """Run one async command and turn errors into messages and exit codes."""
    try:
        trio.run(fn, args)
    except IntegrityAlarm as exc:
        print(f"INTEGRITY ALARM: {exc}", file=sys.stderr)
        if isinstance(exc, EquivocationDetected):
            _export_proof(exc)
        return EXIT_INTEGRITY
    except (CliError, ClientError, HomeError, CredentialsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(
            f"error: cannot reach the relay ({exc.strerror or exc}); is it running?",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return 0
