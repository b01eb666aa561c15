"""A collab's signed tree heads (ADR-0020): how the relay signs them and how anyone checks them.

Lives here: the origin of a collab's log, signing a checkpoint with the relay's key as a C2SP
signed note (log signature, type 0x01, key name = origin) plus the relay's own dated
`cosignature/v1` (key `<relay name>/clock`, type 0x04) that says "as of this time, this is the
largest tree I have for this origin", opening such a note under a pinned relay key, and the
transferable proof that two of them contradict each other. Not here: the tree itself
(model/merkle.py), the note format (model/note.py, model/tlog.py), any I/O.

Both keys are the relay's one Ed25519 key (ADR-0007), so a client that pinned it needs nothing
new; the note text (a checkpoint) and the cosignature message (`cosignature/v1\\n…`) can never
be mistaken for a receipt's signed bytes, which start with a NUL-terminated domain tag that no
note text holds.

Two checkpoints of one origin contradict each other when

- they have the same size and different roots (a fork), or
- the one dated strictly later is smaller (the relay said "the largest tree is n" after it had
  already signed a larger one: a signed `caught_up` at 12 after a receipt under a checkpoint of
  14 is exactly this pair).

The dates are whole seconds, so two statements in the same second never count as a
contradiction: an honest relay may sign a smaller head in the same second it signed a larger
one only when both were true then (see relay/_checkpoints.py), and a liar that backdates is
left to the staleness bound (issue 16, item 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import msgspec

from .errors import ModelError
from .note import ALG_COSIGNATURE_V1, ALG_ED25519, Note, NoteError, NoteSigner, NoteVerifier
from .tlog import Checkpoint, QuorumNotMet, open_checkpoint, parse_checkpoint

if TYPE_CHECKING:
    from collections.abc import Sequence

ORIGIN_INFIX: Final = "/collab/"
CLOCK_SUFFIX: Final = "/clock"
PROOF_KIND: Final = "cozylabs-checkpoint-contradiction/1"
_MAX_LOG_SIGNERS: Final = 4096


DEFAULT_STALE_AFTER: Final = 45.0
"""The staleness bound, in seconds, against a relay that does not announce its heartbeat
interval (`welcome.heartbeat_ms` 0): the relay's default interval (30 s) plus its grace."""
MIN_STALE_GRACE: Final = 5.0


def stale_after(heartbeat_ms: int) -> float:
    """The staleness bound for a relay that announced `heartbeat_ms` (0: none announced).

    The interval plus a grace of half of it, and never less than `MIN_STALE_GRACE` seconds:
    signed dates are whole seconds, and a loaded relay or device may send or read a heartbeat a
    little late, which must not pass for a frozen view. 30 s gives 45 s, the old default.

    The announcement can only tighten the default, never loosen it: the bound guards against
    the relay, so a relay announcing an hour must not buy itself an hour and a half of frozen
    view. A client of a relay that really beats slower than every 30 s sets its bound itself.
    """
    default = DEFAULT_STALE_AFTER  # read at call time (tests lower it)
    if heartbeat_ms <= 0:
        return default
    interval = heartbeat_ms / 1000
    return min(interval + max(interval / 2, MIN_STALE_GRACE), default)


def collab_origin(relay_name: str, collab_id: str) -> str:
    """The checkpoint origin (and log key name) of one collab on a relay."""
    return f"{relay_name}{ORIGIN_INFIX}{collab_id}"


def clock_name(relay_name: str) -> str:
    return f"{relay_name}{CLOCK_SUFFIX}"


class CheckpointSigner:
    """The relay's key as the signer of its collabs' checkpoints. Holds the seed; thread-safe."""

    __slots__ = ("_clock", "_logs", "_relay_name", "_seed")

    def __init__(self, relay_name: str, seed: bytes) -> None:
        self._relay_name = relay_name
        self._seed = seed
        self._clock = NoteSigner(clock_name(relay_name), seed, ALG_COSIGNATURE_V1)
        # Each origin's log signer, kept: making one derives the key from the seed again (a
        # scalar multiplication, as costly as a signature), once per commit group otherwise.
        self._logs: dict[str, NoteSigner] = {}

    @property
    def relay_name(self) -> str:
        return self._relay_name

    def __repr__(self) -> str:
        return f"CheckpointSigner({self._relay_name!r})"

    def sign(self, collab_id: str, size: int, root: bytes, timestamp: int) -> bytes:
        """The checkpoint (origin, size, root) signed by the log key and dated `timestamp`."""
        origin = collab_origin(self._relay_name, collab_id)
        body = Checkpoint(origin, size, root).body()
        log = self._logs.get(origin)
        if log is None:
            if len(self._logs) >= _MAX_LOG_SIGNERS:
                self._logs.clear()
            log = self._logs[origin] = NoteSigner(origin, self._seed, ALG_ED25519)
        return Note(body, (log.sign(body), self._clock.cosign(body, timestamp))).encode()


class CheckpointInvalid(ModelError):
    """A collab checkpoint that is malformed, not signed (and dated) by the relay's key, or for
    another collab."""


@dataclass(frozen=True, slots=True)
class SignedHead:
    """A checkpoint of one collab, signed and dated by the relay. Made by `open_head`."""

    collab_id: str
    origin: str
    size: int
    root: bytes
    timestamp: int
    note: bytes


def open_head(note: bytes, relay_pk: bytes, collab_id: str) -> SignedHead:
    """Verify a collab checkpoint under the relay key. Raises `CheckpointInvalid`."""
    try:
        text = note.decode()
        origin = parse_checkpoint(text.split("\n\n", 1)[0] + "\n").origin
    except (UnicodeDecodeError, NoteError) as exc:
        raise CheckpointInvalid(f"not a checkpoint: {exc}") from None
    suffix = ORIGIN_INFIX + collab_id
    if not origin.endswith(suffix) or len(origin) == len(suffix):
        raise CheckpointInvalid(f"the checkpoint is for {origin!r}, not collab {collab_id}")
    relay_name = origin[: -len(suffix)]
    try:
        clock = NoteVerifier(clock_name(relay_name), ALG_COSIGNATURE_V1, relay_pk)
        opened = open_checkpoint(
            note, NoteVerifier(origin, ALG_ED25519, relay_pk), witnesses=[clock], quorum=1
        )
    except NoteError as exc:
        raise CheckpointInvalid(
            f"the checkpoint is not signed and dated by the relay: {exc}"
        ) from None
    cp = opened.checkpoint
    return SignedHead(collab_id, origin, cp.size, cp.root, opened.cosigned_at[clock.name], note)


def witnessed(
    head: SignedHead, relay_pk: bytes, witnesses: Sequence[NoteVerifier], quorum: int
) -> dict[str, int]:
    """Check a collab's witness policy over an opened head: at least `quorum` of `witnesses`
    cosigned its checkpoint (lines the relay appended to its note). Returns who cosigned when.

    Raises `QuorumNotMet`, also when a listed witness's line does not verify over this
    checkpoint (a line copied from another checkpoint proves nothing about this one).
    """
    log = NoteVerifier(head.origin, ALG_ED25519, relay_pk)
    try:
        opened = open_checkpoint(head.note, log, witnesses=witnesses, quorum=quorum)
    except QuorumNotMet:
        raise
    except NoteError as exc:
        raise QuorumNotMet(f"a witness line does not verify over this checkpoint: {exc}") from None
    return dict(opened.cosigned_at)


def contradiction(a: SignedHead, b: SignedHead) -> str | None:
    """Why two signed heads of one origin cannot both be true, or None when they can."""
    if a.origin != b.origin:
        return None
    if a.size == b.size and a.root != b.root:
        return f"two different trees of size {a.size}"
    early, late = (a, b) if a.timestamp <= b.timestamp else (b, a)
    if late.timestamp > early.timestamp and late.size < early.size:
        return (
            f"at {late.timestamp} the relay signed {late.size} as its largest tree, after signing"
            f" {early.size} at {early.timestamp}"
        )
    return None


class CheckpointProof(msgspec.Struct, frozen=True):
    """Two signed checkpoints that contradict each other, and the relay key that signed both."""

    kind: str
    relay_pk: bytes
    collab_id: str
    first: bytes
    second: bytes


class NotAContradiction(ModelError):
    pass


def check(proof: CheckpointProof) -> str:
    """Return what the proof shows, or raise `NotAContradiction`."""
    if proof.kind != PROOF_KIND:
        raise NotAContradiction(f"not a {PROOF_KIND} document")
    try:
        a = open_head(proof.first, proof.relay_pk, proof.collab_id)
        b = open_head(proof.second, proof.relay_pk, proof.collab_id)
    except CheckpointInvalid as exc:
        raise NotAContradiction(str(exc)) from None
    why = contradiction(a, b)
    if why is None:
        raise NotAContradiction("the two checkpoints do not contradict each other")
    return f"the relay signed contradicting checkpoints of collab {proof.collab_id}: {why}"


def encode(proof: CheckpointProof) -> bytes:
    return msgspec.json.encode(proof)


def decode(data: bytes) -> CheckpointProof:
    try:
        return msgspec.json.decode(data, type=CheckpointProof)
    except msgspec.DecodeError as exc:
        raise NotAContradiction(f"not a checkpoint contradiction: {exc}") from None
