"""The CLI's shared plumbing: secrets from the environment or a prompt, the unlocked keystore
(`Unlocked`), the login session, a verified connection (`_connected`), the client session the
commands act through (`_opened`, a `clientkit.Session`) and this device's checked view of a
collab (`_view`, `_read`). Every command module builds on these; none of them parses arguments."""

from __future__ import annotations

import getpass
import os
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import trio

from clientkit._client import Client, connect
from clientkit._session import Identity, Keys, Session
from clientkit.errors import RelayRefused
from model import keystore, wire
from model._crypto import CryptoError
from model.membership import MemberKind

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from clientkit._home import Home, Profile
    from model.membership import Member
    from model.view import CollabView


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
    def identity(self) -> Identity:
        return Identity(self.profile.account_id, self.profile.handle, MemberKind.HUMAN)

    @property
    def session_keys(self) -> Keys:
        return Keys(
            self.signing_key, self.box_key, tuple(self.past_box_keys), tuple(self.own_sign_pks)
        )

    def session_on(self, client: Client) -> Session:
        """A session over `client` with this device's state (it cannot reconnect: `_opened`
        makes one that can)."""
        return Session(
            client, self.identity, self.session_keys, self.home.state, device=self.profile.device
        )

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
        raise CliError(
            "wrong passphrase (or a damaged keystore): nothing was changed. Check"
            " COZY_PASSPHRASE; if it is forgotten, `cozy account recover` sets a new one with"
            " your recovery code"
        ) from None
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


class _Progress:
    """Numbered steps on stderr, for long operations."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._n = 0

    def __call__(self, what: str) -> None:
        self._n += 1
        print(f"[{self._n}/{self._total}] {what}…", file=sys.stderr, flush=True)


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
        client.checkpoints.store = me.home.state
        yield client


@asynccontextmanager
async def _opened(me: Unlocked) -> AsyncIterator[Session]:
    """A client session over a verified connection (`_connected`) that resends, on a new
    connection, an event whose ack a lost connection never delivered."""
    async with (
        _connected(me) as client,
        Session(
            client,
            me.identity,
            me.session_keys,
            me.home.state,
            device=me.profile.device,
            reconnect=lambda: _after_lost_ack(me),
        ) as session,
    ):
        yield session


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


_UNFINISHED_ROTATION = (
    "a key rotation of this account is unfinished: run `cozy account rotate-keys` to finish it"
    " (nothing else was done)"
)


async def _read(client: Client, me: Unlocked, collab_id: str) -> CollabView:
    """This device's own checked view of the collab over `client` (see `_view`)."""
    return await _view(me.session_on(client), collab_id)


async def _view(session: Session, collab_id: str) -> CollabView:
    """This device's own verified view of the collab (the whole history, folded), checked
    against the head it saved and the receipts it holds (`Session.read`)."""
    with _as_member(collab_id):
        return await session.read(collab_id)


@contextmanager
def _as_member(collab_id: str) -> Iterator[None]:
    """A session act on a collab this account cannot read, refused as one line that says what
    to do (every act reads the collab first)."""
    try:
        yield
    except RelayRefused as exc:
        if exc.code is wire.ErrorCode.UNAUTHORIZED:
            raise CliError(
                f"you are not a member of {collab_id} (or it does not exist): `cozy collab list`"
                " shows the collabs you are in"
            ) from None
        raise


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
            raise CliError(
                f"no account is called {handle!r} on this relay: check the spelling (they sign"
                " up first, with `cozy account signup`)"
            ) from None
        raise
