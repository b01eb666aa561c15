"""Wire frames: one tagged union per direction, msgpack over binary WebSocket messages.

Every request carries a client-chosen ``rid``; the reply to it carries the same ``rid``. Pushes
(events, end-of-catch-up markers, subscription ends) carry no rid. Frames are frozen
msgspec Structs decoded by one reused typed decoder per direction. Decoding is strict: unknown
fields are refused, so a field added later must get a default (a newer side then still reads
an older side's frames) and the protocol version in `Welcome` says which fields a peer knows.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

from model.envelope import SignedEvent
from model.errors import DECODE_ERRORS as _DECODE_ERRORS
from model.membership import MemberKind

PROTOCOL: Final = "cozylabs/1"
# Largest frame the relay reads. Bigger frames get a `frame_too_large` error; frames beyond the
# WebSocket layer's hard cap (WS_HARD_LIMIT) make it close the connection with code 1009.
MAX_FRAME_BYTES: Final = 128 * 1024
MAX_BATCH_FRAMES: Final = 512
WS_HARD_LIMIT: Final = 1024 * 1024


class ErrorCode(enum.StrEnum):
    MALFORMED_FRAME = "malformed_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNAUTHENTICATED = "unauthenticated"
    UNAUTHORIZED = "unauthorized"
    INVALID_CREDENTIALS = "invalid_credentials"
    RATE_LIMITED = "rate_limited"
    STALE = "stale"
    HANDLE_TAKEN = "handle_taken"
    INVALID_REQUEST = "invalid_request"
    INVALID_EVENT = "invalid_event"
    BAD_SIGNATURE = "bad_signature"
    NOT_FOUND = "not_found"
    OVERLOADED = "overloaded"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    QUOTA_EXCEEDED = "quota_exceeded"
    WEAK_KEYSTORE = "weak_keystore"
    TOOL_FAILED = "tool_failed"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class _Frame(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True):
    pass


# --- client → relay -------------------------------------------------------------------------


class Signup(_Frame, frozen=True, tag="signup"):
    """Create an account. With `keystore`, its sealed keystore is stored as version 1 in the
    same transaction (`keystore_sig` as for `PutKeystore`)."""

    rid: int
    account_id: str  # chosen by the client (random), so the keystore signature can bind it
    handle: str
    password: str
    sign_pk: bytes
    box_pk: bytes
    keystore: bytes = b""
    keystore_sig: bytes = b""

    def __repr__(self) -> str:
        return f"Signup(rid={self.rid}, handle={self.handle!r}, password=<redacted>)"


class Login(_Frame, frozen=True, tag="login"):
    rid: int
    handle: str
    password: str

    def __repr__(self) -> str:
        return f"Login(rid={self.rid}, handle={self.handle!r}, password=<redacted>)"


class Authenticate(_Frame, frozen=True, tag="auth"):
    rid: int
    token: str

    def __repr__(self) -> str:
        return f"Authenticate(rid={self.rid}, token=<redacted>)"


class CreateCollab(_Frame, frozen=True, tag="create_collab"):
    """Create a collab from its genesis event: a `mgmt` event whose `create` proof, signed by
    the caller's account key, makes the caller its owner and wraps epoch 0's key for them
    (ADR-0010). The collab id is the one the event names (chosen by the client)."""

    rid: int
    event: SignedEvent


class PutKeystore(_Frame, frozen=True, tag="put_keystore"):
    """Store the caller's sealed keystore as `version` (exactly one more than the stored one).

    An empty `blob` deletes it. `sig` is the account key's signature (model/proofs.py).
    """

    rid: int
    version: int
    blob: bytes
    sig: bytes

    def __repr__(self) -> str:
        return f"PutKeystore(rid={self.rid}, version={self.version}, <{len(self.blob)} bytes>)"


class GetKeystore(_Frame, frozen=True, tag="get_keystore"):
    rid: int


class RotateAccountKeys(_Frame, frozen=True, tag="rotate_account_keys"):
    """Replace the caller's two public keys in the relay's directory (`cozy account
    rotate-keys`, ADR-0017), storing with them a keystore sealed to the new keys.

    `old_sig` (by the registered key: the authority) and `new_sig` (by the new key: proof of
    possession) both sign `model.proofs.account_rekey_bytes` over the old and new keys and the
    keystore; `keystore_sig` is the new key's keystore-write signature for `keystore_version`
    (exactly one more than the stored one). From then on the relay refuses the old key.
    """

    rid: int
    sign_pk: bytes
    box_pk: bytes
    keystore_version: int
    keystore: bytes
    keystore_sig: bytes
    old_sig: bytes
    new_sig: bytes

    def __repr__(self) -> str:
        return (
            f"RotateAccountKeys(rid={self.rid}, keystore_version={self.keystore_version},"
            f" <{len(self.keystore)} bytes>)"
        )


class ListCollabs(_Frame, frozen=True, tag="list_collabs"):
    """The collabs the caller is a member of, from the relay's membership projection (a lying
    relay can leave one out: the client keeps its own list of collabs it verified)."""

    rid: int


class Append(_Frame, frozen=True, tag="append"):
    rid: int
    event: SignedEvent


class Subscribe(_Frame, frozen=True, tag="subscribe"):
    rid: int
    collab_id: str
    from_seq: int = 1
    follow: bool = True


class Unsubscribe(_Frame, frozen=True, tag="unsubscribe"):
    rid: int
    collab_id: str


class GetAccount(_Frame, frozen=True, tag="get_account"):
    rid: int
    account_id: str | None = None
    handle: str | None = None


class CreateAgent(_Frame, frozen=True, tag="create_agent"):
    """Register a bot's account, created by the (human) caller with keys generated on the
    caller's device. The reply carries the agent's long-lived token; its capabilities in a
    collab come from the caller's signed `add` proof. Signed (`sig`, model/proofs.py)."""

    rid: int
    account_id: str
    handle: str
    sign_pk: bytes
    box_pk: bytes
    sig: bytes = b""


class RevokeAgent(_Frame, frozen=True, tag="revoke_agent"):
    """Invalidate every token of an agent the caller created, and drop its connections.
    Signed (`sig`, model/proofs.py)."""

    rid: int
    account_id: str
    sig: bytes = b""


class ListAgents(_Frame, frozen=True, tag="list_agents"):
    """The agents the caller created, revoked ones included (metadata: a session may ask)."""

    rid: int


class ChangePassword(_Frame, frozen=True, tag="change_password"):
    """Replace the caller's login password; every other session of the account ends, and this
    connection gets a fresh token. Signed (`sig`, model/proofs.py): a session alone cannot."""

    rid: int
    password: str
    sig: bytes = b""

    def __repr__(self) -> str:
        return f"ChangePassword(rid={self.rid}, password=<redacted>)"


class EndSessions(_Frame, frozen=True, tag="end_sessions"):
    """End every session of the caller's account, this connection's included: every session
    token issued so far is refused from now on. Signed (`sig`, model/proofs.py)."""

    rid: int
    sig: bytes = b""


class CallTool(_Frame, frozen=True, tag="call_tool"):
    """Ask the relay's broker to call an operator-declared tool on behalf of a collab member
    who was granted `tool:NAME` there (people as agents), unless the operator opened the tool
    to every member. The secret it needs never reaches the caller.
    Signed by the caller's own key (`sig`, model/proofs.py)."""

    rid: int
    collab_id: str
    tool: str
    args: dict[str, str] = msgspec.field(default_factory=dict)
    sig: bytes = b""


class Ping(_Frame, frozen=True, tag="ping"):
    rid: int


class PutArtifactChunk(_Frame, frozen=True, tag="put_artifact_chunk"):
    """One piece of an artifact upload (sealed bytes, model/artifacts.py), in order from 0.

    `upload` is a random id the client picks for this upload on this connection. The final
    piece names the `ref` the whole upload must hash to; the relay checks it before storing.
    Every piece is signed by the uploader's own key (`sig`, model/proofs.py).
    """

    rid: int
    collab_id: str
    upload: str
    index: int
    data: bytes
    final: bool = False
    ref: str = ""
    sig: bytes = b""

    def __repr__(self) -> str:
        return f"PutArtifactChunk(rid={self.rid}, upload={self.upload!r}, index={self.index}, <{len(self.data)} bytes>)"


class GetArtifact(_Frame, frozen=True, tag="get_artifact"):
    rid: int
    collab_id: str
    ref: str


class Batch(_Frame, frozen=True, tag="batch"):
    """Several frames in one WebSocket message, handled in order as if sent one by one.

    Either side may coalesce frames it already has queued; it saves a WebSocket frame and a
    syscall per frame for pipelined traffic. Batches do not nest.
    """

    frames: list[msgspec.Raw]


Request = (
    Batch
    | Signup
    | Login
    | Authenticate
    | CreateCollab
    | Append
    | Subscribe
    | Unsubscribe
    | GetAccount
    | PutKeystore
    | GetKeystore
    | RotateAccountKeys
    | ListCollabs
    | PutArtifactChunk
    | GetArtifact
    | CallTool
    | CreateAgent
    | RevokeAgent
    | ListAgents
    | ChangePassword
    | EndSessions
    | Ping
)

# --- relay → client -------------------------------------------------------------------------


class Welcome(_Frame, frozen=True, tag="welcome"):
    """First frame on every connection: who the relay is and what it accepts.

    `challenge` is fresh random bytes for this connection: signed requests sign it
    (model/proofs.py), so a signature made on one connection is refused on every other.
    """

    protocol: str
    relay_pk: bytes
    max_frame_bytes: int
    max_body_bytes: int
    challenge: bytes = b""


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
    """The ack: the event is durable at `seq`. `receipt_sig` signs the `Receipt` fields."""

    rid: int
    collab_id: str
    seq: int
    event_id: bytes
    chain: bytes
    receipt_sig: bytes
    duplicate: bool = False


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

    Carries only what the subscriber needs to keep verifying the chain across it.
    """

    collab_id: str
    seq: int
    event_id: bytes
    chain: bytes


class CaughtUp(_Frame, frozen=True, tag="caught_up"):
    """Everything up to `seq` has been sent; from here on events arrive live (if following)."""

    collab_id: str
    seq: int


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


Reply = (
    Batch
    | Welcome
    | SignedUp
    | LoggedIn
    | Authenticated
    | CollabCreated
    | Appended
    | Subscribed
    | Event
    | Withheld
    | CaughtUp
    | SubscriptionEnded
    | AccountInfo
    | Unsubscribed
    | KeystoreStored
    | Keystore
    | ArtifactChunkStored
    | ArtifactStored
    | ArtifactData
    | ToolResult
    | AgentCreated
    | AgentRevoked
    | AccountKeysRotated
    | Collabs
    | Agents
    | PasswordChanged
    | SessionsEnded
    | Pong
    | Error
)


class MalformedFrame(Exception):
    """The bytes are not a frame of this protocol. `rid` is recovered when possible."""

    def __init__(self, message: str, rid: int | None = None) -> None:
        super().__init__(message)
        self.rid = rid


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_rid_probe = msgspec.msgpack.Decoder(dict[str, object])


def encode(frame: Request | Reply) -> bytes:
    return _encoder.encode(frame)


def decode_request(data: bytes) -> Request:
    """Decode one client frame. Raises `MalformedFrame` with the rid when it can be recovered."""
    try:
        return _request_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise MalformedFrame(_describe(exc), _probe_rid(data)) from None


def batch(frames: list[bytes]) -> bytes:
    """One frame for several already-encoded frames (or the frame itself when alone)."""
    if len(frames) == 1:
        return frames[0]
    return _encoder.encode(Batch(frames=[msgspec.Raw(f) for f in frames]))


def unbatch_replies(data: bytes) -> list[Reply]:
    """Decode a relay message into its frames, in order. Raises `MalformedFrame`."""
    frame = decode_reply(data)
    if not isinstance(frame, Batch):
        return [frame]
    out = [decode_reply(bytes(raw)) for raw in frame.frames]
    if any(isinstance(f, Batch) for f in out):
        raise MalformedFrame("batches do not nest")
    return out


def decode_reply(data: bytes) -> Reply:
    try:
        return _reply_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise MalformedFrame(_describe(exc)) from None


def _describe(exc: Exception) -> str:
    return f"frame does not decode ({exc}); see docs/protocol.md for the frame formats"


def _probe_rid(data: bytes) -> int | None:
    try:
        rid = _rid_probe.decode(data).get("rid")
    except _DECODE_ERRORS:
        return None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
