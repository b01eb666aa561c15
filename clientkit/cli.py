"""The people's CLI: `cozy account …`, `cozy collab …`, `cozy post`, `cozy tail`.

Non-interactive when COZY_HOME, COZY_PASSWORD (login password) and COZY_PASSPHRASE (keystore
passphrase) are set (COZY_NEW_PASSWORD / COZY_NEW_PASSPHRASE for the changes); otherwise it
prompts. Every change is signed with the account key, so it needs the passphrase: a login
session alone can only read. Exit codes: 0 ok, 1 refused or failed, 2 usage,
3 integrity alarm (the relay delivered something that does not verify).

This module is the entry point only: the argument parser (`register`) and the runner that turns
errors into one line and an exit code (`run_command`, through `_cli_errors`). The commands live
by role in private modules: `_cli_accounts` (signup, restore, recover, passphrase, login,
password, sessions), `_cli_rotate_keys`, `_cli_collabs`, `_cli_agents`, `_cli_discovery`
(collab list, account show, the `--json` form), `_cli_messages` (post, dm, attach, fetch,
verify, evidence) and `_cli_tail`, on the shared plumbing in `_cli_session` (secrets, unlock,
the login, the connection and the `clientkit.Session` every command acts through) and
`_cli_changes` (membership changes). Sealing, posting, retries and the checked read live in the
Session, which the bot kit uses too.
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

import trio

from clientkit._cli_accounts import (
    cmd_account_password,
    cmd_account_sessions,
    cmd_change_passphrase,
    cmd_login,
    cmd_recover,
    cmd_restore,
    cmd_signup,
)
from clientkit._cli_agents import cmd_account_agents, cmd_agent_create, cmd_agent_revoke
from clientkit._cli_collabs import (
    cmd_collab_add,
    cmd_collab_create,
    cmd_collab_grant,
    cmd_collab_members,
    cmd_collab_remove,
    cmd_collab_role,
    cmd_collab_rotate,
    cmd_collab_witnesses,
)
from clientkit._cli_discovery import cmd_account_show, cmd_collab_list
from clientkit._cli_errors import report
from clientkit._cli_messages import (
    cmd_attach,
    cmd_dm,
    cmd_evidence_check,
    cmd_fetch,
    cmd_post,
    cmd_verify,
)
from clientkit._cli_rotate_keys import cmd_rotate_keys
from clientkit._cli_tail import cmd_tail
from clientkit._transport import BadRelayUrl, check_relay_url
from model.membership import Role

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands to the `cozy` parser (the composition root lives in `cozy.cli`)."""
    account = sub.add_parser("account", help="sign up, log in").add_subparsers(
        dest="action", required=True
    )
    p = account.add_parser("signup", help="create an account on a relay")
    p.add_argument(
        "--relay", required=True, type=_relay_url, help="relay URL, e.g. ws://127.0.0.1:8765"
    )
    p.add_argument("--handle", required=True)
    p.set_defaults(run=cmd_signup)
    p = account.add_parser("login", help="get a fresh session token")
    p.add_argument(
        "--repin", action="store_true", help="accept a new relay signing key (operator rotated it)"
    )
    p.set_defaults(run=cmd_login)
    p = account.add_parser("restore", help="set up this device from the relay's sealed keystore")
    p.add_argument("--relay", required=True, type=_relay_url)
    p.add_argument("--handle", required=True)
    p.set_defaults(run=cmd_restore)
    p = account.add_parser(
        "recover", help="open the keystore with the recovery code; set a new passphrase"
    )
    p.add_argument("--relay", type=_relay_url, help="needed when this device holds no account")
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
    p = account.add_parser(
        "show", help="this device's account: handle, kind, id and your key fingerprint"
    )
    _json_flag(p)
    p.set_defaults(run=cmd_account_show)
    p = account.add_parser("agents", help="list the agents you created")
    _json_flag(p)
    p.set_defaults(run=cmd_account_agents)
    p = account.add_parser("sessions", help="end every session of your account")
    p.add_argument(
        "--end-all",
        action="store_true",
        help="end every session on every device (each logs in again with the password)",
    )
    p.set_defaults(run=cmd_account_sessions)

    collab = sub.add_parser("collab", help="collabs").add_subparsers(dest="action", required=True)
    p = collab.add_parser(
        "list", help="the collabs you are in: id, name, your role, members, verified head"
    )
    _json_flag(p)
    p.set_defaults(run=cmd_collab_list)
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
    p = collab.add_parser(
        "witnesses", help="require k of these witnesses to cosign every head members accept"
    )
    p.add_argument("collab")
    p.add_argument("vkeys", nargs="*", metavar="VKEY", help="a witness's verifier key (none: off)")
    p.add_argument("--quorum", type=int, help="how many must cosign (default: all listed)")
    p.set_defaults(run=cmd_collab_witnesses)
    p = collab.add_parser("members", help="list members as this device verified them")
    p.add_argument("collab")
    _json_flag(p)
    p.set_defaults(run=cmd_collab_members)

    agent = sub.add_parser("agent", help="bots: create and revoke agents").add_subparsers(
        dest="action", required=True
    )
    p = agent.add_parser("create", help="create an agent in a collab; writes its credential file")
    p.add_argument("collab")
    p.add_argument("name", help="the agent's handle")
    p.add_argument("--cap", action="append", metavar="CAP", help="read, post or tool:NAME (repeat)")
    p.add_argument(
        "--out", help="credential file to write (default COZY_HOME/agents/NAME.cozy-agent)"
    )
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
    p.add_argument(
        "--max-age",
        metavar="AGE",
        type=duration,
        help="fail when the freshest signed head this device holds is older (60s, 5m, 1h)",
    )
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
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing new events (reconnecting if the relay goes away)",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per event instead of a tab line"
    )
    p.add_argument(
        "--stale-after",
        metavar="AGE",
        type=duration,
        help="following, warn when no signed checkpoint is newer than this (default: the relay's"
        " announced heartbeat interval plus a grace, 45s for its default; 0: off)",
    )
    p.set_defaults(run=cmd_tail)


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `5m` or `1h` (checked while parsing)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: write it like 60s, 5m or 1h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def _relay_url(text: str) -> str:
    """Checked while parsing, so a typo costs no Argon2id sealing before it is noticed."""
    try:
        return check_relay_url(text)
    except BadRelayUrl as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (stable field names)")


def run_command(
    fn: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], args: argparse.Namespace
) -> int:
    """Run one async command; a failure becomes one line on stderr and an exit code
    (`clientkit._cli_errors.report`), never a traceback."""
    try:
        trio.run(fn, args)
    except BaseException as exc:  # noqa: BLE001 — every failure is reported (SystemExit re-raised)
        return report(exc)
    return 0
