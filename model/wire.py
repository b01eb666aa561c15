"""Wire frames: one tagged union per direction, msgpack over binary WebSocket messages.

Every request carries a client-chosen ``rid``; the reply to it carries the same ``rid``. Pushes
(events, end-of-catch-up markers, subscription ends) carry no rid. Frames are frozen
msgspec Structs decoded by one reused typed decoder per direction. Decoding is strict: unknown
fields are refused, so a field added later must get a default (a newer side then still reads
an older side's frames) and the protocol version in `Welcome` says which fields a peer knows
(model/protocol.py reads it before these types do; ADR-0021). docs/protocol.md describes every
frame, and tests/test_protocol_doc.py builds each one from that page.

The request frames, both unions and the codec live here; the relay → client frames are in
model/_wire_replies.py and the shared base and error codes in model/_wire_base.py (so no module
grows past ~600 lines). All are re-exported here: import frames from `model.wire`.
"""

from __future__ import annotations

from typing import Final

import msgspec

from model._wire_base import ErrorCode as ErrorCode
from model._wire_base import _Frame as _Frame
from model._wire_replies import AccountInfo as AccountInfo
from model._wire_replies import AccountKeysRotated as AccountKeysRotated
from model._wire_replies import AgentCreated as AgentCreated
from model._wire_replies import AgentInfo as AgentInfo
from model._wire_replies import AgentRevoked as AgentRevoked
from model._wire_replies import Agents as Agents
from model._wire_replies import Appended as Appended
from model._wire_replies import ArtifactChunkStored as ArtifactChunkStored
from model._wire_replies import ArtifactData as ArtifactData
from model._wire_replies import ArtifactStored as ArtifactStored
from model._wire_replies import Authenticated as Authenticated
from model._wire_replies import CaughtUp as CaughtUp
from model._wire_replies import CollabCreated as CollabCreated
from model._wire_replies import Collabs as Collabs
from model._wire_replies import Error as Error
from model._wire_replies import Event as Event
from model._wire_replies import Keystore as Keystore
from model._wire_replies import KeystoreStored as KeystoreStored
from model._wire_replies import LoggedIn as LoggedIn
from model._wire_replies import PasswordChanged as PasswordChanged
from model._wire_replies import Pong as Pong
from model._wire_replies import SessionsEnded as SessionsEnded
from model._wire_replies import SignedUp as SignedUp
from model._wire_replies import Subscribed as Subscribed
from model._wire_replies import SubscriptionEnded as SubscriptionEnded
from model._wire_replies import ToolResult as ToolResult
from model._wire_replies import TreeHead as TreeHead
from model._wire_replies import Unsubscribed as Unsubscribed
from model._wire_replies import Welcome as Welcome
from model._wire_replies import Withheld as Withheld
from model.envelope import SignedEvent
from model.errors import DECODE_ERRORS as _DECODE_ERRORS
from model.protocol import PROTOCOL as PROTOCOL
from model.protocol import CloseCode as CloseCode

# Largest frame the relay reads. Bigger frames get a `frame_too_large` error; frames beyond the
# WebSocket layer's hard cap (WS_HARD_LIMIT) make it close the connection with code 1009.
MAX_FRAME_BYTES: Final = 128 * 1024
MAX_BATCH_FRAMES: Final = 512
WS_HARD_LIMIT: Final = 1024 * 1024


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
    tree_size: int = 0  # the size of the last checkpoint this device verified (ADR-0020)


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

    Each element is a frame's msgpack map placed inline (`Raw`), not wrapped in `bin`: the
    message is one msgpack value, and inner frames are copied, never re-encoded.

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
    | TreeHead
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
    return b"".join([batch_head(len(frames)), *frames])


# msgspec's encoding of `Batch(frames=[])` without its empty array's header: a `batch` is this,
# its frames' array header, then the frames' bytes as they are (`Raw` is copied verbatim).
_BATCH_HEAD: Final = _encoder.encode(Batch(frames=[]))[:-1]


def batch_head(n: int) -> bytes:
    """The bytes of a `batch` of `n` frames that come before the frames, so a batch can be
    joined in one copy; the same bytes msgspec writes (tests/test_catchup_frames.py)."""
    if n < 16:
        return _BATCH_HEAD + bytes([0x90 | n])
    if n < 1 << 16:
        return _BATCH_HEAD + b"\xdc" + n.to_bytes(2, "big")
    return _BATCH_HEAD + b"\xdd" + n.to_bytes(4, "big")


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
