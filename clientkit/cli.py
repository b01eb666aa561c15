"""The people's CLI: `cozy account …`, `cozy collab …`, `cozy post`, `cozy tail`.

Non-interactive when COZY_HOME, COZY_PASSWORD (login password) and COZY_PASSPHRASE (keystore
passphrase) are set; otherwise it prompts. Exit codes: 0 ok, 1 refused or failed, 2 usage,
3 integrity alarm (the relay delivered something that does not verify).
"""

from __future__ import annotations

import getpass
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nacl.public
import nacl.signing
import trio

from clientkit._client import Client, connect
from clientkit._home import Home, HomeError, Profile, kdf_profile
from clientkit.errors import ClientError, IntegrityAlarm, RelayRefused
from model import content as contentmod
from model import keystore, wire
from model._crypto import CryptoError, random_bytes

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Coroutine
    from typing import Any

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

    def collab_key(self, collab_id: str) -> bytes:
        key = self.keys.collab_keys.get(collab_id)
        if key is None:
            raise CliError(f"this device holds no key for {collab_id}: are you a member of it?")
        return key

    def add_collab_key(self, collab_id: str, key: bytes) -> None:
        self.keys.collab_keys[collab_id] = key
        self.sealed = keystore.reseal(self.sealed, self.keystore_key, self.keys)
        self.home.save_keystore(self.sealed)


async def _unlock(home: Home) -> Unlocked:
    profile = home.load_profile()
    sealed = home.load_keystore()
    passphrase = _passphrase()
    try:
        key = await trio.to_thread.run_sync(keystore.unwrap_key, sealed, passphrase)
        keys = keystore.open_content(sealed, key)
    except CryptoError:
        raise CliError("wrong passphrase (or a damaged keystore): nothing was changed") from None
    return Unlocked(home, profile, sealed, key, keys)


async def _session(client: Client, home: Home, profile: Profile) -> None:
    """Reuse the stored session token; log in again with the password when it has expired."""
    if profile.token and profile.token_expires_at > time.time() + 30:
        try:
            await client.authenticate(profile.token)
        except RelayRefused as exc:
            if exc.code is not wire.ErrorCode.UNAUTHENTICATED:
                raise
        else:
            return
    reply = await client.login(profile.handle, _password())
    profile.token, profile.token_expires_at = reply.token, reply.expires_at
    home.save_profile(profile)


def _pin(profile: Profile) -> bytes:
    return bytes.fromhex(profile.relay_pk)


# --- commands -------------------------------------------------------------------------------


async def cmd_signup(args: argparse.Namespace) -> None:
    home = Home.from_env()
    if home.has_keystore():
        raise CliError(f"{home.path} already holds an account; use another COZY_HOME")
    password = _password()
    passphrase = _passphrase()
    if password == passphrase:
        raise CliError("the encryption passphrase must differ from the login password")
    sign = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    content = keystore.KeystoreContent(sign_seed=bytes(sign), box_sk=bytes(box))
    print("sealing your keystore (Argon2id)…", file=sys.stderr)
    sealed, _ = await trio.to_thread.run_sync(keystore.seal_new, content, passphrase, kdf_profile())
    async with connect(args.relay) as client:
        account_id = await client.signup(
            args.handle, password, bytes(sign.verify_key), bytes(box.public_key)
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
            )
        )
    print(f"signed up as {args.handle} ({account_id}); keys are in {home.path}")
    print("next: cozy collab create NAME")


async def cmd_login(_args: argparse.Namespace) -> None:
    home = Home.from_env()
    profile = home.load_profile()
    async with connect(profile.relay_url, pinned_relay_pk=_pin(profile)) as client:
        reply = await client.login(profile.handle, _password())
    profile.token, profile.token_expires_at = reply.token, reply.expires_at
    home.save_profile(profile)
    print(f"logged in as {profile.handle}; session valid until {time.ctime(reply.expires_at)}")


async def cmd_collab_create(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with connect(me.profile.relay_url, pinned_relay_pk=_pin(me.profile)) as client:
        await _session(client, me.home, me.profile)
        collab_id = await client.create_collab()
        key = random_bytes(32)
        me.add_collab_key(collab_id, key)
        await client.post(
            signing_key=me.signing_key,
            collab_key=key,
            collab_id=collab_id,
            content=contentmod.CollabMeta(name=args.name),
            ts=_now_ms(),
        )
    print(collab_id)


async def cmd_post(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with connect(me.profile.relay_url, pinned_relay_pk=_pin(me.profile)) as client:
        await _session(client, me.home, me.profile)
        ack = await client.post(
            signing_key=me.signing_key,
            collab_key=me.collab_key(args.collab),
            collab_id=args.collab,
            content=contentmod.Message(text=args.text),
            ts=_now_ms(),
        )
    print(f"posted as seq {ack.seq}{' (already posted)' if ack.duplicate else ''}")


async def cmd_tail(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    heads = me.home.load_heads()
    start = heads.get(args.collab)
    # Verification always starts from a head this device verified itself (or the genesis), so
    # `--from` only filters what is printed, never what is checked.
    if start is not None and start.seq >= args.from_seq:
        start = None
    async with connect(me.profile.relay_url, pinned_relay_pk=_pin(me.profile)) as client:
        await _session(client, me.home, me.profile)
        handles: dict[str, str] = {}
        async with client.history(
            args.collab, me.collab_key(args.collab), head=start, follow=args.follow
        ) as events:
            try:
                async for ev in events:
                    if ev.seq % 100 == 0:
                        me.home.save_head(args.collab, events.head)
                    if ev.seq < args.from_seq:
                        continue
                    if ev.author_id not in handles:
                        handles[ev.author_id] = (await client.account(ev.author_id)).handle
                    print(f"{ev.seq}\t{handles[ev.author_id]}\t{ev.text}", flush=True)
            finally:
                # Only verified positions are saved, so a relay cannot roll this device back.
                me.home.save_head(args.collab, events.head)


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
    p.set_defaults(run=cmd_login)

    collab = sub.add_parser("collab", help="collabs").add_subparsers(dest="action", required=True)
    p = collab.add_parser("create", help="create a collab (prints its id)")
    p.add_argument("name")
    p.set_defaults(run=cmd_collab_create)

    p = sub.add_parser("post", help="post a message to a collab")
    p.add_argument("collab")
    p.add_argument("text")
    p.set_defaults(run=cmd_post)

    p = sub.add_parser("tail", help="print a collab's verified history (seq, author, text)")
    p.add_argument("collab")
    p.add_argument("--from", dest="from_seq", type=int, default=1, help="first seq to print")
    p.add_argument("--follow", action="store_true", help="keep printing new events")
    p.set_defaults(run=cmd_tail)


def run_command(
    fn: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], args: argparse.Namespace
) -> int:
    """Run one async command and turn errors into messages and exit codes."""
    try:
        trio.run(fn, args)
    except IntegrityAlarm as exc:
        print(f"INTEGRITY ALARM: {exc}", file=sys.stderr)
        return EXIT_INTEGRITY
    except (CliError, ClientError, HomeError, keystore.WeakKdfParameters) as exc:
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
