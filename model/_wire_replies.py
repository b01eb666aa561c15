"""Relay → client frames: replies to requests and pushes (re-exported by `model.wire`).

Callers use `model.wire`; see its docstring for the rules every frame follows.
"""

from __future__ import annotations

import msgspec

from model._wire_base import ErrorCode, _Frame
from model.envelope import SignedEvent
from model.membership import MemberKind

# --- relay → client -------------------------------------------------------------------------


class Welcome(_Frame, frozen=True, tag="welcome"):
    """First frame on every connection: who the relay is and what it accepts.

    `challenge` is fresh random bytes for this connection: signed requests sign it
    (model/proofs.py), so a signature made on one connection is refused on every other.
    `heartbeat_ms` is how often an open subscription gets a signed checkpoint when nothing else
    sent one (the relay's `COZY_CHECKPOINT_INTERVAL_MS`; 0: not announced): a client's default
    staleness bound follows it (`model.checkpoints.stale_after`).
    """

    protocol: str
    relay_pk: bytes
    max_frame_bytes: int
    max_body_bytes: int
    challenge: bytes = b""
    heartbeat_ms: int = 0


class SignedUp(_Frame, frozen=True, tag="signed_up"):
    rid: int
    account_id: str


class LoggedIn(_Frame, frozen=True, tag="logged_in"):
    rid: int
    account_id: str
    token: str
    expires_at: int

    def __repr__(self) -> str:
        return f"LoggedIn(rid={self.rid}, account_id={self.account_id!r}, token=<redacted>)"


class Authenticated(_Frame, frozen=True, tag="authenticated"):
    rid: int
    account_id: str


class CollabCreated(_Frame, frozen=True, tag="collab_created"):
    rid: int
    collab_id: str


class Appended(_Frame, frozen=True, tag="appended"):
    """The ack: the event is durable at `seq`, and its receipt (ADR-0020).

    The receipt is `checkpoint`, the relay's signed, dated checkpoint of the collab's tree (the
    one after the commit group that stored the event, shared by every ack of the group; for a
    duplicate, one that covers its stored seq), and `inclusion`, the proof that `event_id` is
    leaf `seq - 1` under it (model/equivocation.py `open_receipt`). The relay signs once per
    group, not per event. `chain` is the head after the event, unsigned (the client recomputes
    it from the history). A client refuses an ack whose receipt is missing or does not verify.
    """

    rid: int
    collab_id: str
    seq: int
    event_id: bytes
    chain: bytes
    duplicate: bool = False
    checkpoint: bytes = b""
    inclusion: list[bytes] = msgspec.field(default_factory=list)


class Subscribed(_Frame, frozen=True, tag="subscribed"):
    rid: int
    collab_id: str
    from_seq: int


class Event(_Frame, frozen=True, tag="event"):
    """A sequenced event pushed to a subscriber. Encoded once, sent to every subscriber."""

    collab_id: str
    seq: int
    event: SignedEvent
    chain: bytes


class Withheld(_Frame, frozen=True, tag="withheld"):
    """A position whose body is not for this subscriber (a DM between two other members).

    Carries what the subscriber needs to keep verifying the chain across it, and the DM's
    signed header (`model.envelope.DmHeader`: author, recipient, epoch, a commitment to the
    rest) with its author's signature, so the subscriber can check that the position really is
    a DM between two other members and not an event the relay hides from it.
    """

    collab_id: str
    seq: int
    event_id: bytes
    chain: bytes
    author_id: str
    recipient_id: str
    epoch: int
    sealed: bytes
    sig: bytes


class CaughtUp(_Frame, frozen=True, tag="caught_up"):
    """Everything up to `seq` has been sent; from here on events arrive live (if following).

    `checkpoint` is the relay's signed, dated checkpoint of size `seq`, and `consistency` the
    proof from size `proof_from` (the subscriber's `tree_size`, when not above `seq`) to it.
    """

    collab_id: str
    seq: int
    checkpoint: bytes = b""
    proof_from: int = 0
    consistency: list[bytes] = msgspec.field(default_factory=list)


class TreeHead(_Frame, frozen=True, tag="checkpoint"):
    """The heartbeat of an open subscription (at least every `checkpoint_interval` seconds):
    the collab's current signed, dated checkpoint and the consistency proof from the size of
    the last checkpoint sent on this subscription (`proof_from`). When the witnesses have not
    cosigned that checkpoint (commits outran them), also the newest one they did cosign, with
    its cosignatures (`witnessed`), and the consistency proof from its size to the current
    one (`witnessed_proof`)."""

    collab_id: str
    checkpoint: bytes
    proof_from: int
    consistency: list[bytes] = msgspec.field(default_factory=list)
    witnessed: bytes = b""
    witnessed_proof: list[bytes] = msgspec.field(default_factory=list)


class SubscriptionEnded(_Frame, frozen=True, tag="subscription_ended"):
    """The relay stopped this subscription. Resume with `Subscribe(from_seq=resume_from)`."""

    collab_id: str
    reason: str
    resume_from: int


class AccountInfo(_Frame, frozen=True, tag="account"):
    """An entry of the relay's account directory. `kind` says whether the account is a person's
    or an agent's: a client seats it in a collab only as that kind (None: a relay from before
    the field, whose answer is not enough to add anyone)."""

    rid: int
    account_id: str
    handle: str
    sign_pk: bytes
    box_pk: bytes
    kind: MemberKind | None = None


class KeystoreStored(_Frame, frozen=True, tag="keystore_stored"):
    rid: int
    version: int


class Keystore(_Frame, frozen=True, tag="keystore"):
    """The caller's sealed keystore (useless without the passphrase or recovery code)."""

    rid: int
    version: int
    blob: bytes

    def __repr__(self) -> str:
        return f"Keystore(rid={self.rid}, version={self.version}, <{len(self.blob)} bytes>)"


class ArtifactChunkStored(_Frame, frozen=True, tag="artifact_chunk_stored"):
    rid: int
    index: int


class ArtifactStored(_Frame, frozen=True, tag="artifact_stored"):
    rid: int
    ref: str
    size: int


class ArtifactData(_Frame, frozen=True, tag="artifact_data"):
    """One stored piece of an artifact, in order; the one with `final` ends the download."""

    rid: int
    index: int
    data: bytes
    final: bool

    def __repr__(self) -> str:
        return f"ArtifactData(rid={self.rid}, index={self.index}, <{len(self.data)} bytes>)"


class Unsubscribed(_Frame, frozen=True, tag="unsubscribed"):
    rid: int
    collab_id: str


class AgentCreated(_Frame, frozen=True, tag="agent_created"):
    rid: int
    account_id: str
    token: str
    expires_at: int

    def __repr__(self) -> str:
        return f"AgentCreated(rid={self.rid}, account_id={self.account_id!r}, token=<redacted>)"


class AgentRevoked(_Frame, frozen=True, tag="agent_revoked"):
    rid: int
    account_id: str


class AgentInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One agent in an `Agents` reply. `created_at` is in seconds since the epoch."""

    account_id: str
    handle: str
    created_at: int
    revoked: bool


class Agents(_Frame, frozen=True, tag="agents"):
    rid: int
    agents: list[AgentInfo]


class PasswordChanged(_Frame, frozen=True, tag="password_changed"):
    """The new password is stored and every other session ended; `token` is this device's new
    session (the old one was ended with the others)."""

    rid: int
    token: str
    expires_at: int

    def __repr__(self) -> str:
        return f"PasswordChanged(rid={self.rid}, token=<redacted>)"


class SessionsEnded(_Frame, frozen=True, tag="sessions_ended"):
    """Every session of the account ended, this connection's too: log in again to go on."""

    rid: int


class ToolResult(_Frame, frozen=True, tag="tool_result"):
    """The upstream's answer to a tool call, with every credential value scrubbed."""

    rid: int
    status: int
    body: str


class Pong(_Frame, frozen=True, tag="pong"):
    rid: int


class AccountKeysRotated(_Frame, frozen=True, tag="account_keys_rotated"):
    rid: int
    keystore_version: int


class Collabs(_Frame, frozen=True, tag="collabs"):
    rid: int
    collab_ids: list[str]


class Error(_Frame, frozen=True, tag="error"):
    """A typed refusal. `rid` is None when the offending frame could not be read at all."""

    rid: int | None
    code: ErrorCode
    message: str
    # With code `stale`: the head the refused change or event must now be made against.
    head_seq: int | None = None
