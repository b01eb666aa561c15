"""Finding your way: `cozy collab list` (the collabs this account is in) and `cozy account show`
(who this device is, with the key fingerprint to read out to whoever adds you), and the `--json`
form every listing command shares (`emit_json`).

Field names of the JSON forms are part of the CLI's interface (docs/cli.md): add fields, never
rename or drop one.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import msgspec

from clientkit._cli_session import _connected, _unlock
from clientkit._collab import fingerprint
from clientkit._home import Home
from clientkit.errors import RelayRefused
from model import content as contentmod
from model import wire
from model.membership import MemberKind

if TYPE_CHECKING:
    import argparse

    from clientkit._cli_session import Unlocked
    from clientkit._client import Client
    from model.view import CollabView


def emit_json(value: object) -> None:
    """`value` as one line of JSON on stdout (a listing: an array; one thing: an object)."""
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


def printable(text: str) -> str:
    """Text someone else chose (a collab's name, a handle), safe to print in a table row."""
    return "".join(c if c.isprintable() and c != "\t" else " " for c in text)


def short_head(seq: int, chain: bytes) -> str:
    """A head as `cozy verify` prints it, to compare with another member's."""
    return f"{seq}:{chain.hex()[:16]}"


class CollabRow(msgspec.Struct, frozen=True):
    """One collab as `cozy collab list` shows it, from this device's own verified read."""

    collab_id: str
    name: str | None  # the latest name set in the collab, None if none this account can read
    role: str | None  # this account's role; None once it was removed
    members: int
    epoch: int
    head_seq: int
    head: str  # SEQ:HEX as `cozy verify` prints it
    listed_by_relay: bool  # False: only this device remembers it (the relay left it out)


async def cmd_collab_list(args: argparse.Namespace) -> None:
    """Every collab the relay says this account is in, and every one this device verified
    before: a relay can leave a collab out of its answer, but not out of this device's memory."""
    me = await _unlock(Home.from_env())
    rows: list[CollabRow] = []
    async with _connected(me) as client:
        listed = set(await client.collabs())
        for collab_id in sorted(listed | set(me.home.state.collabs())):
            row = await _collab_row(client, me, collab_id, listed=collab_id in listed)
            if row is not None:
                rows.append(row)
    if args.json:
        emit_json(rows)
        return
    if not rows:
        print(
            "you are in no collab yet: `cozy collab create NAME` makes one, or ask a member to"
            " add you (`cozy account show` prints the fingerprint they should check)",
            file=sys.stderr,
        )
        return
    table = [("COLLAB", "NAME", "ROLE", "MEMBERS", "HEAD")]
    for r in rows:
        name = printable(r.name) if r.name is not None else "-"
        role = r.role or "removed"
        table.append((r.collab_id, name, role, str(r.members), r.head))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for cells in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    for r in rows:
        if not r.listed_by_relay and r.role is not None:
            print(
                f"warning: the relay did not list {r.collab_id}, which this device verified you"
                " are a member of: it may be hiding the collab from you",
                file=sys.stderr,
            )


async def _collab_row(
    client: Client, me: Unlocked, collab_id: str, *, listed: bool
) -> CollabRow | None:
    try:
        view, name = await _read_named(client, me, collab_id)
    except RelayRefused as exc:
        if exc.code is not wire.ErrorCode.UNAUTHORIZED or listed:
            raise
        return None  # verified here once, and the relay no longer serves it: removed
    assert view.membership is not None
    me_there = view.membership.members.get(view.account_id)
    return CollabRow(
        collab_id=collab_id,
        name=name,
        role=None if me_there is None else me_there.role.value,
        members=len(view.membership.members),
        epoch=view.membership.epoch,
        head_seq=view.head.seq,
        head=short_head(view.head.seq, view.head.chain),
        listed_by_relay=listed,
    )


async def _read_named(
    client: Client, me: Unlocked, collab_id: str
) -> tuple[CollabView, str | None]:
    """The verified view and the latest readable name. A member added after the name was set
    receives that epoch's key with the addition, after the name: a second pass, primed with
    the keys the first opened, reads it then (as `cozy tail` does)."""
    state = me.home.state
    keys: dict[int, bytes] | None = None
    while True:
        name, unreadable = None, False
        async with client.history(
            collab_id,
            me.box_key,
            keys=keys,
            expect=state.head(collab_id),
            receipts=state.receipts(collab_id),
            past_box_keys=me.past_box_keys,
            own_sign_pks=me.own_sign_pks,
        ) as events:
            async for entry in events:
                if isinstance(entry.content, contentmod.CollabMeta):
                    name = entry.content.name
                unreadable = unreadable or bool(entry.unreadable)
        view = events.view
        state.save_head(collab_id, events.head)
        opened = view.known_keys()
        if name is not None or not unreadable or keys is not None or not opened:
            return view, name
        keys = opened


class AccountFacts(msgspec.Struct, frozen=True):
    """`cozy account show`: this device's account, from its own keys."""

    handle: str
    kind: str
    account_id: str
    fingerprint: str  # of this device's own public keys, as `cozy collab add` prints them
    relay: str
    relay_key: str  # hex: the relay signing key this device pinned
    home: str


async def cmd_account_show(args: argparse.Namespace) -> None:
    """Who this device is. The fingerprint comes from the keys in this device's own keystore
    (so it asks for the passphrase), not from the relay: compare it with the one `cozy collab
    add` prints to whoever adds you. No connection is made; it works before any collab."""
    me = await _unlock(Home.from_env())
    facts = AccountFacts(
        handle=me.profile.handle,
        kind=MemberKind.HUMAN.value,  # agents have credential files, not a COZY_HOME
        account_id=me.profile.account_id,
        fingerprint=fingerprint(bytes(me.signing_key.verify_key), bytes(me.box_key.public_key)),
        relay=me.profile.relay_url,
        relay_key=me.profile.relay_pk,
        home=str(me.home.path),
    )
    if args.json:
        emit_json(facts)
        return
    for label, value in (
        ("handle", facts.handle),
        ("kind", facts.kind),
        ("account id", facts.account_id),
        ("fingerprint", facts.fingerprint),
        ("relay", facts.relay),
        ("relay key", facts.relay_key),
        ("home", facts.home),
    ):
        print(f"{label:<12} {value}")
    print(
        "whoever adds you to a collab sees your fingerprint in `cozy collab add`'s answer:"
        " compare it with the one above, out of band",
        file=sys.stderr,
    )
