"""`cozy agent create|revoke` and `cozy account agents`: bots' accounts and credential files."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import nacl.public
import nacl.signing

from clientkit import _collab
from clientkit._agent import AgentCredentials, save_credentials
from clientkit._cli_changes import _manage
from clientkit._cli_collabs import _check_caps
from clientkit._cli_discovery import emit_json
from clientkit._cli_session import (
    CliError,
    _opened,
    _password_for,
    _pin,
    _session,
    _unlock,
    _view,
)
from clientkit._client import connect
from clientkit._home import Home
from model.ids import is_id, new_id
from model.membership import CAP_POST, CAP_READ, Member, MemberKind, Role

if TYPE_CHECKING:
    import argparse

    from model import wire


async def cmd_agent_create(args: argparse.Namespace) -> None:
    """Create a bot's account with fresh keys, add it to the collab with its capabilities (a
    proof signed by this human), and write its 0600 credential file."""
    home = Home.from_env()
    caps = tuple(args.cap or (CAP_READ, CAP_POST))
    _check_caps(MemberKind.AGENT, caps)
    # Checked before anything is created.
    out = _free_path(args.out) if args.out else _default_credentials_path(home, args.name)
    me = await _unlock(home)
    sign = nacl.signing.SigningKey.generate()
    box = nacl.public.PrivateKey.generate()
    account_id = new_id("a")
    async with _opened(me) as session:
        created = await session.client.create_agent(
            account_id, args.name, bytes(sign.verify_key), bytes(box.public_key)
        )
        new = Member(
            account_id, Role.MEMBER, MemberKind.AGENT, bytes(sign.verify_key),
            bytes(box.public_key), caps,
        )  # fmt: skip
        ack, _ = await _manage(session, args.collab, lambda v: _collab.add(v, new))
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


AGENTS_DIR: Final = "agents"


def _default_credentials_path(home: Home, name: str) -> Path:
    """COZY_HOME/agents/NAME.cozy-agent, in a directory only this user can enter: never the
    current directory, which is a repository when following the docs (and a secret there is
    one `git add .` from being published)."""
    if not name or Path(name).name != name or name.startswith("."):
        raise CliError(f"{name!r} cannot be an agent's name: use letters, digits, '-', '_', '.'")
    folder = home.path / AGENTS_DIR
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
    except OSError as exc:
        raise CliError(f"cannot make {folder}: {exc.strerror}; check COZY_HOME") from None
    return _free_path(str(folder / f"{name}.cozy-agent"))


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
    async with _opened(me) as session:
        agent = _find_agent(await session.client.list_agents(), name)
        done = ["already revoked" if agent.revoked else "every token revoked"]
        if not agent.revoked:
            await session.client.revoke_agent(agent.account_id)
        for collab_id in collabs:
            view = await _view(session, collab_id)
            if view.membership is not None and agent.account_id in view.membership.members:
                ack, _ = await _manage(
                    session, collab_id, lambda v: _collab.remove(v, agent.account_id)
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


async def cmd_account_agents(args: argparse.Namespace) -> None:
    """The agents this account created (needs only a session: metadata)."""
    home = Home.from_env()
    profile = home.load_profile()
    password = _password_for(profile)
    async with connect(profile.relay_url, pinned_relay_pk=_pin(profile)) as client:
        await _session(client, home, profile, password)
        agents = await client.list_agents()
    if args.json:
        emit_json(
            [
                {
                    "handle": a.handle,
                    "account_id": a.account_id,
                    "created_at": a.created_at,
                    "revoked": a.revoked,
                }
                for a in agents
            ]
        )
        return
    if not agents:
        print("you have created no agents (`cozy agent create COLLAB NAME` makes one)")
    for agent in agents:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(agent.created_at))
        status = "revoked" if agent.revoked else "active"
        print(f"{agent.handle}\t{agent.account_id}\t{created} UTC\t{status}")
