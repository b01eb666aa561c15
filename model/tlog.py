"""C2SP transparency-log checkpoints, cosignatures and the witness protocol: the pure half.

What lives here: the checkpoint body (`tlog-checkpoint`: origin, tree size, base64 root hash,
optional extension lines), signing and opening checkpoints as signed notes with a witness
quorum (`tlog-cosignature`, cosignature/v1), the `tlog-witness` add-checkpoint request and
response bodies, and the witness's decision as a pure function (`witness_add_checkpoint`): what
to answer and which checkpoint to persist, given the request, the trusted logs and the witness's
last cosigned checkpoint. What does not: HTTP, storage, clocks. The caller persists
`WitnessReply.cosigned` atomically with the check (the spec's rollback race) BEFORE replying.

A checkpoint body, byte for byte::

    <origin>\\n
    <tree size, ASCII decimal, no leading zero>\\n
    <base64 of the 32-byte RFC 9162 root hash>\\n
    [<extension line>\\n ...]

An add-checkpoint request body::

    old <size>\\n
    <base64 consistency-proof hash>\\n   (0 to 63 lines; none when old size is 0)
    \\n
    <signed checkpoint note>

Replies: 200 with cosignature lines; 400 malformed (or old size above the checkpoint's); 403 no
trusted signature; 404 unknown origin; 409 old size is not the witness's latest (body "<its
size>\\n", Content-Type text/x.tlog.size) or same size with another root; 422 the consistency proof
does not verify.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .merkle import (
    EMPTY_ROOT,
    HASH_BYTES,
    MAX_TREE_SIZE,
    ConsistencyProofInvalid,
    verify_consistency,
)
from .note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    MalformedNote,
    NoteError,
    NoteSignature,
    NoteSignatureInvalid,
    NoteSigner,
    NoteUnverified,
    NoteVerifier,
    b64decode_strict,
    b64encode,
    check_note_text,
    cosignature_timestamp,
    open_note,
    parse_note,
    parse_signature_lines,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

MAX_PROOF_LINES: Final = 63
SIZE_CONTENT_TYPE: Final = "text/x.tlog.size"
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class MalformedCheckpoint(NoteError):
    """The note's text is not a checkpoint body. The log is broken or hostile."""


class WrongOrigin(NoteError):
    """The checkpoint is for another log than the one asked for. Do not use it for this one."""


class QuorumNotMet(NoteError):
    """Fewer trusted witnesses cosigned this checkpoint than the policy requires.

    The log may be showing you a view nobody else saw; retry later or check the witnesses.
    """


class MalformedWitnessMessage(NoteError):
    """An add-checkpoint request or reply is not in the tlog-witness format."""


def parse_decimal(text: str) -> int:
    """ASCII decimal, no leading zero, within 0..2^63-1. Raises `ValueError`."""
    if not _DECIMAL.fullmatch(text):
        raise ValueError("not a canonical decimal")
    value = int(text)
    if value > MAX_TREE_SIZE:
        raise ValueError("larger than 2^63-1")
    return value


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A log's tree head: origin, size and RFC 9162 root hash (plus opaque extension lines)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise MalformedCheckpoint("a checkpoint origin is one non-empty line")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise MalformedCheckpoint("a checkpoint size is within 0..2^63-1")
        if len(self.root) != HASH_BYTES:
            raise MalformedCheckpoint("a checkpoint root hash is 32 bytes")
        if self.size == 0 and self.root != EMPTY_ROOT:
            raise MalformedCheckpoint("an empty tree's root is SHA-256 of the empty string")
        if any(not ext or "\n" in ext for ext in self.extensions):
            raise MalformedCheckpoint("a checkpoint extension is one non-empty line")

    def body(self) -> str:
        """The note text, byte for byte (ending in a newline)."""
        lines = [self.origin, str(self.size), b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint body (a note's text). Raises `MalformedCheckpoint`."""
    try:
        check_note_text(text)
    except MalformedNote as exc:
        raise MalformedCheckpoint(str(exc)) from None
    lines = text[:-1].split("\n")
    if len(lines) < 3 or any(not line for line in lines):
        raise MalformedCheckpoint("a checkpoint is at least three non-empty lines")
    origin, size_text, root_text, *extensions = lines
    try:
        size = parse_decimal(size_text)
    except ValueError:
        raise MalformedCheckpoint("a checkpoint size is a canonical decimal") from None
    try:
        root = b64decode_strict(root_text)
    except ValueError:
        raise MalformedCheckpoint("a checkpoint root hash is canonical base64") from None
    return Checkpoint(origin, size, root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> bytes:
    """The checkpoint as a signed note under the log's key (type 0x01)."""
    if signer.verifier.alg != ALG_ED25519:
        raise ValueError("a log signs checkpoints with an Ed25519 note key (type 0x01)")
    return (checkpoint.body() + "\n" + signer.sign(checkpoint.body()).line()).encode()


def cosign_checkpoint(
    checkpoint: Checkpoint, cosigner: NoteSigner, timestamp: int
) -> NoteSignature:
    """A witness's cosignature/v1 line over the checkpoint at `timestamp` (POSIX seconds)."""
    return cosigner.cosign(checkpoint.body(), timestamp)


def add_signatures(note: bytes, signatures: Sequence[NoteSignature]) -> bytes:
    """Append signature lines (cosignatures from a witness's 200 reply) to a signed note."""
    parsed = parse_note(note)
    kept = [s for s in parsed.signatures if s not in signatures]
    return type(parsed)(parsed.text, (*kept, *signatures)).encode()


@dataclass(frozen=True, slots=True)
class VerifiedCheckpoint:
    """A checkpoint signed by its log and cosigned by at least the quorum. Made by `open_checkpoint`.

    `cosigned_at` maps each trusted witness whose cosignature verified to its timestamp.
    """

    checkpoint: Checkpoint
    cosigned_at: Mapping[str, int]


def open_checkpoint(
    note: bytes,
    log: NoteVerifier,
    *,
    origin: str | None = None,
    witnesses: Sequence[NoteVerifier] = (),
    quorum: int = 0,
) -> VerifiedCheckpoint:
    """Verify a signed checkpoint of `origin` (default: the log key's name) and its quorum.

    The log's own signature is required: a note signed only by witnesses does not pass. Raises
    `MalformedNote`, `MalformedCheckpoint`, `NoteSignatureInvalid`, `NoteUnverified` (the log
    did not sign), `WrongOrigin`, `QuorumNotMet`.
    """
    if log.alg != ALG_ED25519 or any(w.alg != ALG_COSIGNATURE_V1 for w in witnesses):
        raise ValueError("the log key is type 0x01 and witness keys are type 0x04")
    if not 0 <= quorum <= len({w.name for w in witnesses}):
        raise ValueError("the quorum cannot exceed the number of distinct witnesses")
    opened = open_note(note, [log, *witnesses])
    if not any(s.name == log.name and s.key_id == log.key_id for s in opened.verified):
        raise NoteUnverified(f"the log {log.name} did not sign this checkpoint")
    checkpoint = parse_checkpoint(opened.text)
    expected = log.name if origin is None else origin
    if checkpoint.origin != expected:
        raise WrongOrigin(f"the checkpoint is for {checkpoint.origin!r}, not {expected!r}")
    witness_ids = {(w.name, w.key_id) for w in witnesses}
    cosigned = {
        s.name: cosignature_timestamp(s)
        for s in opened.verified
        if (s.name, s.key_id) in witness_ids
    }
    if len(cosigned) < quorum:
        raise QuorumNotMet(
            f"{len(cosigned)} of the {quorum} required witnesses cosigned this checkpoint"
        )
    return VerifiedCheckpoint(checkpoint, cosigned)


# --- tlog-witness bodies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddCheckpointRequest:
    """The body of POST <prefix>/add-checkpoint."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: bytes
    """The signed checkpoint note, as sent (maybe with several signatures)."""

    def encode(self) -> bytes:
        if len(self.proof) > MAX_PROOF_LINES or any(len(p) != HASH_BYTES for p in self.proof):
            raise ValueError("at most 63 proof hashes of 32 bytes")
        head = f"old {self.old_size}\n" + "".join(b64encode(p) + "\n" for p in self.proof)
        return (head + "\n").encode() + self.checkpoint


def parse_add_checkpoint_request(body: bytes) -> AddCheckpointRequest:
    """Split a request body. Raises `MalformedWitnessMessage` (answer 400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedWitnessMessage("the request is valid UTF-8") from None
    head, sep, _ = text.partition("\n\n")
    if not sep:
        raise MalformedWitnessMessage("the request has a blank line before the checkpoint")
    lines = head.split("\n")
    old_line, proof_lines = lines[0], lines[1:]
    if not old_line.startswith("old "):
        raise MalformedWitnessMessage("the request starts with 'old <size>'")
    try:
        old_size = parse_decimal(old_line[4:])
    except ValueError:
        raise MalformedWitnessMessage("the old size is a canonical decimal") from None
    if len(proof_lines) > MAX_PROOF_LINES:
        raise MalformedWitnessMessage("at most 63 consistency proof lines")
    proof: list[bytes] = []
    for line in proof_lines:
        try:
            raw = b64decode_strict(line)
        except ValueError:
            raise MalformedWitnessMessage("a proof line is canonical base64") from None
        if len(raw) != HASH_BYTES:
            raise MalformedWitnessMessage("a proof line is one 32-byte hash")
        proof.append(raw)
    checkpoint = body[len((head + sep).encode()) :]
    if not checkpoint:
        raise MalformedWitnessMessage("the request carries a checkpoint")
    return AddCheckpointRequest(old_size, tuple(proof), checkpoint)


def encode_cosignature_reply(signatures: Sequence[NoteSignature]) -> bytes:
    """A 200 body: one or more signature lines."""
    if not signatures:
        raise ValueError("a witness replies with at least one cosignature")
    return "".join(s.line() for s in signatures).encode()


def parse_cosignature_reply(body: bytes) -> tuple[NoteSignature, ...]:
    """Parse a 200 body. Raises `MalformedWitnessMessage`; verify with `open_checkpoint`."""
    try:
        return parse_signature_lines(body.decode("utf-8"))
    except (UnicodeDecodeError, MalformedNote):
        raise MalformedWitnessMessage("the reply is newline-terminated signature lines") from None


def encode_size_body(size: int) -> bytes:
    """A 409 body (Content-Type `SIZE_CONTENT_TYPE`): the witness's latest size."""
    return f"{size}\n".encode()


def parse_size_body(body: bytes) -> int:
    """Parse a 409 body. Raises `MalformedWitnessMessage`."""
    try:
        text = body.decode("ascii")
        if not text.endswith("\n"):
            raise ValueError("no newline")
        return parse_decimal(text[:-1])
    except (UnicodeDecodeError, ValueError):
        raise MalformedWitnessMessage("the size body is a decimal and a newline") from None


# --- The witness's decision ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WitnessReply:
    """What to answer, and the checkpoint to persist first (only on 200)."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    cosigned: Checkpoint | None = None


def _refuse(status: int, why: str) -> WitnessReply:
    return WitnessReply(status, (why + "\n").encode())


def witness_add_checkpoint(
    body: bytes,
    *,
    logs: Mapping[str, Sequence[NoteVerifier]],
    latest: Mapping[str, Checkpoint],
    cosigner: NoteSigner,
    now: int,
) -> WitnessReply:
    """Decide one add-checkpoint request, as tlog-witness says, without I/O.

    `logs` maps each known origin to the log keys trusted for it; `latest` maps an origin to the
    checkpoint this witness last cosigned (absent: never). On 200, `cosigned` is the new latest
    state: persist it, atomically with having read `latest`, before sending the reply.
    """
    try:
        request = parse_add_checkpoint_request(body)
        note = parse_note(request.checkpoint)
    except (MalformedWitnessMessage, MalformedNote) as exc:
        return _refuse(400, str(exc))
    origin = note.text.partition("\n")[0]
    trusted = logs.get(origin)
    if not trusted:
        return _refuse(404, "unknown log origin")
    try:
        opened = open_note(request.checkpoint, trusted)
        checkpoint = parse_checkpoint(opened.text)
    except (NoteSignatureInvalid, NoteUnverified):
        return _refuse(403, "no trusted log signature verifies")
    except MalformedCheckpoint as exc:
        return _refuse(400, str(exc))
    if request.old_size > checkpoint.size:
        return _refuse(400, "the old size is larger than the checkpoint's")
    prior = latest.get(origin)
    prior_size = prior.size if prior is not None else 0
    prior_root = prior.root if prior is not None else EMPTY_ROOT
    if request.old_size != prior_size:
        return WitnessReply(409, encode_size_body(prior_size), SIZE_CONTENT_TYPE)
    if checkpoint.size == prior_size and checkpoint.root != prior_root:
        return WitnessReply(409, encode_size_body(prior_size), SIZE_CONTENT_TYPE)
    try:
        verify_consistency(prior_size, checkpoint.size, prior_root, checkpoint.root, request.proof)
    except ConsistencyProofInvalid:
        return _refuse(422, "the consistency proof does not verify")
    line = cosign_checkpoint(checkpoint, cosigner, now)
    return WitnessReply(200, encode_cosignature_reply([line]), cosigned=checkpoint)
