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

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Content)


def encode_content(content: Content) -> bytes:
    if isinstance(content, Message) and len(content.text) > MAX_TEXT_CHARS:
        raise InvalidEvent(f"message is {len(content.text)} characters; the limit is 16000")
    return _encoder.encode(content)


def decode_content(data: bytes) -> Content:
    try:
        return cast("Content", _decoder.decode(data))
    except DECODE_ERRORS as exc:
        raise InvalidEvent(f"decrypted content does not decode: {exc}") from None


def kind_of(content: Content) -> str:
    match content:
        case Message():
            return KIND_MESSAGE
        case Attachment():
            return KIND_FILE
        case CollabMeta():
            return KIND_COLLAB_META
