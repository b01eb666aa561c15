"""Building management changes and reading entries: the client's side of ADR-0010.

Every change is made against the head of a view this client verified itself, and wraps keys
only for members *its own fold* names, with the keys *its own fold* pinned. New epoch keys are
drawn here and leave this process only inside the signed change; if the relay refuses the
change as stale, the key is dropped and a fresh one is drawn for the retry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from clientkit.errors import WrongAccountKind
from model import content as contentmod
from model._crypto import domain_hash
from model.chain import start_of
from model.epochs import new_epoch_key, wrap_for
from model.membership import (
    PROOF_VERSION,
    AddMember,
    ChangeRole,
    CreateCollab,
    Member,
    MemberKind,
    Operation,
    Proof,
    RekeyMember,
    RemoveMember,
    Role,
    RotateKey,
    SetCaps,
    SetWitnesses,
    management_event,
)
from model.proofs import KeyPair, sign_collab_rekey

if TYPE_CHECKING:
    import nacl.signing

    from model import wire
    from model.envelope import SignedEvent
    from model.view import CollabView, Entry


def genesis(
    signing_key: nacl.signing.SigningKey, account_id: str, box_pk: bytes, collab_id: str, ts: int
) -> tuple[SignedEvent, bytes]:
    """The genesis event of a new collab owned by `account_id`, and its epoch-0 key."""
    owner = Member(account_id, Role.OWNER, MemberKind.HUMAN, bytes(signing_key.verify_key), box_pk)
    key = new_epoch_key()
    op = CreateCollab(owner=owner, wraps=wrap_for([owner], key))
    head = start_of(collab_id)
    proof = Proof(PROOF_VERSION, collab_id, account_id, head.seq, head.chain, op)
    return management_event(signing_key, proof, ts=ts), key


def member_for(
    info: wire.AccountInfo, role: Role, kind: MemberKind, caps: tuple[str, ...] = ()
) -> Member:
    """The account `info` describes, as a member of `kind` with `role` and `caps`.

    Raises `WrongAccountKind` when the directory says the account is of another kind: an agent
    seated as a person would get management powers (and a relay that does not say the kind is
    not trusted to be right about it). The relay refuses such an `add` too; this says so before
    anything is signed.
    """
    if info.kind is None:
        raise WrongAccountKind(
            f"the relay does not say what kind of account {info.handle} is, so it cannot be"
            f" added as {kind.value}; nothing was changed (the relay needs an upgrade)"
        )
    if info.kind is not kind:
        flag = "with --agent" if info.kind is MemberKind.AGENT else "without --agent"
        raise WrongAccountKind(
            f"{info.handle} is an account of kind {info.kind.value}, not {kind.value}: nothing"
            f" was changed; add it {flag}"
        )
    return Member(info.account_id, role, kind, info.sign_pk, info.box_pk, caps)


def add(view: CollabView, member: Member) -> Operation:
    """Add `member` (keys as the directory gave them: compare fingerprints out of band)."""
    _, key = view.current_key()
    return AddMember(member=member, wraps=wrap_for([member], key))


def remove(view: CollabView, account_id: str) -> Operation:
    """Remove a member and rotate: the next key is wrapped for everyone else only."""
    assert view.membership is not None
    stay = [m for m in view.membership.readers() if m.account_id != account_id]
    return RemoveMember(
        account_id=account_id,
        new_epoch=view.membership.epoch + 1,
        wraps=wrap_for(stay, new_epoch_key()),
    )


def rotate(view: CollabView) -> Operation:
    assert view.membership is not None
    return RotateKey(
        new_epoch=view.membership.epoch + 1,
        wraps=wrap_for(view.membership.readers(), new_epoch_key()),
    )


def rekey(view: CollabView, new_key: nacl.signing.SigningKey, new_box_pk: bytes) -> Operation:
    """Re-pin this account's keys to `new_key` / `new_box_pk` and rotate: the next epoch key is
    wrapped for every member, this account's wrap to the new box key. The event carrying it
    must be signed with the key the fold pins now (the old one)."""
    assert view.membership is not None
    me = view.membership.members[view.account_id]
    old, new = KeyPair(me.sign_pk, me.box_pk), KeyPair(bytes(new_key.verify_key), new_box_pk)
    readers = [
        msgspec.structs.replace(m, sign_pk=new.sign_pk, box_pk=new.box_pk)
        if m.account_id == me.account_id
        else m
        for m in view.membership.readers()
    ]
    return RekeyMember(
        old_sign_pk=old.sign_pk,
        sign_pk=new.sign_pk,
        box_pk=new.box_pk,
        possession=sign_collab_rekey(new_key, view.collab_id, me.account_id, old, new),
        new_epoch=view.membership.epoch + 1,
        wraps=wrap_for(readers, new_epoch_key()),
    )


def change_role(account_id: str, role: Role) -> Operation:
    return ChangeRole(account_id=account_id, role=role)


def set_caps(
    view: CollabView, account_id: str, *, grant: tuple[str, ...] = (), revoke: tuple[str, ...] = ()
) -> Operation:
    """The member's capabilities as this device's fold has them, plus `grant`, minus `revoke`."""
    assert view.membership is not None
    current = view.membership.members[account_id].caps
    kept = [c for c in current if c not in revoke]
    return SetCaps(account_id=account_id, caps=(*kept, *(c for c in grant if c not in kept)))


def set_witnesses(quorum: int, vkeys: tuple[str, ...]) -> Operation:
    """The collab's witness policy: `quorum` of these witness keys (0 and none: no policy)."""
    return SetWitnesses(quorum=quorum, vkeys=vkeys)


def proposal(
    view: CollabView, signing_key: nacl.signing.SigningKey, op: Operation, ts: int
) -> SignedEvent:
    """The `mgmt` event for `op`, made against the view's verified head."""
    proof = Proof(
        PROOF_VERSION, view.collab_id, view.account_id, view.head.seq, view.head.chain, op
    )
    return management_event(signing_key, proof, ts=ts)


def describe(entry: Entry, name: dict[str, str]) -> str:
    """One line for a person: what happened at this position (`name` maps ids to handles)."""

    def who(account_id: str) -> str:
        return name.get(account_id, account_id)

    if entry.unreadable:
        return f"[unreadable: {entry.unreadable}]"
    if entry.proof is not None:
        match entry.proof.op:
            case CreateCollab():
                return "[created the collab]"
            case AddMember(member=m):
                return f"[added {who(m.account_id)} as {m.role.value}{' (agent)' if m.kind is MemberKind.AGENT else ''}]"
            case ChangeRole(account_id=a, role=r):
                return f"[made {who(a)} {r.value}]"
            case RemoveMember(account_id=a, new_epoch=e):
                return f"[removed {who(a)}; key rotated to epoch {e}]"
            case RotateKey(new_epoch=e):
                return f"[rotated the key to epoch {e}]"
            case RekeyMember(sign_pk=s, box_pk=b, new_epoch=e):
                return (
                    f"[replaced their account keys (new fingerprint {fingerprint(s, b)});"
                    f" key rotated to epoch {e}]"
                )
            case SetCaps(account_id=a, caps=c):
                return f"[gave {who(a)} the capabilities {', '.join(c) or '(none)'}]"
            case SetWitnesses(quorum=k, vkeys=v):
                return f"[required {k} of {len(v)} witnesses]" if v else "[removed the witnesses]"
    prefix = f"(DM to {who(entry.dm_to)}) " if entry.dm_to else ""
    match entry.content:
        case contentmod.Message(text=text):
            return prefix + text
        case contentmod.Attachment(name=n, size=size, ref=ref):
            return f"{prefix}[file {n!r}, {size} bytes: {ref}]"
        case contentmod.CollabMeta(name=n):
            return f"[collab named {n!r}]"
    return "[empty]"


def fingerprint(sign_pk: bytes, box_pk: bytes) -> str:
    """A short, comparable name for an account's two public keys (read it aloud to check)."""
    digest = domain_hash(b"cozylabs/v1/key-fingerprint\x00", sign_pk, box_pk).hex()[:20]
    return " ".join(digest[i : i + 4] for i in range(0, 20, 4))
