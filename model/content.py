"""Plaintext content types: what is inside the AEAD. The relay never sees these."""

from __future__ import annotations

from typing import Final, cast

import msgspec

from model.errors import DECODE_ERRORS, InvalidEvent

KIND_MESSAGE: Final = "msg"
KIND_COLLAB_META: Final = "collab.meta"
KIND_FILE: Final = "file"
MAX_TEXT_CHARS: Final = 16_000


class Message(msgspec.Struct, frozen=True, tag="msg"):
    text: str

    def __repr__(self) -> str:
        return f"Message(<{len(self.text)} chars>)"


class CollabMeta(msgspec.Struct, frozen=True, tag="collab.meta"):
    name: str

    def __repr__(self) -> str:
        return "CollabMeta(<name>)"


class Attachment(msgspec.Struct, frozen=True, tag="file"):
    """An artifact posted to the collab; the event's `refs` carry the same `ref`.

    `key` is the artifact's own file key: it travels only inside this (encrypted) content, so
    exactly those who can read the event can open the file — whatever the epoch.
    """

    name: str
    size: int
    ref: str
    key: bytes

    def __repr__(self) -> str:
        return f"Attachment(<name>, size={self.size})"


Content = Message | CollabMeta | Attachment


class Evidence(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What the author attests about the history when sealing (SO-4), inside the ciphertext.

    `device` names one sending stream of the author (one `COZY_HOME`); `counter` and `prev` chain
    that stream's events in this collab (1 and b"" for its first); `seen_seq`/`seen_chain` is
    the head the author had verified when writing; `clock` is the author's clock (ms). Readers
    check all of it against their own history (model/view.py).
    """

    device: str
    counter: int
    prev: bytes
    seen_seq: int
    seen_chain: bytes
    clock: int


class WithEvidence(msgspec.Struct, frozen=True, tag="ev"):
    content: Content
    evidence: Evidence


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message | CollabMeta | Attachment | WithEvidence)


def encode_content(content: Content, evidence: Evidence | None = None) -> bytes:
    if isinstance(content, Message) and len(content.text) > MAX_TEXT_CHARS:
        raise InvalidEvent(f"message is {len(content.text)} characters; the limit is 16000")
    return _encoder.encode(content if evidence is None else WithEvidence(content, evidence))


def decode_content(data: bytes) -> tuple[Content, Evidence | None]:
    """The content and, when the author attached it, its evidence."""
    try:
        decoded = _decoder.decode(data)
    except DECODE_ERRORS as exc:
        raise InvalidEvent(f"decrypted content does not decode: {exc}") from None
    if isinstance(decoded, WithEvidence):
        return decoded.content, decoded.evidence
    return cast("Content", decoded), None


def kind_of(content: Content) -> str:
    match content:
        case Message():
            return KIND_MESSAGE
        case Attachment():
            return KIND_FILE
        case CollabMeta():
            return KIND_COLLAB_META
