"""`cozy collab …`: create a collab, add / grant / remove / role, rotate its key, set its witness
policy, list members."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from clientkit import _collab
from clientkit._cli_changes import _manage
from clientkit._cli_discovery import emit_json
from clientkit._cli_session import CliError, _lookup, _member, _opened, _unlock, _view
from clientkit._collab import fingerprint
from clientkit._home import Home
from model.membership import (
    CAP_POST,
    CAP_READ,
    CAP_TOOL_PREFIX,
    MemberKind,
    ProofRejected,
    Role,
    SetCaps,
    valid_cap,
    witness_policy,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from model import wire
    from model.membership import Member, Operation
    from model.view import CollabView


async def cmd_collab_create(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _opened(me) as session:
        collab_id = await session.create_collab(args.name)
    print(collab_id)


async def cmd_collab_add(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    kind = MemberKind.AGENT if args.agent else MemberKind.HUMAN
    caps = tuple(args.cap or ((CAP_READ, CAP_POST) if args.agent else ()))
    _check_caps(kind, caps)
    async with _opened(me) as session:
        info = await _lookup(session.client, args.handle)
        new = _collab.member_for(info, Role(args.role), kind, caps)  # refuses the wrong kind
        ack, _ = await _manage(session, args.collab, lambda v: _collab.add(v, new))
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


async def _change_member(
    collab_id: str, handle: str, change_for: Callable[[Member], Callable[[CollabView], Operation]]
) -> tuple[wire.Appended, CollabView]:
    """A signed change about one member, named by handle: their keys and kind as this device's
    fold pinned them go to `change_for`, whose change is sent with `_manage`."""
    me = await _unlock(Home.from_env())
    async with _opened(me) as session:
        view = await _view(session, collab_id)
        target = await _member(session.client, view, handle)
        return await _manage(session, collab_id, change_for(target))


async def cmd_collab_grant(args: argparse.Namespace) -> None:
    """Grant (or with --revoke take back) capabilities of a member: tool:NAME for anyone, read
    and post for agents. A signed `caps` change (owners; managers for plain members)."""
    caps = tuple(args.caps)
    grant, revoke = ((), caps) if args.revoke else (caps, ())
    made: list[Operation] = []

    def change_for(target: Member) -> Callable[[CollabView], Operation]:
        _check_caps(target.kind, caps)

        def change(v: CollabView) -> Operation:
            made.append(_collab.set_caps(v, target.account_id, grant=grant, revoke=revoke))
            return made[-1]

        return change

    ack, _ = await _change_member(args.collab, args.handle, change_for)
    after = made[-1]
    assert isinstance(after, SetCaps)
    print(
        f"{args.handle} has {', '.join(after.caps) or 'no capabilities'} in {args.collab}"
        f" (seq {ack.seq})"
    )


async def cmd_collab_remove(args: argparse.Namespace) -> None:
    ack, view = await _change_member(
        args.collab, args.handle, lambda target: lambda v: _collab.remove(v, target.account_id)
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
    role = Role(args.role)
    ack, _ = await _change_member(
        args.collab,
        args.handle,
        lambda target: lambda _v: _collab.change_role(target.account_id, role),
    )
    print(f"{args.handle} is now {args.role} (seq {ack.seq})")


async def cmd_collab_rotate(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _opened(me) as session:
        ack, view = await _manage(session, args.collab, _collab.rotate)
    assert view.membership is not None
    # A duplicate (resent after a lost ack) was answered against a view that holds it already.
    epoch = view.membership.epoch + (0 if ack.duplicate else 1)
    print(f"rotated the collab key to epoch {epoch} at seq {ack.seq}")


async def cmd_collab_witnesses(args: argparse.Namespace) -> None:
    """Set the collab's witness policy (owners): members then accept a head only when `--quorum`
    of these witnesses cosigned it. No keys: remove the policy."""
    vkeys = tuple(args.vkeys)
    quorum = len(vkeys) if args.quorum is None else args.quorum
    try:
        policy = witness_policy(quorum, vkeys)
    except ProofRejected as exc:
        raise CliError(f"{exc}; give the keys `cozy witness init` printed") from None
    me = await _unlock(Home.from_env())
    async with _opened(me) as session:
        ack, _ = await _manage(
            session, args.collab, lambda _v: _collab.set_witnesses(quorum, vkeys)
        )
    if policy is None:
        print(f"{args.collab} has no witness policy now (seq {ack.seq})")
    else:
        print(
            f"{args.collab} requires {policy.quorum} of {len(policy.vkeys)} witnesses to cosign"
            f" every head its members accept (seq {ack.seq})"
        )


class MemberRow(msgspec.Struct, frozen=True):
    """One member as `cozy collab members` lists them (the --json field names)."""

    handle: str
    account_id: str
    role: str
    kind: str
    fingerprint: str  # of the keys this device's fold pinned for them
    caps: list[str]


async def cmd_collab_members(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _opened(me) as session:
        view = await _view(session, args.collab)
        assert view.membership is not None
        members = [
            MemberRow(
                handle=(await session.client.account(m.account_id)).handle,
                account_id=m.account_id,
                role=m.role.value,
                kind=m.kind.value,
                fingerprint=fingerprint(m.sign_pk, m.box_pk),
                caps=list(m.caps),
            )
            for m in view.membership.readers()
        ]
    epoch, head_seq = view.membership.epoch, view.head.seq
    if args.json:
        emit_json(
            {"collab_id": args.collab, "epoch": epoch, "head_seq": head_seq, "members": members}
        )
        return
    print(f"{args.collab}: epoch {epoch}, head seq {head_seq}")
    for m in members:
        caps = ",".join(m.caps) or "-"
        print(f"{m.handle}\t{m.role}\t{m.kind}\t{m.fingerprint}\t{caps}")
