"""A real relay for tests: in this process, on a loopback port, on this test's database."""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import nacl.public
import nacl.signing
import trio

from clientkit import Client, _collab, connect
from model import content as contentmod
from model.envelope import SignedEvent, seal_event
from model.ids import new_id
from model.membership import Member, MemberKind, Role
from relay._run import run_relay
from relay.config import FrontDoorLimits, RelayConfig, Secret

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path

    from model.view import CollabView
    from relay._server import Relay

PASSWORD = "correct horse battery staple"


def relay_config(database_url: str, data_dir: Path, **overrides: Any) -> RelayConfig:
    """The test relay's config; `overrides` replace fields (e.g. checkpoint_interval_ms)."""
    config = RelayConfig(
        database_url=database_url,
        data_dir=data_dir,
        host="127.0.0.1",
        port=0,
        jwt_signing_key=Secret(secrets.token_bytes(32)),
        relay_signing_seed=Secret(secrets.token_bytes(32)),
        ops_port=0,  # the operations listener on a free port too (Relay.ops_url)
        # Tests sign up and look up many accounts from one address (hypothesis examples share
        # a relay): the enumeration budgets are the one limit lifted here. The front-door
        # tests (tests/test_front_door.py) run with the shipped numbers.
        front_door=FrontDoorLimits(
            signups_per_caller_per_hour=1_000_000,
            signups_per_hour=1_000_000,
            handle_lookups_per_caller_per_hour=1_000_000,
            handle_lookups_per_hour=1_000_000,
        ),
        # Test clients seal keystores with the cheap, documented test profile; a real relay
        # refuses those (relay/_keystores.py).
        allow_test_kdf=True,
    )
    return dataclasses.replace(config, **overrides)


@asynccontextmanager
async def running_relay(config: RelayConfig) -> AsyncIterator[Relay]:
    """A relay serving until the block ends, then shut down the way SIGTERM would."""
    async with trio.open_nursery() as nursery:
        relay: Relay = await nursery.start(
            partial(run_relay, config, auto_migrate=False, handle_signals=False)
        )
        try:
            yield relay
        finally:
            relay.request_shutdown()


@dataclass
class ThreadedRelay:
    """A relay serving in a Trio loop of its own thread, for synchronous (hypothesis) tests.

    Reach into its loop with ``trio.from_thread.run_sync(fn, trio_token=handle.token)``;
    setting ``stop`` (from that loop) shuts it down.
    """

    relay: Relay
    token: trio.lowlevel.TrioToken
    stop: trio.Event

    @property
    def url(self) -> str:
        return self.relay.url


@contextmanager
def relay_in_thread(
    config: RelayConfig,
    setup: Callable[[ThreadedRelay, trio.Nursery], Awaitable[None]] | None = None,
    *,
    name: str = "test-relay",
    start_timeout: float = 60,
) -> Iterator[ThreadedRelay]:
    """Run `running_relay(config)` on a thread until the block ends, then stop it like SIGTERM.

    `setup` runs inside the relay's loop before the block starts, with a nursery whose tasks
    (probes, say) live as long as the relay. A failure to start, or of the relay while it ran,
    is raised in the calling thread.
    """
    ready = threading.Event()
    handles: list[ThreadedRelay] = []
    failures: list[BaseException] = []

    async def serve() -> None:
        async with running_relay(config) as relay, trio.open_nursery() as nursery:
            handle = ThreadedRelay(relay, trio.lowlevel.current_trio_token(), trio.Event())
            if setup is not None:
                await setup(handle, nursery)
            handles.append(handle)
            ready.set()
            await handle.stop.wait()

    def main() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # handed to the calling thread
            failures.append(exc)
            ready.set()

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    assert ready.wait(start_timeout), f"the relay did not start within {start_timeout:g} s"
    if failures:
        raise failures[0]
    handle = handles[0]
    try:
        yield handle
    finally:
        trio.from_thread.run_sync(handle.stop.set, trio_token=handle.token)
        thread.join(30)
        assert not failures, f"the relay failed: {failures[0]!r}"


@dataclass
class User:
    """A signed-up account with its private keys and one collab it owns."""

    handle: str
    account_id: str
    signing_key: nacl.signing.SigningKey
    token: str
    collab_id: str
    collab_key: bytes
    box_key: nacl.public.PrivateKey

    def event(
        self,
        text: str,
        *,
        ts: int = 1_700_000_000_000,
        collab_id: str | None = None,
        evidence: contentmod.Evidence | None = None,
    ) -> SignedEvent:
        return seal_event(
            signing_key=self.signing_key,
            collab_key=self.collab_key,
            collab_id=collab_id or self.collab_id,
            actor_id=self.account_id,
            kind="msg",
            ts=ts,
            content=contentmod.encode_content(contentmod.Message(text=text), evidence),
        )


def seal_in_view(
    author: User,
    view: CollabView,
    text: str,
    *,
    ts: int = 1_700_000_000_000,
    evidence: bool = False,
) -> SignedEvent:
    """`text` sealed by `author` (with `author.signing_key`) under the current epoch of
    `view`, as the kit's post would, without sending it; with `evidence`, carrying the view's
    evidence as `post` does."""
    epoch, key = view.current_key()
    proof = view.evidence("test-device", ts) if evidence else None
    return seal_event(
        signing_key=author.signing_key,
        collab_key=key,
        collab_id=view.collab_id,
        actor_id=author.account_id,
        kind=contentmod.KIND_MESSAGE,
        ts=ts,
        content=contentmod.encode_content(contentmod.Message(text), proof),
        epoch=epoch,
    )


async def sign_up(url: str, handle: str | None = None) -> User:
    """Sign up, log in and create one collab over a real connection."""
    handle = handle or f"user-{secrets.token_hex(4)}"
    sign = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    async with connect(url) as client:
        account_id = await client.signup(handle, PASSWORD, sign, bytes(box.public_key))
        login = await client.login(handle, PASSWORD)
        collab_id, key = await client.create_collab(sign, bytes(box.public_key))
    return User(handle, account_id, sign, login.token, collab_id, key, box)


@asynccontextmanager
async def session(url: str, user: User) -> AsyncIterator[Client]:
    """A connection as `user`'s own client: authenticated, and signing with the account key."""
    async with connect(url) as client:
        await client.authenticate(user.token)
        client.use_key(user.signing_key)
        yield client


async def post(client: Client, author: User, collab_id: str, text: str) -> int:
    """Post as a member would: read the collab, seal under its current epoch with evidence."""
    view = await client.read(collab_id, author.box_key)
    epoch, key = view.current_key()
    now = int(time.time() * 1000)
    ack = await client.post(
        signing_key=author.signing_key,
        collab_key=key,
        epoch=epoch,
        collab_id=collab_id,
        content=contentmod.Message(text),
        ts=now,
        evidence=view.evidence("test-device", now),
    )
    return ack.seq


async def make_agent(
    client: Client, creator: User, caps: tuple[str, ...], handle: str | None = None
) -> User:
    """An agent created by `creator` (on `client`, bound to the creator) and added to the
    creator's collab with `caps`, as `cozy agent create` does; its `token` is the agent token."""
    handle = handle or f"bot-{secrets.token_hex(4)}"
    sign = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    account_id = new_id("a")
    sign_pk, box_pk = bytes(sign.verify_key), bytes(box.public_key)
    created = await client.create_agent(account_id, handle, sign_pk, box_pk)
    new = Member(account_id, Role.MEMBER, MemberKind.AGENT, sign_pk, box_pk, caps)
    await client.manage(
        creator.signing_key, creator.box_key, creator.collab_id, lambda v: _collab.add(v, new)
    )
    return User(handle, account_id, sign, created.token, creator.collab_id, creator.collab_key, box)


async def grant(
    client: Client,
    signer: User,
    account_id: str,
    *caps: str,
    revoke: bool = False,
    collab_id: str | None = None,
) -> None:
    """`signer` grants (or revokes) `caps` of a member of `collab_id` (by default the signer's
    own collab) with a signed change, as `cozy collab grant` does."""
    grant, taken = ((), caps) if revoke else (caps, ())
    await client.manage(
        signer.signing_key,
        signer.box_key,
        collab_id or signer.collab_id,
        lambda v: _collab.set_caps(v, account_id, grant=grant, revoke=taken),
    )
