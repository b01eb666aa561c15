"""C2SP signed notes (`signed-note`): the pure half, byte for byte.

What lives here: parsing and encoding a note (text, blank line, signature lines), key IDs,
verifier-key strings (`<name>+<hex key ID>+<base64(type || public key)>`), Ed25519 note signers
(type 0x01) and verification of a note against a set of trusted keys, including the timestamped
cosignatures of type 0x04 (`tlog-cosignature`, whose signed message wraps the note text; see
`model/tlog.py` for the checkpoint side). What does not: checkpoints, witnesses, any I/O.

A note on the wire::

    <text, one or more lines each ending in U+000A>
    <blank line>
    — <key name> <base64(4-byte big-endian key ID || signature)>
    …

The rules enforced when parsing (each failure is `MalformedNote`): valid UTF-8, no ASCII control
character but newline, the text is everything up to and including the newline before the LAST
blank line, at least one signature line after it, each line "— " + a key name (non-empty, no
Unicode space, no "+") + one space + canonical standard base64 of at least 5 bytes, ending in
newline, at most `MAX_SIGNATURES` lines. Verification follows the spec: lines from keys we do not
know are kept aside, not checked; a line from a known key that fails makes the whole note fail
(`NoteSignatureInvalid`); a note with no verified line from a known key fails (`NoteUnverified`).

Independent checks: tests/test_model_note.py runs the Go `golang.org/x/mod/sumdb/note` test
vectors verbatim, and the `metamorphic-log` verifier (Rust) over notes we sign.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import _crypto
from .errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

ALG_ED25519: Final = 0x01
"""Signature type of plain Ed25519 note signatures (signed-note)."""
ALG_COSIGNATURE_V1: Final = 0x04
"""Signature type of timestamped Ed25519 witness cosignatures (tlog-cosignature, cosignature/v1)."""
MAX_SIGNATURES: Final = 100
"""Signature lines accepted in one note (the spec asks for at least 16; Go's reader takes 100)."""
EM_DASH_PREFIX: Final = "\u2014 "
COSIGNATURE_HEADER: Final = "cosignature/v1\n"
_TIMESTAMP = struct.Struct(">Q")
_MAX_TIMESTAMP: Final = 2**63 - 1


class NoteError(ModelError):
    """A signed note, key or cosignature was refused. The subclass says why."""


class MalformedNote(NoteError):
    """The bytes are not a well-formed signed note. The sender is broken or hostile."""


class MalformedVerifierKey(NoteError):
    """The verifier key string is not `<name>+<8 hex digits>+<base64 key>` with a matching ID.

    Copy the key again from its owner; do not edit it by hand.
    """


class NoteSignatureInvalid(NoteError):
    """A signature line from a trusted key does not verify: the note was altered or forged."""


class NoteUnverified(NoteError):
    """No trusted key signed this note. Check which keys you trust for it."""


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: str) -> bytes:
    """Standard base64 with padding, canonical only (re-encoding gives the same text).

    Raises `ValueError`. Canonical-only means one byte string has exactly one spelling, so two
    notes that differ only in base64 slack cannot both pass for the same signature.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not standard base64") from exc
    if b64encode(raw) != text:
        raise ValueError("not canonical base64")
    return raw


def is_valid_key_name(name: str) -> bool:
    """Non-empty, no Unicode space and no "+" (signed-note); no control characters either."""
    if not name or any(c.isspace() or c == "+" or c < " " for c in name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not text a note can carry
        return False
    return True


def key_id(name: str, alg: int, public_key: bytes) -> int:
    """SHA-256(name || 0x0A || alg || public key)[:4] as a big-endian uint32."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def check_note_text(text: str) -> None:
    """Raise `MalformedNote` unless `text` can be the text of a note."""
    if not text.endswith("\n"):
        raise MalformedNote("a note text ends with a newline")
    if any(c < " " and c != "\n" for c in text):
        raise MalformedNote("a note text holds no control characters but newline")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise MalformedNote("a note text is valid UTF-8") from exc


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line: who (name, key ID) and the signature bytes after the key ID."""

    name: str
    key_id: int
    signature: bytes

    def line(self) -> str:
        """The exact line, newline included."""
        raw = self.key_id.to_bytes(4, "big") + self.signature
        return f"{EM_DASH_PREFIX}{self.name} {b64encode(raw)}\n"


@dataclass(frozen=True, slots=True)
class Note:
    """A parsed, NOT yet verified note. Only `open_note` says whether any of it can be trusted."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def encode(self) -> bytes:
        return (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode()


def parse_signature_line(line: str) -> NoteSignature:
    """One signature line WITHOUT its newline. Raises `MalformedNote`."""
    if not line.startswith(EM_DASH_PREFIX):
        raise MalformedNote("a signature line starts with an em dash and a space")
    name, sep, b64 = line[len(EM_DASH_PREFIX) :].partition(" ")
    if not sep or not is_valid_key_name(name):
        raise MalformedNote("a signature line names a valid key")
    try:
        raw = b64decode_strict(b64)
    except ValueError as exc:
        raise MalformedNote("a signature is canonical standard base64") from exc
    if len(raw) < 5:
        raise MalformedNote("a signature holds a key ID and at least one byte")
    return NoteSignature(name, int.from_bytes(raw[:4], "big"), raw[4:])


def parse_signature_lines(text: str) -> tuple[NoteSignature, ...]:
    """A block of newline-terminated signature lines (a note's tail, a witness's 200 body)."""
    if not text.endswith("\n"):
        raise MalformedNote("signature lines end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote(f"more than {MAX_SIGNATURES} signature lines")
    return tuple(parse_signature_line(line) for line in lines)


def parse_note(data: bytes) -> Note:
    """Split a signed note into text and signature lines without verifying anything.

    Raises `MalformedNote` for any deviation from the format (see the module docstring).
    """
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedNote("a note is valid UTF-8") from exc
    if any(c < " " and c != "\n" for c in decoded):
        raise MalformedNote("a note holds no control characters but newline")
    split = decoded.rfind("\n\n")
    if split < 0:
        raise MalformedNote("a note has a blank line before its signatures")
    text, sigs = decoded[: split + 1], decoded[split + 2 :]
    if not sigs:
        raise MalformedNote("a note has at least one signature line")
    return Note(text, parse_signature_lines(sigs))


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """A trusted public key for notes: name, signature type (0x01 or 0x04) and Ed25519 key."""

    name: str
    alg: int
    public_key: bytes

    def __post_init__(self) -> None:
        if not is_valid_key_name(self.name):
            raise MalformedVerifierKey(f"key name {self.name!r} is empty or holds a space or '+'")
        if self.alg not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise MalformedVerifierKey(f"signature type 0x{self.alg:02x} is not supported")
        if len(self.public_key) != _crypto.SIGN_PK_BYTES:
            raise MalformedVerifierKey("an Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.alg, self.public_key)

    def vkey(self) -> str:
        """The verifier key string: `<name>+<8 hex digits>+<base64(type || public key)>`."""
        return f"{self.name}+{self.key_id:08x}+{b64encode(bytes([self.alg]) + self.public_key)}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse a verifier key string. Raises `MalformedVerifierKey`."""
        # The base64 key may itself hold "+": split at the first two only (as Go's reader does).
        name, sep1, rest = vkey.partition("+")
        hex_id, sep2, b64 = rest.partition("+")
        if not (sep1 and sep2):
            raise MalformedVerifierKey("a verifier key is <name>+<key ID>+<key>")
        if len(hex_id) != 8 or any(c not in "0123456789abcdef" for c in hex_id):
            raise MalformedVerifierKey("a verifier key ID is 8 lowercase hex digits")
        try:
            raw = b64decode_strict(b64)
        except ValueError as exc:
            raise MalformedVerifierKey("a verifier key is canonical standard base64") from exc
        if len(raw) != 1 + _crypto.SIGN_PK_BYTES:
            raise MalformedVerifierKey("a verifier key is a type byte and a 32-byte key")
        verifier = cls(name, raw[0], raw[1:])
        if verifier.key_id != int(hex_id, 16):
            raise MalformedVerifierKey("the verifier key ID does not match the key")
        return verifier

    def verify(self, text: str, signature: bytes) -> bool:
        """Does `signature` (the bytes after the key ID) sign `text` under this key?"""
        if self.alg == ALG_COSIGNATURE_V1:
            if len(signature) != _TIMESTAMP.size + _crypto.SIGNATURE_BYTES:
                return False
            (timestamp,) = _TIMESTAMP.unpack_from(signature)
            if timestamp > _MAX_TIMESTAMP:
                return False
            message = cosignature_message(text, timestamp)
            return _crypto.verify(self.public_key, message, signature[_TIMESTAMP.size :])
        return _crypto.verify(self.public_key, text.encode(), signature)


def cosignature_message(text: str, timestamp: int) -> bytes:
    """The cosignature/v1 signed message: header line, time line, then the note text."""
    return f"{COSIGNATURE_HEADER}time {timestamp}\n{text}".encode()


def cosignature_timestamp(signature: NoteSignature) -> int:
    """The timestamp inside a cosignature/v1 line (checked by verification, not here)."""
    if len(signature.signature) != _TIMESTAMP.size + _crypto.SIGNATURE_BYTES:
        raise MalformedNote("a cosignature is an 8-byte timestamp and a 64-byte signature")
    (timestamp,) = _TIMESTAMP.unpack_from(signature.signature)
    return int(timestamp)


class NoteSigner:
    """An Ed25519 signing key under a name, for notes (0x01) or cosignatures (0x04).

    Holds the seed; its repr shows only the public verifier key.
    """

    __slots__ = ("_key", "_verifier")

    def __init__(self, name: str, seed: bytes, alg: int = ALG_ED25519) -> None:
        self._key = _crypto.signing_key_from_seed(seed)
        self._verifier = NoteVerifier(name, alg, bytes(self._key.verify_key))

    @property
    def verifier(self) -> NoteVerifier:
        return self._verifier

    @property
    def name(self) -> str:
        return self._verifier.name

    def __repr__(self) -> str:
        return f"NoteSigner({self._verifier.vkey()!r})"

    def sign(self, text: str) -> NoteSignature:
        """A plain Ed25519 note signature over `text` (type 0x01 keys only)."""
        if self._verifier.alg != ALG_ED25519:
            raise ValueError("a cosigner signs with cosign(text, timestamp)")
        check_note_text(text)
        return NoteSignature(
            self.name, self._verifier.key_id, _crypto.sign(self._key, text.encode())
        )

    def cosign(self, text: str, timestamp: int) -> NoteSignature:
        """A cosignature/v1 over a checkpoint text at `timestamp` (type 0x04 keys only)."""
        if self._verifier.alg != ALG_COSIGNATURE_V1:
            raise ValueError("a note signer signs with sign(text)")
        if not 0 <= timestamp <= _MAX_TIMESTAMP:
            raise ValueError("a cosignature timestamp is within 0..2^63-1")
        check_note_text(text)
        sig = _crypto.sign(self._key, cosignature_message(text, timestamp))
        return NoteSignature(self.name, self._verifier.key_id, _TIMESTAMP.pack(timestamp) + sig)


def sign_note(text: str, signers: Sequence[NoteSigner], *, timestamp: int | None = None) -> bytes:
    """Encode `text` signed by every signer, in order (cosigners use `timestamp`)."""
    check_note_text(text)
    sigs: list[NoteSignature] = []
    for signer in signers:
        if signer.verifier.alg == ALG_COSIGNATURE_V1:
            if timestamp is None:
                raise ValueError("a cosigner needs a timestamp")
            sigs.append(signer.cosign(text, timestamp))
        else:
            sigs.append(signer.sign(text))
    return Note(text, tuple(sigs)).encode()


@dataclass(frozen=True, slots=True)
class VerifiedNote:
    """A note at least one trusted key signed. Made only by `open_note`."""

    text: str
    verified: tuple[NoteSignature, ...]
    unverified: tuple[NoteSignature, ...]


def open_note(data: bytes, known: Iterable[NoteVerifier]) -> VerifiedNote:
    """Parse `data` and check every line from a known key; keep unknown lines aside.

    Raises `MalformedNote`, `NoteSignatureInvalid` (a known key's line fails), or
    `NoteUnverified` (no known key signed). Repeated lines from one key count once.
    Raises `ValueError` if `known` holds two different keys under one name and key ID.
    """
    table: dict[tuple[str, int], NoteVerifier] = {}
    for v in known:
        prior = table.setdefault((v.name, v.key_id), v)
        if prior != v:
            raise ValueError(f"two trusted keys share the name and ID {v.name}+{v.key_id:08x}")
    note = parse_note(data)
    verified: list[NoteSignature] = []
    unverified: list[NoteSignature] = []
    seen: set[tuple[str, int]] = set()
    for sig in note.signatures:
        verifier = table.get((sig.name, sig.key_id))
        if verifier is None:
            if sig not in unverified:
                unverified.append(sig)
            continue
        if (sig.name, sig.key_id) in seen:
            continue
        seen.add((sig.name, sig.key_id))
        if not verifier.verify(note.text, sig.signature):
            raise NoteSignatureInvalid(
                f"the signature of {sig.name}+{sig.key_id:08x} does not verify"
            )
        verified.append(sig)
    if not verified:
        raise NoteUnverified("no trusted key signed this note")
    return VerifiedNote(note.text, tuple(verified), tuple(unverified))
