"""SO-1's field-by-field walker: what each field of each wire type and each ledger column may
hold, and a walker that checks decoded frames and rows against it.

`FIELDS` classifies every field of every struct that can cross the wire (frames, signed events,
event bodies, management proofs, sealed keystores) and `COLUMNS` every column of every table.
Plaintext classes are routing metadata (ids, counters, kinds, refs, handles, hashes, signatures,
public keys, nonces), management proofs (ADR-0010), credentials the relay verifies (login
password, tokens), text the relay writes itself, and the broker's tool traffic (SO-9); everything
else is opaque and must open as ciphertext with a key the members hold. An unclassified field
or column is a problem, so a new field or migration forces a decision here.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import enum
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect as mi
import nacl.signing
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from ledger._migrations import MIGRATIONS
from model import artifacts, dm, keystore, membership, wire
from model import content as contentmod
from model._crypto import CryptoError
from model.envelope import (
    KIND_DM,
    KIND_MANAGEMENT,
    EventBody,
    SignedEvent,
    VerifiedEvent,
    decode_body,
    open_content,
    verify_event,
)
from model.epochs import open_wrap
from model.errors import ModelError
from model.membership import MemberKind, Role, valid_cap
from model.note import NoteVerifier, parse_note
from model.tlog import parse_checkpoint
from tests.wire_tap import Direction, Opcode, Tap, parse_websocket

if TYPE_CHECKING:
    from collections.abc import Callable

    import nacl.public


# --- what each field may hold ----------------------------------------------------------------


class Check(enum.Enum):
    """What a field holds, and so how the walker checks it."""

    # Plaintext the relay reads by design, each checked for its shape.
    ID = "id"
    NUMBER = "number"
    FLAG = "flag"
    TIME = "time"
    KIND = "kind"
    ROLE = "role"
    MEMBER_KIND = "member_kind"
    CAPS = "caps"
    WITNESS_KEYS = "witness_keys"  # C2SP verifier key strings of witnesses (public keys)
    HANDLE = "handle"
    REF = "ref"
    REFS = "refs"
    UPLOAD = "upload"
    CODE = "code"
    PROTOCOL = "protocol"
    KDF_ALG = "kdf_alg"
    TOOL = "tool"
    MIGRATION = "migration"
    RELAY_TEXT = "relay_text"
    PASSWORD = "password"
    TOKEN = "token"
    BROKER = "broker"
    # Cryptographic values that carry no content: exact lengths, known keys.
    HASH = "hash"
    SIGNATURE = "signature"
    PUBLIC_KEY = "public_key"
    NONCE = "nonce"
    CHALLENGE = "challenge"
    SALT = "salt"
    CHECKPOINT = "checkpoint"  # the relay's signed note: origin, size, root hash, signatures
    HASHES = "hashes"  # a Merkle proof: a list of 32-byte hashes
    # Opaque: must open as ciphertext with a key the members hold.
    CIPHERTEXT = "ciphertext"
    SEALED = "sealed"
    WRAPS = "wraps"
    KEYSTORE = "keystore"
    ARTIFACT_PIECE = "artifact_piece"
    PASSWORD_HASH = "password_hash"
    # Containers, walked into.
    EVENT = "event"
    BODY = "body"
    STRUCT = "struct"
    STRUCTS = "structs"
    OPERATION = "operation"
    FRAMES = "frames"


C = Check
OPAQUE = {C.CIPHERTEXT, C.SEALED, C.WRAPS, C.KEYSTORE, C.ARTIFACT_PIECE, C.PASSWORD_HASH}
CONTAINERS = {C.EVENT, C.BODY, C.STRUCT, C.STRUCTS, C.OPERATION, C.FRAMES}
SPECIAL_PLAINTEXT = {
    C.PASSWORD: "credential",  # the login secret the relay verifies (hashed at rest)
    C.TOKEN: "credential",  # the relay's own session / agent token
    C.RELAY_TEXT: "relay-written",  # error messages and reasons the relay composes
    C.MIGRATION: "relay-written",
    C.BROKER: "broker",  # tool arguments and scrubbed results: the broker runs on the relay (SO-9)
}


_RID, _ID = C.NUMBER, C.ID
FIELDS: dict[type[msgspec.Struct], dict[str, Check]] = {
    # client → relay
    wire.Signup: {"rid": _RID, "account_id": _ID, "handle": C.HANDLE, "password": C.PASSWORD,
                  "sign_pk": C.PUBLIC_KEY, "box_pk": C.PUBLIC_KEY, "keystore": C.KEYSTORE,
                  "keystore_sig": C.SIGNATURE},
    wire.Login: {"rid": _RID, "handle": C.HANDLE, "password": C.PASSWORD},
    wire.Authenticate: {"rid": _RID, "token": C.TOKEN},
    wire.CreateCollab: {"rid": _RID, "event": C.EVENT},
    wire.PutKeystore: {"rid": _RID, "version": C.NUMBER, "blob": C.KEYSTORE, "sig": C.SIGNATURE},
    wire.GetKeystore: {"rid": _RID},
    wire.RotateAccountKeys: {"rid": _RID, "sign_pk": C.PUBLIC_KEY, "box_pk": C.PUBLIC_KEY,
                             "keystore_version": C.NUMBER, "keystore": C.KEYSTORE,
                             "keystore_sig": C.SIGNATURE, "old_sig": C.SIGNATURE,
                             "new_sig": C.SIGNATURE},
    wire.ListCollabs: {"rid": _RID},
    wire.Append: {"rid": _RID, "event": C.EVENT},
    wire.Subscribe: {"rid": _RID, "collab_id": _ID, "from_seq": C.NUMBER, "follow": C.FLAG,
                     "tree_size": C.NUMBER},
    wire.Unsubscribe: {"rid": _RID, "collab_id": _ID},
    wire.GetAccount: {"rid": _RID, "account_id": _ID, "handle": C.HANDLE},
    wire.CreateAgent: {"rid": _RID, "account_id": _ID, "handle": C.HANDLE,
                       "sign_pk": C.PUBLIC_KEY, "box_pk": C.PUBLIC_KEY, "sig": C.SIGNATURE},
    wire.RevokeAgent: {"rid": _RID, "account_id": _ID, "sig": C.SIGNATURE},
    wire.ListAgents: {"rid": _RID},
    wire.ChangePassword: {"rid": _RID, "password": C.PASSWORD, "sig": C.SIGNATURE},
    wire.EndSessions: {"rid": _RID, "sig": C.SIGNATURE},
    wire.CallTool: {"rid": _RID, "collab_id": _ID, "tool": C.TOOL, "args": C.BROKER,
                    "sig": C.SIGNATURE},
    wire.Ping: {"rid": _RID},
    wire.PutArtifactChunk: {"rid": _RID, "collab_id": _ID, "upload": C.UPLOAD,
                            "index": C.NUMBER, "data": C.ARTIFACT_PIECE, "final": C.FLAG,
                            "ref": C.REF, "sig": C.SIGNATURE},
    wire.GetArtifact: {"rid": _RID, "collab_id": _ID, "ref": C.REF},
    wire.Batch: {"frames": C.FRAMES},
    # relay → client
    wire.Welcome: {"protocol": C.PROTOCOL, "relay_pk": C.PUBLIC_KEY,
                   "max_frame_bytes": C.NUMBER, "max_body_bytes": C.NUMBER,
                   "challenge": C.CHALLENGE, "heartbeat_ms": C.NUMBER},
    wire.SignedUp: {"rid": _RID, "account_id": _ID},
    wire.LoggedIn: {"rid": _RID, "account_id": _ID, "token": C.TOKEN, "expires_at": C.NUMBER},
    wire.Authenticated: {"rid": _RID, "account_id": _ID},
    wire.CollabCreated: {"rid": _RID, "collab_id": _ID},
    wire.Appended: {"rid": _RID, "collab_id": _ID, "seq": C.NUMBER, "event_id": C.HASH,
                    "chain": C.HASH, "duplicate": C.FLAG,
                    "checkpoint": C.CHECKPOINT, "inclusion": C.HASHES},
    wire.Subscribed: {"rid": _RID, "collab_id": _ID, "from_seq": C.NUMBER},
    wire.Event: {"collab_id": _ID, "seq": C.NUMBER, "event": C.EVENT, "chain": C.HASH},
    wire.Withheld: {"collab_id": _ID, "seq": C.NUMBER, "event_id": C.HASH, "chain": C.HASH,
                    "author_id": _ID, "recipient_id": _ID, "epoch": C.NUMBER,
                    "sealed": C.HASH, "sig": C.SIGNATURE},
    wire.CaughtUp: {"collab_id": _ID, "seq": C.NUMBER, "checkpoint": C.CHECKPOINT,
                    "proof_from": C.NUMBER, "consistency": C.HASHES},
    wire.TreeHead: {"collab_id": _ID, "checkpoint": C.CHECKPOINT, "proof_from": C.NUMBER,
                    "consistency": C.HASHES, "witnessed": C.CHECKPOINT,
                    "witnessed_proof": C.HASHES},
    wire.SubscriptionEnded: {"collab_id": _ID, "reason": C.RELAY_TEXT, "resume_from": C.NUMBER},
    wire.AccountInfo: {"rid": _RID, "account_id": _ID, "handle": C.HANDLE,
                       "sign_pk": C.PUBLIC_KEY, "box_pk": C.PUBLIC_KEY, "kind": C.MEMBER_KIND},
    wire.KeystoreStored: {"rid": _RID, "version": C.NUMBER},
    wire.Keystore: {"rid": _RID, "version": C.NUMBER, "blob": C.KEYSTORE},
    wire.ArtifactChunkStored: {"rid": _RID, "index": C.NUMBER},
    wire.ArtifactStored: {"rid": _RID, "ref": C.REF, "size": C.NUMBER},
    wire.ArtifactData: {"rid": _RID, "index": C.NUMBER, "data": C.ARTIFACT_PIECE,
                        "final": C.FLAG},
    wire.Unsubscribed: {"rid": _RID, "collab_id": _ID},
    wire.AgentCreated: {"rid": _RID, "account_id": _ID, "token": C.TOKEN,
                        "expires_at": C.NUMBER},
    wire.AgentRevoked: {"rid": _RID, "account_id": _ID},
    wire.AccountKeysRotated: {"rid": _RID, "keystore_version": C.NUMBER},
    wire.Collabs: {"rid": _RID, "collab_ids": C.REFS},  # a list of collab ids
    wire.Agents: {"rid": _RID, "agents": C.STRUCTS},
    wire.AgentInfo: {"account_id": _ID, "handle": C.HANDLE, "created_at": C.NUMBER,
                     "revoked": C.FLAG},
    wire.PasswordChanged: {"rid": _RID, "token": C.TOKEN, "expires_at": C.NUMBER},
    wire.SessionsEnded: {"rid": _RID},
    wire.ToolResult: {"rid": _RID, "status": C.NUMBER, "body": C.BROKER},
    wire.Pong: {"rid": _RID},
    wire.Error: {"rid": _RID, "code": C.CODE, "message": C.RELAY_TEXT, "head_seq": C.NUMBER},
    # inside frames
    SignedEvent: {"body": C.BODY, "sig": C.SIGNATURE},
    EventBody: {"v": C.NUMBER, "collab_id": _ID, "actor_id": _ID, "kind": C.KIND,
                "ts": C.NUMBER, "refs": C.REFS, "nonce": C.NONCE,
                "ciphertext": C.CIPHERTEXT, "epoch": C.NUMBER},
    # management proofs: the body's `ciphertext` of a `mgmt` event (ADR-0010)
    membership.Proof: {"v": C.NUMBER, "collab_id": _ID, "signer_id": _ID,
                       "base_seq": C.NUMBER, "base_chain": C.HASH, "op": C.OPERATION},
    membership.Member: {"account_id": _ID, "role": C.ROLE, "kind": C.MEMBER_KIND,
                        "sign_pk": C.PUBLIC_KEY, "box_pk": C.PUBLIC_KEY, "caps": C.CAPS},
    membership.CreateCollab: {"owner": C.STRUCT, "wraps": C.WRAPS},
    membership.AddMember: {"member": C.STRUCT, "wraps": C.WRAPS},
    membership.ChangeRole: {"account_id": _ID, "role": C.ROLE},
    membership.RemoveMember: {"account_id": _ID, "new_epoch": C.NUMBER, "wraps": C.WRAPS},
    membership.RotateKey: {"new_epoch": C.NUMBER, "wraps": C.WRAPS},
    membership.RekeyMember: {"old_sign_pk": C.PUBLIC_KEY, "sign_pk": C.PUBLIC_KEY,
                             "box_pk": C.PUBLIC_KEY, "possession": C.SIGNATURE,
                             "new_epoch": C.NUMBER, "wraps": C.WRAPS},
    membership.SetCaps: {"account_id": _ID, "caps": C.CAPS},
    membership.SetWitnesses: {"quorum": C.NUMBER, "vkeys": C.WITNESS_KEYS},
    # sealed keystores: the `keystore` / `blob` bytes
    keystore.SealedKeystore: {"v": C.NUMBER, "kdf": C.STRUCT, "wrapped_key": C.SEALED,
                              "sealed": C.SEALED, "recovery_wrap": C.SEALED},
    keystore.KdfParams: {"alg": C.KDF_ALG, "opslimit": C.NUMBER, "memlimit": C.NUMBER,
                         "salt": C.SALT},
}  # fmt: skip
PROOF_TYPES = {
    membership.Proof, membership.Member, membership.CreateCollab, membership.AddMember,
    membership.ChangeRole, membership.RemoveMember, membership.RotateKey,
    membership.RekeyMember, membership.SetCaps, membership.SetWitnesses,
}  # fmt: skip
# Bytes fields that hold an encoded struct of their own (walked after decoding).
EMBEDDED: dict[Check, type[msgspec.Struct]] = {
    C.BODY: EventBody,
    C.CIPHERTEXT: membership.Proof,  # for kind `mgmt` only; otherwise real ciphertext
    C.KEYSTORE: keystore.SealedKeystore,
}

COLUMNS: dict[str, dict[str, Check]] = {
    "accounts": {"account_id": _ID, "handle": C.HANDLE, "password_hash": C.PASSWORD_HASH,
                 "sign_pk": C.PUBLIC_KEY, "box_pk": C.PUBLIC_KEY, "created_at": C.TIME,
                 "kind": C.MEMBER_KIND, "created_by": _ID, "token_generation": C.NUMBER,
                 "session_generation": C.NUMBER},
    "collabs": {"collab_id": _ID, "created_by": _ID, "created_at": C.TIME, "epoch": C.NUMBER},
    "collab_members": {"collab_id": _ID, "account_id": _ID, "role": C.ROLE,
                       "kind": C.MEMBER_KIND, "caps": C.CAPS},
    "events": {"collab_id": _ID, "seq": C.NUMBER, "event_id": C.HASH, "actor_id": _ID,
               "kind": C.KIND, "ts": C.NUMBER, "body": C.BODY, "sig": C.SIGNATURE,
               "chain": C.HASH, "received_at": C.TIME},
    # keyed BLAKE2b of the handle (relay/_throttle.py): 32 bytes, no handle in clear
    "login_failures": {"handle_key": C.HASH, "failures": C.NUMBER, "window_start": C.TIME,
                       "window_failures": C.NUMBER, "locked_until": C.TIME,
                       "last_failure_at": C.TIME},
    "keystores": {"account_id": _ID, "version": C.NUMBER, "blob": C.KEYSTORE,
                  "sig": C.SIGNATURE, "updated_at": C.TIME},
    "artifact_pieces": {"upload": C.UPLOAD, "idx": C.NUMBER, "data": C.ARTIFACT_PIECE},
    "uploads": {"upload": C.UPLOAD, "account_id": _ID, "collab_id": _ID, "bytes": C.NUMBER,
                "touched_at": C.TIME},
    "artifacts": {"collab_id": _ID, "ref": C.REF, "upload": C.UPLOAD, "uploader": _ID,
                  "size": C.NUMBER, "pieces": C.NUMBER, "created_at": C.TIME},
    "schema_migrations": {"version": C.NUMBER, "name": C.MIGRATION, "applied_at": C.TIME},
}  # fmt: skip

# Handshake headers a client or the relay may send; anything else must be classified first.
HANDSHAKE_HEADERS = {
    "host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
    "sec-websocket-accept", "sec-websocket-protocol", "content-length",
}  # fmt: skip
KINDS = {KIND_MANAGEMENT, KIND_DM, contentmod.KIND_MESSAGE, contentmod.KIND_FILE,
         contentmod.KIND_COLLAB_META}  # fmt: skip
TOKEN_CLAIMS = {"sub", "iat", "exp", "iss", "typ", "gen"}


def class_of(owner: type[msgspec.Struct] | str, check: Check) -> str:
    """The coarse class of a field: what the relay is allowed to see of it."""
    if check in OPAQUE:
        return "opaque"
    if check in CONTAINERS:
        return "container"
    if isinstance(owner, type) and owner in PROOF_TYPES:
        return "proof"
    return SPECIAL_PLAINTEXT.get(check, "routing metadata")


# --- the walker -------------------------------------------------------------------------------

_ID_RE = re.compile(r"^[a-z]_[a-z2-7]{26}$")
_REF_RE = re.compile(r"^b2:[0-9a-f]{64}$")
_UPLOAD_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_TOOL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_ORIGIN_RE = re.compile(r"^[A-Za-z0-9.:_-]+/collab/[a-z]_[a-z2-7]{26}$")


def reads_as_text(data: bytes) -> bool:
    """True when bytes look like words: valid UTF-8 with a run of four letters. Only used on
    values of 32 bytes or more, where random bytes pass with negligible probability."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return re.search(r"[A-Za-z]{4}", text) is not None


def _first_that_opens(fn: Callable[[Any, Any], Any], candidates: list[tuple[Any, Any]]) -> Any:
    """`fn` on the first candidate it succeeds with; the last error if none (KeyError if
    there are none)."""
    error: Exception = KeyError("no candidate keys")
    for a, b in candidates:
        try:
            return fn(a, b)
        except (CryptoError, ModelError) as exc:
            error = exc
    raise error


@dataclass
class Keyring:
    """What the members' clients hold: enough to prove that every opaque field is ciphertext."""

    sign_pk: dict[str, bytes] = field(default_factory=dict)  # account id → signing key
    box: dict[str, nacl.public.PrivateKey] = field(default_factory=dict)
    epoch_keys: dict[str, dict[int, bytes]] = field(default_factory=dict)  # collab → epoch → key
    passphrases: list[str] = field(default_factory=list)
    passwords: set[str] = field(default_factory=set)  # including the wrong guess
    handles: set[str] = field(default_factory=set)
    relay_pk: bytes = b""
    # Keys an account had before `rotate-keys` (ADR-0017): its events and wraps from before.
    past_sign_pk: dict[str, list[bytes]] = field(default_factory=dict)
    past_box: dict[str, list[nacl.public.PrivateKey]] = field(default_factory=dict)

    def sign_pks(self, account_id: str) -> list[bytes]:
        return [self.sign_pk[account_id], *self.past_sign_pk.get(account_id, [])]

    def boxes(self, account_id: str) -> list[nacl.public.PrivateKey]:
        return [self.box[account_id], *self.past_box.get(account_id, [])]

    def public_keys(self) -> set[bytes]:
        boxes = {bytes(k.public_key) for a in self.box for k in self.boxes(a)}
        signs = {k for a in self.sign_pk for k in self.sign_pks(a)}
        return signs | boxes | {self.relay_pk}


class Walker:
    """Walks decoded frames or rows field by field; collects problems instead of stopping, so
    one run reports every unclassified or non-opaque field at once."""

    def __init__(self, keys: Keyring) -> None:
        self.keys = keys
        self.problems: list[str] = []
        self.types_seen: Counter[type | str] = Counter()  # struct types and table names
        self.opened: list[bytes] = []  # plaintext of every ciphertext opened with members' keys
        self.artifacts_opened: list[bytes] = []
        self.file_keys: dict[str, bytes] = {}  # ref → file key, from decrypted attachments
        self.pieces: dict[tuple[object, ...], dict[int, bytes]] = {}
        self.piece_refs: dict[tuple[object, ...], tuple[str, str]] = {}  # → (collab, ref)
        self.conn_account: dict[object, str] = {}  # connection → the account it acts as
        self.dm_pushes: list[tuple[str, str, str]] = []  # (receiving account, sender, recipient)
        self._event: VerifiedEvent | None = None
        self._pushed = False  # walking an `event` push (a delivery to this connection)
        self._conn: object = None
        self._decode: Callable[[bytes], object] = wire.decode_reply
        self._handlers: dict[Check, Callable[[Any, Any, str], str | None]] = {
            check: getattr(self, f"_check_{check.value}") for check in Check
        }

    def problem(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    # Frames -----------------------------------------------------------------------------------

    def message(self, payload: bytes, direction: Direction, conn: int) -> None:
        self._conn = conn
        self._decode = wire.decode_request if direction is Direction.TO_RELAY else wire.decode_reply
        self._frame(payload, f"conn {conn} {direction.value}")

    def _frame(self, payload: bytes, where: str) -> None:
        try:
            frame = self._decode(payload)
        except wire.MalformedFrame as exc:
            self.problem(where, f"does not decode as a frame ({exc})")
            return
        assert isinstance(frame, msgspec.Struct)
        if isinstance(frame, wire.GetArtifact):
            self.piece_refs[(self._conn, frame.rid)] = (frame.collab_id, frame.ref)
        if isinstance(frame, (wire.Authenticated, wire.LoggedIn)):
            self.conn_account[self._conn] = frame.account_id
        self._pushed = isinstance(frame, wire.Event)
        try:
            self.struct(frame, f"{where} {type(frame).__name__}")
        finally:
            self._pushed = False

    def struct(self, obj: msgspec.Struct, where: str) -> None:
        rules = FIELDS.get(type(obj))
        if rules is None:
            self.problem(where, f"{type(obj).__name__} is not classified in FIELDS")
            return
        self.types_seen[type(obj)] += 1
        for name in obj.__struct_fields__:
            check = rules.get(name)
            if check is None:
                self.problem(f"{where}.{name}", "field is not classified in FIELDS")
                continue
            self.value(check, getattr(obj, name), obj, f"{where}.{name}")

    def row(self, table: str, row: dict[str, Any]) -> None:
        rules = COLUMNS.get(table)
        if rules is None:
            self.problem(table, "table is not classified in COLUMNS")
            return
        self.types_seen[table] += 1
        self._conn = "db"
        for name, value in row.items():
            check = rules.get(name)
            if check is None:
                self.problem(f"{table}.{name}", "column is not classified in COLUMNS")
                continue
            self.value(check, value, row, f"{table}.{name}")

    def value(self, check: Check, value: Any, parent: Any, where: str) -> None:
        if value is None:
            return  # an absent optional field carries nothing
        trouble = self._handlers[check](value, parent, where)
        if trouble:
            self.problem(where, trouble)

    # Plaintext --------------------------------------------------------------------------------

    def _check_id(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if isinstance(v, str) and _ID_RE.fullmatch(v) else f"not an id: {v!r:.60}"

    def _check_number(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if type(v) is int else f"not an integer: {type(v).__name__}"

    def _check_flag(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if type(v) is bool else "not a bool"

    def _check_time(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if isinstance(v, datetime.datetime) else "not a timestamp"

    def _check_kind(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v in KINDS else f"unknown event kind {v!r:.40}: classify it"

    def _check_role(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v in {r.value for r in Role} else f"not a role: {v!r:.40}"

    def _check_member_kind(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v in {k.value for k in MemberKind} else f"not a member kind: {v!r:.40}"

    def _check_caps(self, v: Any, _p: Any, _w: str) -> str | None:
        ok = isinstance(v, (list, tuple)) and all(isinstance(c, str) and valid_cap(c) for c in v)
        return None if ok else f"not capability names: {v!r:.60}"

    def _check_witness_keys(self, v: Any, _p: Any, _w: str) -> str | None:
        try:
            for key in v:
                NoteVerifier.from_vkey(key)
        except (ModelError, TypeError, ValueError):
            return f"not witness verifier keys: {v!r:.60}"
        return None

    def _check_handle(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v in self.keys.handles else f"not a known handle: {v!r:.60}"

    def _check_ref(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v == "" or (isinstance(v, str) and _REF_RE.fullmatch(v)) else "not a ref"

    def _check_refs(self, v: Any, _p: Any, _w: str) -> str | None:
        ok = all(isinstance(r, str) and (_REF_RE.fullmatch(r) or _ID_RE.fullmatch(r)) for r in v)
        return None if ok else f"refs are not artifact refs or account ids: {v!r:.80}"

    def _check_upload(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if isinstance(v, str) and _UPLOAD_RE.fullmatch(v) else "not an upload id"

    def _check_code(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v in {c.value for c in wire.ErrorCode} else "not an error code"

    def _check_protocol(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v == wire.PROTOCOL else "not the protocol name"

    def _check_kdf_alg(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v == "argon2id13" else "not the KDF name"

    def _check_tool(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if isinstance(v, str) and _TOOL_RE.fullmatch(v) else "not a tool name"

    def _check_migration(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v in {name for _, name, _ in MIGRATIONS} else "not a migration name"

    def _check_relay_text(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if isinstance(v, str) and len(v) <= 1000 else "not a short relay message"

    def _check_password(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v in self.keys.passwords else "not one of the login passwords used"

    def _check_token(self, v: Any, _p: Any, _w: str) -> str | None:
        parts = v.split(".") if isinstance(v, str) else []
        if len(parts) != 3 or not all(_B64URL.fullmatch(p) for p in parts):
            return "not a JWT"
        try:
            header, claims = (json.loads(base64.urlsafe_b64decode(p + "==")) for p in parts[:2])
        except (ValueError, binascii.Error):
            return "JWT header or claims do not decode"
        if set(header) - {"alg", "typ"} or set(claims) - TOKEN_CLAIMS:
            return f"unexpected JWT fields {sorted(set(header) | set(claims))}"
        return self._check_id(claims.get("sub"), None, "")

    def _check_broker(self, v: Any, _p: Any, _w: str) -> str | None:
        ok = isinstance(v, str) or (
            isinstance(v, dict) and all(isinstance(x, str) for x in (*v, *v.values()))
        )
        return None if ok else "not tool arguments or a tool result"

    # Cryptographic values ---------------------------------------------------------------------

    def _check_hash(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if isinstance(v, bytes) and len(v) == 32 else "not a 32-byte hash"

    def _check_checkpoint(self, v: Any, _p: Any, _w: str) -> str | None:
        # Empty where none is due (a duplicate answered outside a commit group); otherwise a
        # C2SP signed note whose text is a checkpoint of `<relay>/collab/<collab id>`: the
        # collab id, a size and a root hash, the relay's signatures, and nothing else.
        if v == b"":
            return None
        try:
            note = parse_note(v)
            checkpoint = parse_checkpoint(note.text)
        except (ModelError, UnicodeDecodeError, ValueError):
            return "not a signed checkpoint"
        if not _ORIGIN_RE.match(checkpoint.origin) or checkpoint.extensions:
            return "a checkpoint carrying more than an origin, a size and a root"
        return None if note.signatures else "an unsigned checkpoint"

    def _check_hashes(self, v: Any, _p: Any, _w: str) -> str | None:
        ok = isinstance(v, list) and all(isinstance(h, bytes) and len(h) == 32 for h in v)
        return None if ok else "not a list of 32-byte hashes"

    def _check_signature(self, v: Any, _p: Any, _w: str) -> str | None:
        # An empty signature only where nothing is signed (a sign-up without a keystore).
        return None if isinstance(v, bytes) and len(v) in (0, 64) else "not a signature"

    def _check_public_key(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if v in self.keys.public_keys() else "not a public key of this scenario"

    def _check_nonce(self, v: Any, parent: Any, _w: str) -> str | None:
        expected = 0 if getattr(parent, "kind", "") == KIND_MANAGEMENT else 24
        return None if isinstance(v, bytes) and len(v) == expected else "not a nonce"

    def _check_challenge(self, v: Any, _p: Any, _w: str) -> str | None:
        # Fresh random bytes per connection (signed requests sign them); never words.
        if not isinstance(v, bytes) or len(v) != 32 or reads_as_text(v):
            return "not a 32-byte random challenge"
        return None

    def _check_salt(self, v: Any, _p: Any, _w: str) -> str | None:
        return None if isinstance(v, bytes) and len(v) == 16 else "not a salt"

    # Opaque -----------------------------------------------------------------------------------

    def _check_sealed(self, v: Any, _p: Any, _w: str) -> str | None:
        # Opened by the keystore check that owns these fields (after walking them).
        if not isinstance(v, bytes) or (v and len(v) < 32) or reads_as_text(v):
            return "not sealed bytes"
        return None

    def _check_password_hash(self, v: Any, parent: Any, _w: str) -> str | None:
        if parent.get("kind") == "agent":  # agents log in with tokens only
            return None if v == "!agent: no password" else "an agent with a password hash"
        return None if isinstance(v, str) and v.startswith("$argon2id$") else "not Argon2id"

    def _check_ciphertext(self, v: Any, _p: Any, where: str) -> str | None:
        event = self._event
        assert event is not None, "ciphertext outside an event"
        body = event.body
        if body.kind == KIND_MANAGEMENT:  # the proof, in plaintext by design (ADR-0010)
            try:
                proof = membership.proof_of(body)
            except ModelError as exc:
                return f"a mgmt body that is not a proof ({exc})"
            self.struct(proof, f"{where}(Proof)")
            return None
        if len(v) >= 32 and reads_as_text(v):
            return "reads as text"
        try:
            if body.kind == KIND_DM:
                sender, recipient = body.actor_id, body.refs[0]
                if self._pushed:
                    receiver = self.conn_account.get(self._conn, "?")
                    self.dm_pushes.append((receiver, sender, recipient))
                plain = _first_that_opens(
                    lambda mine, theirs: dm.open_dm(event, mine, bytes(theirs.public_key)),
                    [
                        (mine, theirs)
                        for mine in self.keys.boxes(sender)
                        for theirs in self.keys.boxes(recipient)
                    ],
                )
            else:
                key = self.keys.epoch_keys[body.collab_id][body.epoch]
                plain = open_content(event, key)
            content, _ = contentmod.decode_content(plain)
        except (CryptoError, ModelError, KeyError, IndexError):
            return "does not open as ciphertext under any key the members hold"
        self.opened.append(plain)
        if isinstance(content, contentmod.Attachment):
            self.file_keys[content.ref] = content.key
        return None

    def _check_wraps(self, v: Any, _p: Any, where: str) -> str | None:
        assert self._event is not None
        epoch_keys = self.keys.epoch_keys.get(self._event.body.collab_id, {}).values()
        for account_id, wrap in v.items():
            if self._check_id(account_id, None, ""):
                return "a wrap for something that is not an account id"
            try:
                opened = _first_that_opens(
                    lambda box, who: open_wrap(v, who, box),
                    [(box, account_id) for box in self.keys.boxes(account_id)],
                )
            except (CryptoError, KeyError):
                return f"the wrap for {account_id} does not open with that account's box key"
            if opened not in epoch_keys or reads_as_text(wrap):
                return "a wrap that holds no epoch key of this collab"
        return None

    def _check_keystore(self, v: Any, _p: Any, where: str) -> str | None:
        if v == b"":
            return None  # no keystore (or a deletion)
        try:
            sealed = keystore.decode_sealed(v)
        except CryptoError:
            return "does not decode as a sealed keystore"
        self.struct(sealed, f"{where}(SealedKeystore)")
        for passphrase in self.keys.passphrases:
            try:
                content = keystore.open_content(sealed, keystore.unwrap_key(sealed, passphrase))
            except CryptoError:
                continue
            seed = bytes(nacl.signing.SigningKey(content.sign_seed).verify_key)
            return None if seed in self.keys.public_keys() else "opens to keys of nobody here"
        return "no member's passphrase opens it"

    def _check_artifact_piece(self, v: Any, parent: Any, _w: str) -> str | None:
        if isinstance(parent, wire.PutArtifactChunk):
            stream: tuple[object, ...] = (self._conn, parent.upload)
            index = parent.index
            if parent.final:
                self.piece_refs[stream] = (parent.collab_id, parent.ref)
        elif isinstance(parent, wire.ArtifactData):
            stream, index = (self._conn, parent.rid), parent.index
        else:  # an artifact_pieces row
            stream, index = ("db", parent["upload"]), parent["idx"]
        self.pieces.setdefault(stream, {})[index] = v
        return "reads as text" if len(v) >= 32 and reads_as_text(v) else None

    # Containers -------------------------------------------------------------------------------

    def _check_event(self, v: Any, _p: Any, where: str) -> str | None:
        self.struct(v, f"{where}(SignedEvent)")
        return None

    def _check_body(self, v: Any, parent: Any, where: str) -> str | None:
        sig = parent["sig"] if isinstance(parent, dict) else parent.sig
        try:
            body = decode_body(v)
            event = _first_that_opens(
                lambda pk, _: verify_event(SignedEvent(v, sig), pk),
                [(pk, None) for pk in self.keys.sign_pks(body.actor_id)],
            )
        except (ModelError, KeyError):
            return "not a canonical event body signed by a known author"
        self._event = event
        try:
            self.struct(body, f"{where}(EventBody)")
        finally:
            self._event = None
        return None

    def _check_struct(self, v: Any, _p: Any, where: str) -> str | None:
        self.struct(v, where)
        return None

    def _check_structs(self, v: Any, _p: Any, where: str) -> str | None:
        if not isinstance(v, list):
            return "not a list of structs"
        for i, item in enumerate(v):
            self.struct(item, f"{where}[{i}]")
        return None

    def _check_operation(self, v: Any, _p: Any, where: str) -> str | None:
        self.struct(v, f"{where}({type(v).__name__})")
        return None

    def _check_frames(self, v: Any, _p: Any, where: str) -> str | None:
        for i, raw in enumerate(v):
            inner = bytes(raw)
            try:
                if isinstance(self._decode(inner), wire.Batch):
                    return "a batch inside a batch"
            except wire.MalformedFrame:
                pass  # reported by _frame
            self._frame(inner, f"{where}[{i}]")
        return None

    # After everything was walked ----------------------------------------------------------------

    def open_artifacts(self) -> None:
        """Every artifact stream seen opens with the file key found in an attachment event."""
        for stream, pieces in self.pieces.items():
            collab_ref = self.piece_refs.get(stream)
            if collab_ref is None or sorted(pieces) != list(range(len(pieces))):
                self.problem(f"artifact {stream}", "pieces without a ref, or not contiguous")
                continue
            collab_id, ref = collab_ref
            key = self.file_keys.get(ref)
            if key is None:
                self.problem(f"artifact {ref}", "no attachment event carries its key")
                continue
            ordered = [pieces[i] for i in range(len(pieces))]
            try:
                plain = b"".join(
                    artifacts.open_stream(key, collab_id, artifacts.check_ref(ref, ordered))
                )
            except CryptoError:
                self.problem(f"artifact {ref}", "does not open with its file key")
                continue
            self.artifacts_opened.append(plain)


def reachable_structs() -> dict[type[msgspec.Struct], dict[str, mi.Type]]:
    """Every struct that can appear on the wire, with its fields' types: the frame unions,
    what their fields contain, and what their encoded bytes fields hold (`EMBEDDED`)."""
    found: dict[type[msgspec.Struct], dict[str, mi.Type]] = {}

    def visit(t: mi.Type) -> None:
        match t:
            case mi.StructType(cls=cls) if cls not in found:
                found[cls] = {f.name: f.type for f in t.fields}
                for f in t.fields:
                    visit(f.type)
                    check = FIELDS.get(cls, {}).get(f.name)
                    if check in EMBEDDED:
                        visit(mi.type_info(EMBEDDED[check]))
            case mi.UnionType():
                for member in t.types:
                    visit(member)
            case mi.ListType() | mi.VarTupleType() | mi.SetType() | mi.FrozenSetType():
                visit(t.item_type)
            case mi.DictType():
                visit(t.key_type)
                visit(t.value_type)
            case mi.TupleType():
                for item in t.item_types:
                    visit(item)
            case _:
                pass

    for union in (wire.Request, wire.Reply):
        visit(mi.type_info(union))
    return found


# --- captures -------------------------------------------------------------------------------


def walk_capture(tap: Tap, walker: Walker) -> tuple[int, list[str]]:
    """Walk every message the tap recorded; returns the message count and handshake problems."""
    problems: list[str] = []
    count = 0
    order = sorted(tap.recordings, key=lambda r: (r.connection, r.direction is Direction.TO_CLIENT))
    for rec in order:
        where = f"conn {rec.connection} {rec.direction.value}"
        parsed = parse_websocket(bytes(rec.data))
        problems += handshake_problems(parsed.handshake, rec.direction, where)
        if parsed.trailing:
            problems.append(
                f"{where}: the stream ends inside a frame ({len(parsed.trailing)} bytes)"
            )
        for message in parsed.messages:
            count += 1
            if message.rsv:
                problems.append(
                    f"{where}: a frame with RSV bits (an extension such as compression)"
                )
            match message.opcode:
                case Opcode.BINARY:
                    walker.message(message.payload, rec.direction, rec.connection)
                case Opcode.CLOSE:  # a status code and a short reason (searched like the rest)
                    if len(message.payload) > 125:
                        problems.append(f"{where}: a close frame longer than RFC 6455 allows")
                case Opcode.PING | Opcode.PONG:
                    pass  # control payloads; searched for canaries with everything else
                case _:
                    problems.append(f"{where}: an unexpected opcode {message.opcode}")
    return count, problems


def handshake_problems(handshake: bytes, direction: Direction, where: str) -> list[str]:
    lines = handshake.decode("latin-1").split("\r\n")
    first, headers = lines[0], [line for line in lines[1:] if line]
    problems = []
    if direction is Direction.TO_RELAY and first != "GET / HTTP/1.1":
        problems.append(f"{where}: unexpected request line {first!r}")
    if direction is Direction.TO_CLIENT and not first.startswith("HTTP/1.1 101"):
        problems.append(f"{where}: unexpected status line {first!r}")
    for header in headers:
        name = header.split(":", 1)[0].strip().lower()
        if name not in HANDSHAKE_HEADERS:
            problems.append(f"{where}: an unclassified handshake header {name!r}")
    return problems


def dump_ledger(
    database_url: str,
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], bytes]:
    """Every row of every table (and view) in the public schema, as values and as raw bytes
    (COPY in text and binary form, plus each value), the way a database thief sees them."""
    rows: dict[str, list[dict[str, Any]]] = {}
    raw = bytearray()
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        tables = [
            r["table_name"]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        ]
        columns = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public'"
        ).fetchall()
        for table in tables:
            ident = sql.Identifier(table)
            rows[table] = conn.execute(sql.SQL("SELECT * FROM {}").format(ident)).fetchall()
            for fmt in ("TEXT", "BINARY"):
                query = sql.SQL("COPY {} TO STDOUT (FORMAT {})").format(ident, sql.SQL(fmt))
                with conn.cursor().copy(query) as copy:
                    for block in copy:
                        raw += bytes(block)
            for row in rows[table]:
                for value in row.values():
                    raw += value if isinstance(value, bytes) else repr(value).encode()
    return rows, columns, bytes(raw)


def column_problems(columns: list[dict[str, Any]]) -> list[str]:
    actual: dict[str, set[str]] = {}
    for col in columns:
        actual.setdefault(col["table_name"], set()).add(col["column_name"])
    problems = []
    for table in sorted(set(actual) | set(COLUMNS)):
        have, classified = actual.get(table, set()), set(COLUMNS.get(table, {}))
        problems += [
            f"{table}.{c}: column not classified in COLUMNS" for c in sorted(have - classified)
        ]
        problems += [
            f"{table}.{c}: classified but not in the schema" for c in sorted(classified - have)
        ]
    return problems
