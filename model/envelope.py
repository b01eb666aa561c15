"""The event envelope: what an author signs, what the relay can see, what stays sealed.

An event is a `SignedEvent`: the exact bytes of an `EventBody` plus an Ed25519 signature over
``DOMAIN_EVENT ‖ body``. The body carries the only plaintext routing fields the relay learns
(``collab_id, actor_id, kind, ts, refs``; the relay adds ``seq`` when it orders the event) and
the content, sealed with XChaCha20-Poly1305 under the collab key. The routing fields are the
AEAD's associated data, so ciphertext cannot be moved to another collab, author, kind, time or
set of refs without failing to decrypt.

Signed bytes are kept exactly as received: verifiers check the signature over the bytes on the
wire, then decode them strictly and require that re-encoding gives the same bytes (one canonical
encoding per body), so the event id — a hash of body and signature — is a stable identity.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

import msgspec

from model import _crypto, padding
from model.errors import DECODE_ERRORS, BadSignature, InvalidEvent
from model.ids import is_id

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import nacl.signing

EVENT_VERSION: Final = 1
# A direct message's body version: its signature covers its `DmHeader` (below), not the body
# bytes, so members who may not see the sealed body can still check it (a `withheld` link).
# A stored DM of version 1 keeps the old rule and is sent whole to every member (`audience_of`).
DM_VERSION: Final = 2
MAX_BODY_BYTES: Final = 64 * 1024
MAX_REFS: Final = 16
MAX_REF_CHARS: Final = 128
KIND_RE: Final = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
KIND_MANAGEMENT: Final = "mgmt"  # membership changes, in plaintext (model/membership.py)
KIND_DM: Final = "dm"  # direct messages, sealed per pair (model/dm.py)

# Domain separation: every signature and hash in the protocol starts with its own label so a
# value made for one purpose can never be accepted for another.
DOMAIN_EVENT: Final = b"cozylabs/v1/event-signature\x00"
DOMAIN_EVENT_ID: Final = b"cozylabs/v1/event-id\x00"
DOMAIN_CONTENT_AD: Final = b"cozylabs/v1/content-ad\x00"
DOMAIN_DM_HEADER: Final = b"cozylabs/v1/dm-header-signature\x00"
DOMAIN_DM_SEALED: Final = b"cozylabs/v1/dm-sealed\x00"


class EventBody(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The signed part of an event. The fields other than ``nonce`` and ``ciphertext`` are
    plaintext metadata; ``epoch`` is the collab key epoch the content is sealed under (always
    encoded: the canonical body is the full nine-element array).

    A management event (kind ``mgmt``, ADR-0010) carries its proof in plaintext in
    ``ciphertext`` with an empty ``nonce``: the relay must read it to authorize and route.
    """

    v: int
    collab_id: str
    actor_id: str
    kind: str
    ts: int
    refs: tuple[str, ...]
    nonce: bytes
    ciphertext: bytes
    epoch: int = 0

    def __repr__(self) -> str:  # ciphertext bodies never reach logs
        return (
            f"EventBody(v={self.v}, collab_id={self.collab_id!r}, actor_id={self.actor_id!r}, "
            f"kind={self.kind!r}, ts={self.ts}, refs={self.refs!r}, epoch={self.epoch}, "
            f"ciphertext=<{len(self.ciphertext)} bytes>)"
        )


class SignedEvent(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What an author submits: the exact body bytes and the author's signature over them."""

    body: bytes
    sig: bytes

    def __repr__(self) -> str:
        return f"SignedEvent(<{len(self.body)} body bytes>, sig={self.sig[:4].hex()}…)"


class DmHeader(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a version-2 direct message's author signs, and all a third member learns of it.

    `sealed` commits to the rest of the body (time, nonce, sealed box), so the signature covers
    the whole DM while the header shows only who wrote to whom, under which epoch. The event id
    of such a DM is a hash of this header and the signature, so a `withheld` link carrying them
    proves its own place in the chain (docs/ordering.md).
    """

    v: int
    collab_id: str
    actor_id: str
    recipient_id: str
    epoch: int
    sealed: bytes


class _Peek(msgspec.Struct, frozen=True, array_like=True):
    """The first fields of a body: enough to tell which signing rule it follows."""

    v: int
    collab_id: str
    actor_id: str
    kind: str


_body_encoder = msgspec.msgpack.Encoder()
_body_decoder = msgspec.msgpack.Decoder(EventBody)
_peek_decoder = msgspec.msgpack.Decoder(_Peek)
_ad_encoder = msgspec.msgpack.Encoder()


def is_header_signed(body: EventBody) -> bool:
    """Whether the body's signature covers its `DmHeader` instead of its bytes."""
    return body.kind == KIND_DM and body.v == DM_VERSION and len(body.refs) == 1


def dm_header(body: EventBody) -> DmHeader:
    """The header a version-2 DM's author signs (call only when `is_header_signed`)."""
    sealed = _crypto.domain_hash(
        DOMAIN_DM_SEALED, body.ts.to_bytes(8, "big"), body.nonce, body.ciphertext
    )
    return DmHeader(body.v, body.collab_id, body.actor_id, body.refs[0], body.epoch, sealed)


def dm_header_bytes(header: DmHeader) -> bytes:
    return _body_encoder.encode(header)


def dm_link_id(header: DmHeader, sig: bytes) -> bytes:
    """The event id of the DM `header` describes (the same id its full body gives)."""
    return _crypto.domain_hash(DOMAIN_EVENT_ID, dm_header_bytes(header), sig)


def verify_dm_link(header: DmHeader, sig: bytes, author_public_key: bytes) -> bytes:
    """Check a withheld DM's header signature; return the event id it proves.

    Raises `BadSignature` when the author's key did not sign this header, `InvalidEvent` when
    the header is not one a version-2 DM has."""
    if header.v != DM_VERSION or not is_id(header.collab_id, "c"):
        raise InvalidEvent("the withheld link is not the header of a direct message")
    if not (is_id(header.actor_id, "a") and is_id(header.recipient_id, "a")):
        raise InvalidEvent("the withheld link names no account as author or recipient")
    signed = DOMAIN_DM_HEADER + dm_header_bytes(header)
    if not _crypto.verify(author_public_key, signed, sig):
        raise BadSignature("the withheld link's signature does not verify for its author")
    return dm_link_id(header, sig)


def _signed_part(body_bytes: bytes, body: EventBody | None) -> tuple[bytes, bytes]:
    """(domain, bytes) the author's signature covers and the event id hashes with it."""
    if body is None:
        try:
            peek = _peek_decoder.decode(body_bytes)
        except DECODE_ERRORS:
            return DOMAIN_EVENT, body_bytes
        if peek.kind != KIND_DM or peek.v != DM_VERSION:
            return DOMAIN_EVENT, body_bytes
        try:
            body = decode_body(body_bytes)
        except InvalidEvent:
            return DOMAIN_EVENT, body_bytes
    if is_header_signed(body):
        return DOMAIN_DM_HEADER, dm_header_bytes(dm_header(body))
    return DOMAIN_EVENT, body_bytes


def content_associated_data(body: EventBody) -> bytes:
    """The AEAD associated data: the routing fields, bound under their own domain label."""
    return DOMAIN_CONTENT_AD + _ad_encoder.encode(
        [EVENT_VERSION, body.collab_id, body.actor_id, body.kind, body.ts, list(body.refs),
         body.epoch]
    )  # fmt: skip


def event_id(signed: SignedEvent, body: EventBody | None = None) -> bytes:
    """The event's identity: a hash of what its author signed and the signature (for a
    version-2 DM, its header; else the body). Retries of one event share it. Pass the decoded
    `body` when it is at hand, to save decoding it again."""
    return _crypto.domain_hash(DOMAIN_EVENT_ID, _signed_part(signed.body, body)[1], signed.sig)


def seal_event(
    *,
    signing_key: nacl.signing.SigningKey,
    collab_key: bytes,
    collab_id: str,
    actor_id: str,
    kind: str,
    ts: int,
    content: bytes,
    refs: tuple[str, ...] = (),
    epoch: int = 0,
) -> SignedEvent:
    """Pad `content` to its size bucket (model/padding.py), encrypt it under the collab key of
    `epoch` and sign the result as `actor_id`.

    Raises `InvalidEvent` if the routing fields or the resulting size break the protocol's
    limits, so an author learns about it before the relay refuses the event.
    """
    header = EventBody(EVENT_VERSION, collab_id, actor_id, kind, ts, refs, b"", b"", epoch)
    _check_routing(header)
    nonce = _crypto.random_bytes(_crypto.AEAD_NONCE_BYTES)
    padded = pad_for_body(header, content, nonce_bytes=len(nonce), tag_bytes=_crypto.AEAD_TAG_BYTES)
    sealed = _crypto.aead_encrypt(collab_key, nonce, padded, content_associated_data(header))
    return sign_body(signing_key, msgspec.structs.replace(header, nonce=nonce, ciphertext=sealed))


def pad_for_body(header: EventBody, content: bytes, *, nonce_bytes: int, tag_bytes: int) -> bytes:
    """`content` padded to its bucket, the last bucket cut to what fits in a body with this
    header. Raises `InvalidEvent` when the content cannot fit at all."""
    # The body's size with a ciphertext of 256..65535 bytes (every padded size: a msgpack bin16
    # length prefix) is this fixed part plus the ciphertext itself.
    bare = len(_body_encoder.encode(msgspec.structs.replace(header, nonce=bytes(nonce_bytes))))
    fixed = bare - 2 + 3  # an empty bin is 2 bytes; a bin16 prefix is 3
    try:
        return padding.pad(content, limit=MAX_BODY_BYTES - fixed - tag_bytes)
    except ValueError:
        raise InvalidEvent(
            f"the content is {len(content)} bytes; an event body holds at most {MAX_BODY_BYTES}."
            " Attach large content as an artifact instead."
        ) from None


def sign_body(signing_key: nacl.signing.SigningKey, body: EventBody) -> SignedEvent:
    """Encode and sign a finished body. Raises `InvalidEvent` if it breaks the limits."""
    _check_routing(body)
    body_bytes = _body_encoder.encode(body)
    if len(body_bytes) > MAX_BODY_BYTES:
        raise InvalidEvent(
            f"event body is {len(body_bytes)} bytes; the limit is {MAX_BODY_BYTES}. "
            "Attach large content as an artifact instead."
        )
    domain, part = _signed_part(body_bytes, body)
    return SignedEvent(body=body_bytes, sig=_crypto.sign(signing_key, domain + part))


def decode_body(body: bytes) -> EventBody:
    """Strictly decode body bytes. Raises `InvalidEvent` on anything but a canonical body."""
    if len(body) > MAX_BODY_BYTES:
        raise InvalidEvent(f"event body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        decoded = _body_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise InvalidEvent(f"event body does not decode: {exc}") from None
    if decoded.v != EVENT_VERSION and not (decoded.v == DM_VERSION and decoded.kind == KIND_DM):
        raise InvalidEvent(
            f"event version {decoded.v} is not supported (this side speaks 1, and 2 for a dm)"
        )
    _check_routing(decoded)
    if len(decoded.nonce) != (0 if decoded.kind == KIND_MANAGEMENT else _crypto.AEAD_NONCE_BYTES):
        raise InvalidEvent("event nonce has the wrong length for its kind")
    if _body_encoder.encode(decoded) != body:
        raise InvalidEvent("event body is not in canonical encoding")
    return decoded


class VerifiedEvent:
    """An event whose author signature held and whose body decoded canonically.

    Only `verify_event` makes these, so code that takes a `VerifiedEvent` never handles
    unverified input by mistake.
    """

    __slots__ = ("body", "event_id", "signed")

    def __init__(self, signed: SignedEvent, body: EventBody, eid: bytes, *, _token: object) -> None:
        if _token is not _VERIFIER:
            raise TypeError("VerifiedEvent is only made by model.envelope.verify_event")
        self.signed = signed
        self.body = body
        self.event_id = eid

    def __repr__(self) -> str:
        return f"VerifiedEvent(id={self.event_id.hex()[:16]}…, {self.body!r})"


_VERIFIER = object()


class Prechecked:
    """Event signatures that held, checked ahead of the fold (a `PrecheckPlan`'s checks, which
    a reader runs in worker processes, so a catch-up verifies on every core). The fold still
    decides which key each event must be signed with; `verify_event` skips its own check only
    for that exact key, signature and body. Only `PrecheckPlan.result` makes one."""

    __slots__ = ("_held",)

    def __init__(self, held: set[tuple[bytes, bytes, bytes]], *, _token: object) -> None:
        if _token is not _VERIFIER:
            raise TypeError("Prechecked is only made by model.envelope.PrecheckPlan.result")
        self._held = held

    def holds(self, signed: SignedEvent, public_key: bytes) -> bool:
        return (public_key, signed.sig, signed.body) in self._held


class PrecheckPlan:
    """The signature checks a reader can run ahead of its fold, and what their verdicts let the
    fold skip. Made by `plan_precheck`; `checks` are (public key, signed message, signature),
    what `sigworker.check_signatures` takes, in any process. A verdict is trusted as the
    reader's own threads would be: the fold takes it only for the key it pins itself."""

    __slots__ = ("_refs", "checks")

    def __init__(
        self, checks: list[tuple[bytes, bytes, bytes]], refs: list[tuple[bytes, bytes, bytes]]
    ) -> None:
        self.checks = checks
        self._refs = refs

    def result(self, verdicts: Sequence[bool]) -> Prechecked:
        """The signatures that held, one verdict per check. Raises `ValueError` when the
        verdicts do not match the checks one for one."""
        if len(verdicts) != len(self._refs):
            raise ValueError(f"{len(verdicts)} verdicts for {len(self._refs)} checks")
        return Prechecked(
            {ref for ref, held in zip(self._refs, verdicts, strict=True) if held is True},
            _token=_VERIFIER,
        )


def plan_precheck(events: Sequence[SignedEvent], keys: Mapping[str, bytes]) -> PrecheckPlan:
    """A check of each content event's signature with the key `keys` gives its claimed author
    (a guess: the members' keys as the reader's fold has them; management events are left to
    the fold). Cheap: one peek at each body's header, no signature work."""
    checks: list[tuple[bytes, bytes, bytes]] = []
    refs: list[tuple[bytes, bytes, bytes]] = []
    for signed in events:
        if len(signed.body) > MAX_BODY_BYTES:
            continue
        try:
            peek = _peek_decoder.decode(signed.body)
        except DECODE_ERRORS:
            continue
        public_key = keys.get(peek.actor_id)
        if public_key is None or peek.kind == KIND_MANAGEMENT:
            continue
        checks.append(signature_check(signed, public_key))
        refs.append((public_key, signed.sig, signed.body))
    return PrecheckPlan(checks, refs)


def signature_check(
    signed: SignedEvent, author_public_key: bytes, *, decoded: EventBody | None = None
) -> tuple[bytes, bytes, bytes]:
    """(public key, message, signature): exactly the check `verify_event` makes for `signed`,
    for a checker that runs it elsewhere (the relay's worker processes) and hands its verdict
    back as `verify_event`'s `held`."""
    domain, part = _signed_part(signed.body, decoded)
    return author_public_key, domain + part, signed.sig


def verify_event(
    signed: SignedEvent,
    author_public_key: bytes,
    *,
    decoded: EventBody | None = None,
    prechecked: Prechecked | None = None,
    held: bool | None = None,
) -> VerifiedEvent:
    """Check the signature over the exact body bytes, then decode them.

    Raises `BadSignature` when the signature does not hold for `author_public_key`, and
    `InvalidEvent` when the signed body is malformed. The signature is checked first so that
    no parsing work is spent on forged input (a version-2 DM is decoded first: its signature
    covers a header made from the decoded body). A caller that already ran
    ``decode_body(signed.body)`` (the relay does, to route the event) passes the result as
    `decoded` so the hot path decodes each body once. A caller that ran this event's
    `signature_check` elsewhere (the relay's worker processes) passes its verdict as `held`,
    and the signature is not checked again, either way.
    """
    if len(signed.body) > MAX_BODY_BYTES:
        raise InvalidEvent(f"event body is {len(signed.body)} bytes; the limit is {MAX_BODY_BYTES}")
    domain, part = _signed_part(signed.body, decoded)
    if held is None:
        held = (
            prechecked is not None and prechecked.holds(signed, author_public_key)
        ) or _crypto.verify(author_public_key, domain + part, signed.sig)
    if not held:
        raise BadSignature("event signature does not verify for the claimed author")
    body = decode_body(signed.body) if decoded is None else decoded
    eid = _crypto.domain_hash(DOMAIN_EVENT_ID, part, signed.sig)
    return VerifiedEvent(signed, body, eid, _token=_VERIFIER)


def open_content(event: VerifiedEvent, collab_key: bytes) -> bytes:
    """Decrypt a verified event's content and strip its padding. Raises `CryptoError`
    (opaque) on any failure, a malformed padding included."""
    plain = _crypto.aead_decrypt(
        collab_key, event.body.nonce, event.body.ciphertext, content_associated_data(event.body)
    )
    try:
        return padding.unpad(plain)
    except padding.BadPadding:
        raise _crypto.CryptoError("decryption failed") from None


def _check_routing(body: EventBody) -> None:
    collab_id, actor_id, kind, ts, refs = (
        body.collab_id, body.actor_id, body.kind, body.ts, body.refs
    )  # fmt: skip
    if not is_id(collab_id, "c"):
        raise InvalidEvent("collab_id must look like c_<26 base32 chars>")
    if not is_id(actor_id, "a"):
        raise InvalidEvent("actor_id must look like a_<26 base32 chars>")
    if not KIND_RE.fullmatch(kind):
        raise InvalidEvent("kind must match [a-z][a-z0-9._-]{0,31}")
    if not 0 <= ts < 2**63:
        raise InvalidEvent("ts must be milliseconds since the epoch (a non-negative int64)")
    if len(refs) > MAX_REFS or any(not 0 < len(r) <= MAX_REF_CHARS for r in refs):
        raise InvalidEvent(f"at most {MAX_REFS} refs of 1..{MAX_REF_CHARS} characters each")
    if not 0 <= body.epoch < 2**31:
        raise InvalidEvent("epoch must be a non-negative int32")


class SequencedEvent(msgspec.Struct, frozen=True):
    """An event as the relay ordered it: its position and the chain head after it.

    `audience` names who may receive the body (a DM's two participants); empty means every
    member. Everyone else gets only the event id, enough to follow the chain.
    """

    collab_id: str
    seq: int
    event: SignedEvent
    chain: bytes
    audience: tuple[str, ...] = ()


def audience_of(body: EventBody) -> tuple[str, ...]:
    """Who the relay delivers an event's body to: a DM's participants, or everyone (()).

    Only a version-2 DM can be withheld from the others: its `withheld` link proves itself. A
    version-1 DM (stored before) goes whole to everyone, who verify it and cannot open it."""
    if is_header_signed(body):
        return (body.actor_id, body.refs[0])
    return ()
