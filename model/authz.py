"""Who may send which request: the relay's authorization rules, written as one table.

What lives here: for every request type of the wire (model/wire.py) one `Rule` saying what
standing the sender needs — a live session or none, a person or also an agent, a signature by
the account's own key, membership of the collab it names and which capability there — and the
pure function `decide` that applies a rule to what the relay knows about the sender. The relay
enforces the table in exactly one place (relay/_dispatch.py) before any handler runs, and a
request type with no row cannot be dispatched at all (`rule_for` raises), so a new request is
refused until someone writes down who may send it. tests/test_authz_matrix.py drives every row
against a real relay for every kind of principal.

What does not live here: looking the sender up (sessions, the membership projection) is I/O and
lives in the relay; the signatures themselves (`Signed`) are checked by the relay: a signed
request's own `sig` by the dispatcher at the same point (model/proofs.py), a signed statement
the request carries (an event, a keystore write) by the handler that understands it; both
refuse with `bad_signature` and change nothing. The sequencer's admission of events at their
position in the ledger is model/admission.py's.

Principals, as the table sees them (SO-5, SO-6, SO-9):
- ANONYMOUS: nobody logged in — never authenticated, session expired, agent token revoked, or
  a token signed with a rotated `JWT_SIGNING_KEY` (all look the same once refused at bind).
- HUMAN / AGENT: a live session of that account kind. A password session proves only the login
  password; whatever changes state must also carry the account key's signature (`signed`).
- In a collab: a member with a role and capabilities, or a non-member (never added, or removed:
  a removal evicts the relay's cached membership, so the two look the same).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from model import wire
from model.membership import CAP_POST, CAP_READ, CAP_TOOL_PREFIX, MemberKind

if TYPE_CHECKING:
    from collections.abc import Mapping


class Standing(enum.StrEnum):
    """Who the connection speaks for right now."""

    ANONYMOUS = "anonymous"
    HUMAN = "human"
    AGENT = "agent"


class Senders(enum.StrEnum):
    """Which standings a rule admits at all."""

    ANYONE = "anyone"  # no session needed (sign-up, login, authenticate, ping)
    ACCOUNTS = "accounts"  # a live session of any account kind
    PEOPLE = "people"  # a live session of a human account; agents are refused


class Capability(enum.StrEnum):
    """What a collab-scoped request needs of the sender's membership in that collab."""

    MEMBER = "member"  # membership only (content appends: the sequencer checks `post` itself)
    READ = CAP_READ
    POST = CAP_POST
    TOOL = "tool"  # `tool:NAME` for the tool the request names (see `ToolAccess`)


class Signed(enum.StrEnum):
    """Which signature by the sender's own account key (the one bound at login) a request needs.

    Without it the request is refused with `bad_signature` and changes nothing (SO-5).
    """

    NONE = "none"  # reads: a session alone may send it
    # The request's own `sig`, over the request and this connection's challenge
    # (model/proofs.py `verify_request`); checked by the authorization point itself.
    REQUEST = "request"
    # The request carries a statement signed on its own terms (a signed event; a keystore
    # write signed with its version); checked by the handler that reads that statement.
    PAYLOAD = "payload"


@dataclass(frozen=True, slots=True)
class Rule:
    senders: Senders
    signed: Signed = Signed.NONE
    # Membership the request needs in the collab it names; None for requests outside a collab.
    capability: Capability | None = None
    # A non-member (refused for want of membership; a member lacking a capability is refused as
    # usual) may still learn the fate of an event of its own that is stored already — sent by
    # it, naming it as the author, stored as its (relay/_collabs.py `answer_if_stored`): a
    # removed member's retry of an append whose ack it lost is answered with the stored
    # position, never with `unauthorized`, and it learns nothing of anyone else's events.
    own_stored_fate: bool = False


@dataclass(frozen=True, slots=True)
class MemberView:
    """What the relay knows of the sender's membership in one collab (the projection)."""

    kind: MemberKind
    caps: tuple[str, ...]


# In `ToolAccess.collabs`: the tool may be used in every collab (then anyone who signs up can
# create a collab and grant it to themselves: only for a credential the operator means to share).
ANY_COLLAB: Final = "*"


@dataclass(frozen=True, slots=True)
class ToolAccess:
    """What the operator declared about who may use one tool (`[tools.NAME]`, docs/broker.md).

    A tool is usable only in the collabs the operator names, so a fresh account cannot create a
    collab, grant itself the tool and spend the operator's credential. There, a member needs
    the `tool:NAME` grant, unless the operator opened the tool to every member.
    """

    collabs: frozenset[str]
    open_to_members: bool = False

    def available_in(self, collab_id: str) -> bool:
        return ANY_COLLAB in self.collabs or collab_id in self.collabs


@dataclass(frozen=True, slots=True)
class Refusal:
    code: wire.ErrorCode
    message: str


ANYONE: Final = Rule(Senders.ANYONE)

# One row per request type. Signed rows are the changes (SO-5): a login session without the
# account key can read metadata and its own sealed keystore, and nothing more.
RULES: Final[dict[type[wire.Request], Rule]] = {
    wire.Ping: ANYONE,
    wire.Signup: ANYONE,  # registers keys; a keystore sent with it is signed by the new key
    wire.Login: ANYONE,  # answers a person's password only; agents have none
    wire.Authenticate: ANYONE,
    wire.GetAccount: Rule(Senders.ACCOUNTS),
    wire.GetKeystore: Rule(Senders.ACCOUNTS),  # sealed: a new device restores through it
    wire.PutKeystore: Rule(Senders.ACCOUNTS, Signed.PAYLOAD),  # signed with its version
    # Signed by the old and the new account key (ADR-0017); agents rotate by being replaced.
    wire.RotateAccountKeys: Rule(Senders.PEOPLE, Signed.PAYLOAD),
    wire.ListCollabs: Rule(Senders.ACCOUNTS),  # metadata: which collabs the caller is in
    wire.ListAgents: Rule(Senders.PEOPLE),  # metadata: the caller's own agents
    wire.ChangePassword: Rule(Senders.PEOPLE, Signed.REQUEST),
    wire.EndSessions: Rule(Senders.PEOPLE, Signed.REQUEST),
    wire.CreateCollab: Rule(Senders.PEOPLE, Signed.PAYLOAD),  # the genesis event
    wire.CreateAgent: Rule(Senders.PEOPLE, Signed.REQUEST),
    wire.RevokeAgent: Rule(Senders.PEOPLE, Signed.REQUEST),
    wire.Append: Rule(
        Senders.ACCOUNTS, Signed.PAYLOAD, capability=Capability.MEMBER, own_stored_fate=True
    ),
    wire.Subscribe: Rule(Senders.ACCOUNTS, capability=Capability.READ),
    wire.Unsubscribe: Rule(Senders.ACCOUNTS),  # only this connection's own subscriptions
    wire.GetArtifact: Rule(Senders.ACCOUNTS, capability=Capability.READ),
    # Every piece: each is stored as it arrives, so an unsigned one would already be a change.
    wire.PutArtifactChunk: Rule(Senders.ACCOUNTS, Signed.REQUEST, capability=Capability.POST),
    wire.CallTool: Rule(Senders.ACCOUNTS, Signed.REQUEST, capability=Capability.TOOL),
}


class NoRule(Exception):
    """A request type without a row in `RULES`: a programming error, refused as `internal`."""


def rule_for(request: wire.Request) -> Rule:
    try:
        return RULES[type(request)]
    except KeyError:
        raise NoRule(type(request).__name__) from None


def collab_of(request: wire.Request) -> str | None:
    """The collab a collab-scoped request names on its face (None for the others).

    An append names its collab inside the signed body, which the relay decodes first and passes
    to `decide` itself.
    """
    match request:
        case (
            wire.Subscribe(collab_id=c)
            | wire.GetArtifact(collab_id=c)
            | wire.PutArtifactChunk(collab_id=c)
            | wire.CallTool(collab_id=c)
        ):
            return c
    return None


def needed_capability(rule: Rule, request: wire.Request) -> str | None:
    """The membership capability string `request` needs, or None for membership alone."""
    match rule.capability:
        case None | Capability.MEMBER:
            return None
        case Capability.TOOL:
            assert isinstance(request, wire.CallTool)
            return CAP_TOOL_PREFIX + request.tool
        case cap:
            return cap.value


def decide_sender(rule: Rule, standing: Standing, *, ended: str | None = None) -> Refusal | None:
    """The first half of the decision: may this kind of principal send the request at all?

    `ended` is why the relay ended the connection's last session (it expired; the account
    ended its sessions or changed its password), a message saying what to do next; only the
    message differs.
    """
    if rule.senders is Senders.ANYONE:
        return None
    if standing is Standing.ANONYMOUS:
        return Refusal(
            wire.ErrorCode.UNAUTHENTICATED,
            ended or "log in or authenticate with a session token first",
        )
    if rule.senders is Senders.PEOPLE and standing is not Standing.HUMAN:
        return Refusal(
            wire.ErrorCode.UNAUTHORIZED,
            "agents cannot do this: only a person's account may (agents have no management"
            " surface)",
        )
    return None


def decide_signature(rule: Rule, *, verified: bool) -> Refusal | None:
    """The signature half, for `Signed.REQUEST` rows: `verified` says whether the request's
    `sig` is the bound account key's signature over it on this connection."""
    if rule.signed is not Signed.REQUEST or verified:
        return None
    return Refusal(
        wire.ErrorCode.BAD_SIGNATURE,
        "this request must be signed by your account key on this connection: unlock your"
        " keys (the CLI does it with your passphrase; a bot with its credential file) and"
        " send it again. A login session alone can only read. Nothing was changed",
    )


def decide_member(
    member: MemberView | None,
    capability: str | None,
    *,
    collab_id: str,
    tools: Mapping[str, ToolAccess],
) -> Refusal | None:
    """The second half, for a collab-scoped request: is the sender a member holding `capability`?

    A non-member gets the same answer whether or not the collab exists (and learns nothing of
    the relay's tools). People read and post by membership; agents need `read` and `post`
    explicitly. A tool needs, for people as for agents, the operator's leave to be used in this
    collab and then the member's `tool:NAME` grant, unless the operator opened it to every
    member there.
    """
    if member is None:
        return Refusal(wire.ErrorCode.UNAUTHORIZED, "you are not a member of this collab")
    if capability is None:
        return None
    if capability.startswith(CAP_TOOL_PREFIX):
        return _decide_tool(member, capability[len(CAP_TOOL_PREFIX) :], collab_id, tools)
    if member.kind is MemberKind.HUMAN or capability in member.caps:
        return None
    return Refusal(
        wire.ErrorCode.UNAUTHORIZED, f"this agent was not given the {capability!r} capability"
    )


def _decide_tool(
    member: MemberView, tool: str, collab_id: str, tools: Mapping[str, ToolAccess]
) -> Refusal | None:
    access = tools.get(tool)
    if access is None:
        return Refusal(wire.ErrorCode.NOT_FOUND, f"this relay declares no tool {tool!r}")
    if not access.available_in(collab_id):
        return Refusal(
            wire.ErrorCode.UNAUTHORIZED,
            f"the relay's operator has not made the tool {tool!r} available in this collab;"
            " ask them to add it to the tool's `collabs`",
        )
    if access.open_to_members or CAP_TOOL_PREFIX + tool in member.caps:
        return None
    return Refusal(
        wire.ErrorCode.UNAUTHORIZED,
        f"you were not granted {CAP_TOOL_PREFIX}{tool} in this collab: an owner or manager"
        f" grants it (cozy collab grant COLLAB HANDLE {CAP_TOOL_PREFIX}{tool})",
    )
