"""The witness `cozy dev` runs beside its relay (issue 16: a witness runs in `cozy dev` by default).

It is the same service as `cozy witness serve` (witness/), served as one more task of the dev
stack's nursery, so Ctrl-C stops it with the relay. Its state lives in `<data-dir>/witness`:
`cozy dev` runs `init` there once, when the directory does not exist yet, and opens it on
every later start. A directory that exists but is incomplete or damaged stops `cozy dev` with
the witness's own one-line error, exactly as `cozy witness serve` would: a witness that forgot
what it cosigned would cosign a fork, so nothing here ever re-creates state over a damaged one.

It trusts only this relay's collabs (`--log-prefix RELAY_NAME/collab/ RELAY_VKEY`) and listens
on a free loopback port chosen when it binds, so two dev stacks never collide.
"""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from httpserve import url_of
from model._crypto import signing_key_from_seed
from model.note import ALG_ED25519, NoteVerifier
from relay.config import ConfigError, WitnessTarget, relay_signing_seed
from witness import (
    TrustedLogs,
    WitnessServer,
    WitnessStateError,
    build_trusted_logs,
    init_state,
    open_state,
)
from witness._http import bound_address, open_listener

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from relay.config import RelayConfig
    from witness import WitnessStore

STATE_DIR: Final = "witness"
NAME: Final = "cozy-dev/witness"
"""The dev witness's key name (what `cozy witness init --name` would be given)."""


@dataclass(frozen=True)
class DevWitness:
    """A dev witness that is listening (not yet serving: `serve` does that, in a nursery)."""

    url: str
    vkey: str
    state: Path
    accepting: list[str]
    _server: WitnessServer
    _listener: trio.SocketListener

    async def serve(self) -> None:
        """Answer add-checkpoint requests until cancelled."""
        await self._server.serve_listener(self._listener)

    def configure(self, config: RelayConfig) -> RelayConfig:
        """`config` with this witness added to the witnesses the relay submits to."""
        return dataclasses.replace(
            config, witnesses=(*config.witnesses, WitnessTarget(self.url, self.vkey))
        )

    def require_command(self, collab: str = "$C") -> str:
        """What a user runs to require this witness's cosignature in a collab (1 of 1)."""
        return f".venv/bin/cozy collab witnesses {collab} {self.vkey} --quorum 1"


def relay_vkey(config: RelayConfig) -> str:
    """The relay's checkpoint key as a witness trusts it (docs/witness.md, step 1). Blocking:
    it may create the relay's persistent signing seed in the data dir, as the relay would."""
    public_key = bytes(signing_key_from_seed(relay_signing_seed(config)).verify_key)
    return NoteVerifier(config.relay_name, ALG_ED25519, public_key).vkey()


def _open(config: RelayConfig) -> tuple[WitnessStore, TrustedLogs]:
    """Init once, then open; blocking (files, SQLite). Raises `ConfigError` with the fix."""
    state = config.data_dir / STATE_DIR
    try:
        if not state.exists():
            init_state(state, NAME)
        store = open_state(state, serving=True)
    except WitnessStateError as exc:
        raise ConfigError(f"dev witness: {exc} (or run `cozy dev --no-witness`)") from None
    prefix = f"{config.relay_name}/collab/"
    return store, build_trusted_logs(prefixed=[(prefix, relay_vkey(config))])


@asynccontextmanager
async def dev_witness(config: RelayConfig) -> AsyncIterator[DevWitness]:
    """Open the dev witness's state and a listener on 127.0.0.1, port chosen at bind time;
    close both on the way out."""
    store, logs = await trio.to_thread.run_sync(_open, config)
    try:
        listener = await open_listener("127.0.0.1", 0)
        async with listener:
            host, port = bound_address(listener)
            yield DevWitness(
                url=url_of(host, port),
                vkey=store.verifier.vkey(),
                state=config.data_dir / STATE_DIR,
                accepting=logs.describe(),
                _server=WitnessServer(store, logs),
                _listener=listener,
            )
    finally:
        store.close()
