"""A witness's durable state: its key and, per log origin, the last checkpoint it cosigned.

Why it must survive everything: a witness that forgets what it cosigned would cosign a fork the
next time it is asked (it would trust the first checkpoint it sees again). So `serve` opens
only an existing, initialised state directory and never creates one; `init` never overwrites.

Layout of the state directory (mode 0700)::

    witness.key       the Ed25519 seed, mode 0600, as `PRIVATE+KEY+<name>+<key id>+<base64>`
    witness.vkey      the public verifier key string (what the witness prints and publishes)
    state.sqlite      SQLite (WAL, synchronous=FULL): the format version, the key's verifier
                      string, one row per origin (size, root, checkpoint text, the note as the
                      log sent it, when it was cosigned), and the first MAX_EVIDENCE_PER_ORIGIN
                      log-signed checkpoints refused as forks of it (`evidence`)

Every add-checkpoint request is decided inside one `BEGIN IMMEDIATE` transaction: read the
origin's row, decide (`model.tlog.witness_add_checkpoint`), write the new row, commit (fsync'd
by synchronous=FULL), and only then is the 200 sent. That is the atomicity tlog-witness asks for
(a slower request for an older size can never roll the record back), and what makes a
`kill -9` right after a cosignature harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from localfs import atomic_write
from model import _crypto
from model.note import (
    ALG_COSIGNATURE_V1,
    MalformedVerifierKey,
    NoteError,
    NoteSigner,
    b64decode_strict,
    b64encode,
    is_valid_key_name,
    parse_note,
)
from model.tlog import (
    Checkpoint,
    WitnessReply,
    parse_add_checkpoint_request,
    parse_checkpoint,
    witness_add_checkpoint,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from model.note import NoteVerifier

FORMAT_VERSION: Final = 1
KEY_FILE: Final = "witness.key"
VKEY_FILE: Final = "witness.vkey"
DB_FILE: Final = "state.sqlite"
_PRIVATE_PREFIX: Final = "PRIVATE+KEY+"

_SCHEMA: Final = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE cosigned (
    origin      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL CHECK (size >= 0),
    root        BLOB NOT NULL CHECK (length(root) = 32),
    body        TEXT NOT NULL,
    note        BLOB NOT NULL,
    cosigned_at INTEGER NOT NULL
) STRICT;
CREATE TABLE evidence (
    origin      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    root        BLOB NOT NULL,
    status      INTEGER NOT NULL,
    note        BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (origin, size, root)
) STRICT;
"""
MAX_EVIDENCE_PER_ORIGIN: Final = 16
"""Refused log-signed checkpoints kept per origin (the first ones: a forking log cannot make a
witness store without bound, and the first fork is the one that matters)."""


class WitnessStateError(Exception):
    """The witness's state directory is missing, not initialised, or damaged. The message says
    what to do; it is one line and never holds key material."""


@dataclass(frozen=True, slots=True)
class CosignedRecord:
    """What the witness keeps per origin (for `status` output and tests)."""

    origin: str
    size: int
    root: bytes
    cosigned_at: int


@dataclass(frozen=True, slots=True)
class EvidenceRecord:
    """A checkpoint the log signed and the witness refused as a fork of what it cosigned."""

    origin: str
    size: int
    root: bytes
    status: int
    note: bytes
    received_at: int


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    # mode=rw: opening never creates a database, so a deleted state file is noticed instead of
    # silently replaced by an empty one (which would make the witness trust a fork).
    # as_uri() percent-encodes the path: a directory name holding "?" or "#" stays a path.
    uri = f"{path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def init_state(directory: Path, name: str) -> str:
    """Create a witness's key and empty state in `directory`; return its verifier key string.

    `directory` may exist only if empty. Raises `WitnessStateError` (already initialised, not
    empty, a bad name, or the filesystem refused).
    """
    if not is_valid_key_name(name):
        raise WitnessStateError(
            f"--name {name!r} cannot be a key name: use one word with no spaces or '+', "
            "ideally a schema-less URL such as witness.example.org/w1"
        )
    if (directory / DB_FILE).exists() and not (directory / KEY_FILE).exists():
        raise WitnessStateError(
            f"an earlier `cozy witness init` in {directory} did not finish (a database but no "
            "key): delete that directory and run init again"
        )
    if (directory / KEY_FILE).exists():
        raise WitnessStateError(
            f"{directory} already holds a witness; it is never overwritten (its state is what "
            "keeps it from cosigning a fork): choose another --state directory"
        )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise WitnessStateError(
                f"{directory} is not empty: give `cozy witness init` a new or empty directory"
            )
        os.chmod(directory, 0o700)
        seed = _crypto.random_bytes(_crypto.SIGN_SEED_BYTES)
        signer = NoteSigner(name, seed, ALG_COSIGNATURE_V1)
        vkey = signer.verifier.vkey()
        raw = b64encode(bytes([ALG_COSIGNATURE_V1]) + seed)
        private = f"{_PRIVATE_PREFIX}{name}+{signer.verifier.key_id:08x}+{raw}\n"
        db_path = directory / DB_FILE
        conn = _connect(db_path, create=True)
        try:
            conn.executescript(_SCHEMA)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("format", str(FORMAT_VERSION)), ("vkey", vkey)],
            )
        finally:
            conn.close()
        # The key comes last: a directory holding the key always holds a complete database.
        atomic_write(directory / VKEY_FILE, (vkey + "\n").encode(), mode=0o644, overwrite=False)
        atomic_write(directory / KEY_FILE, private.encode(), mode=0o600, overwrite=False)
    except OSError as exc:
        raise WitnessStateError(
            f"cannot create the witness state in {directory}: {exc.strerror}"
        ) from None
    except sqlite3.Error as exc:
        raise WitnessStateError(
            f"cannot create the witness database in {directory} ({type(exc).__name__}): check "
            "the disk and the directory's permissions"
        ) from None
    return vkey


def _read_signer(directory: Path) -> NoteSigner:
    path = directory / KEY_FILE
    try:
        info = path.stat()
        text = path.read_text().strip()
    except FileNotFoundError:
        raise WitnessStateError(
            f"{directory} holds no witness key: run `cozy witness init --state {directory} "
            "--name NAME` first (or point --state at the directory you initialised)"
        ) from None
    except OSError as exc:
        raise WitnessStateError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise WitnessStateError(
            f"{path} is readable by other users: `chmod 600 {path}` (and consider the key "
            "exposed: a copy could cosign forks in this witness's name)"
        )
    bad = WitnessStateError(f"{path} is not a witness key file; restore it from your backup")
    if not text.startswith(_PRIVATE_PREFIX):
        raise bad
    name, _, rest = text[len(_PRIVATE_PREFIX) :].partition("+")
    hex_id, _, b64 = rest.partition("+")
    try:
        raw = b64decode_strict(b64)
        if len(raw) != 1 + _crypto.SIGN_SEED_BYTES or raw[0] != ALG_COSIGNATURE_V1:
            raise bad
        signer = NoteSigner(name, raw[1:], ALG_COSIGNATURE_V1)
    except (ValueError, MalformedVerifierKey):
        raise bad from None
    if f"{signer.verifier.key_id:08x}" != hex_id:
        raise bad
    return signer


class _LatestInTransaction(Mapping[str, Checkpoint]):
    """The `latest` mapping `witness_add_checkpoint` reads, answered from the open transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __getitem__(self, origin: str) -> Checkpoint:
        row = self._conn.execute(
            "SELECT size, root, body FROM cosigned WHERE origin = ?", (origin,)
        ).fetchone()
        if row is None:
            raise KeyError(origin)
        size, root, _body = row
        return Checkpoint(origin, int(size), bytes(root))

    def __iter__(self) -> Iterator[str]:
        for (origin,) in self._conn.execute("SELECT origin FROM cosigned"):
            yield str(origin)

    def __len__(self) -> int:
        (count,) = self._conn.execute("SELECT count(*) FROM cosigned").fetchone()
        return int(count)


class WitnessStore:
    """An opened state directory. Thread-safe; every method blocks (call from a worker thread)."""

    def __init__(
        self,
        directory: Path,
        signer: NoteSigner,
        conn: sqlite3.Connection,
        dir_lock: int | None = None,
    ) -> None:
        self.directory = directory
        self._signer = signer
        self._conn = conn
        self._dir_lock = dir_lock
        self._lock = threading.Lock()

    @property
    def verifier(self) -> NoteVerifier:
        return self._signer.verifier

    def add_checkpoint(
        self, body: bytes, *, logs: Mapping[str, Sequence[NoteVerifier]], now: int
    ) -> WitnessReply:
        """Decide one request and, on 200, persist the new checkpoint before returning.

        The read of the origin's record, the decision and the write are one transaction, so
        concurrent requests are decided one after the other against committed state. Raises
        `sqlite3.Error` if the write fails; the caller must then answer 5xx, not the reply.
        """
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                reply = witness_add_checkpoint(
                    body,
                    logs=logs,
                    latest=_LatestInTransaction(self._conn),
                    cosigner=self._signer,
                    now=now,
                )
                new = reply.cosigned
                if new is not None:
                    note = parse_add_checkpoint_request(body).checkpoint
                    self._conn.execute(
                        "INSERT INTO cosigned (origin, size, root, body, note, cosigned_at)"
                        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (origin) DO UPDATE SET"
                        " size = excluded.size, root = excluded.root, body = excluded.body,"
                        " note = excluded.note, cosigned_at = excluded.cosigned_at",
                        (new.origin, new.size, new.root, new.body(), note, now),
                    )
                elif reply.status in (409, 422):
                    self._keep_evidence(body, reply.status, now)
                self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
        return reply

    def _keep_evidence(self, body: bytes, status: int, now: int) -> None:
        """Keep a log-signed checkpoint refused as a fork of what was cosigned (tlog-witness
        allows logging it): with the cosigned note beside it, two checkpoints the log signed
        that cannot both be true. A 409 or 422 comes only after the log's signature verified.

        Kept: the same size with another root (409: proof of a fork by itself), and a proof
        that does not lead from the cosigned checkpoint (422: a fork, or a broken prover). Not
        kept: a 409 for an old size (an honest log's late or lost-track request).
        """
        try:
            note = parse_add_checkpoint_request(body).checkpoint
            checkpoint = parse_checkpoint(parse_note(note).text)
        except NoteError:
            return
        prior = _LatestInTransaction(self._conn).get(checkpoint.origin)
        if prior is None:
            return
        forked = status == 422 or (checkpoint.size == prior.size and checkpoint.root != prior.root)
        if not forked:
            return
        (kept,) = self._conn.execute(
            "SELECT count(*) FROM evidence WHERE origin = ?", (checkpoint.origin,)
        ).fetchone()
        if kept >= MAX_EVIDENCE_PER_ORIGIN:
            return
        self._conn.execute(
            "INSERT OR IGNORE INTO evidence (origin, size, root, status, note, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (checkpoint.origin, checkpoint.size, checkpoint.root, status, note, now),
        )

    def evidence(self) -> list[EvidenceRecord]:
        """Every refused log-signed checkpoint kept, by origin then arrival."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT origin, size, root, status, note, received_at FROM evidence"
                " ORDER BY origin, received_at"
            ).fetchall()
        return [
            EvidenceRecord(str(o), int(s), bytes(r), int(st), bytes(n), int(t))
            for o, s, r, st, n, t in rows
        ]

    def records(self) -> list[CosignedRecord]:
        """Every origin's last cosigned checkpoint, sorted by origin."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT origin, size, root, cosigned_at FROM cosigned ORDER BY origin"
            ).fetchall()
        return [CosignedRecord(str(o), int(s), bytes(r), int(t)) for o, s, r, t in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._dir_lock is not None:
                os.close(self._dir_lock)  # releases the flock
                self._dir_lock = None


def _lock_directory(directory: Path) -> int:
    """An exclusive flock on the directory, held while serving: one witness per state.

    Two processes on one record would still be consistent (SQLite serialises their
    transactions), but one would answer 503 whenever the other held the write lock for long,
    and a second `serve` is almost always a mistake (an old one still running).
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WitnessStateError(
            f"another `cozy witness serve` is using {directory}: stop it first (one witness "
            "per state directory)"
        ) from None
    return fd


def open_state(directory: Path, *, serving: bool = False) -> WitnessStore:
    """Open an initialised state directory. Never creates anything.

    With `serving`, also take the directory's exclusive lock (see `_lock_directory`). Raises
    `WitnessStateError` with a one-line next step when the directory, the key or the database
    is missing, the key file is readable by others, the key and the database do not belong
    together, or (serving) another process serves it.
    """
    if not directory.is_dir():
        raise WitnessStateError(
            f"no witness state at {directory}: run `cozy witness init --state {directory} "
            "--name NAME` first, or point --state at the directory you initialised"
        )
    signer = _read_signer(directory)
    db_path = directory / DB_FILE
    if not db_path.is_file():
        raise WitnessStateError(
            f"{db_path} is missing: restore it from your backup. A witness must not start "
            "without the record of what it cosigned (it would then cosign a fork); if it is "
            "truly lost, `cozy witness init` a new witness under a new name and key"
        )
    try:
        conn = _connect(db_path, create=False)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error:
        raise WitnessStateError(
            f"{db_path} is not a witness database (unreadable or damaged): restore it from "
            "your backup"
        ) from None
    if meta.get("format") != str(FORMAT_VERSION):
        conn.close()
        raise WitnessStateError(
            f"{db_path} has state format {meta.get('format')!r}; this cozy reads format "
            f"{FORMAT_VERSION}: use the cozy version that wrote it"
        )
    if meta.get("vkey") != signer.verifier.vkey():
        conn.close()
        raise WitnessStateError(
            f"{directory / KEY_FILE} and {db_path} belong to different witnesses: restore the "
            "pair from one backup"
        )
    if not serving:
        return WitnessStore(directory, signer, conn)
    try:
        dir_lock = _lock_directory(directory)
    except BaseException:
        conn.close()
        raise
    return WitnessStore(directory, signer, conn, dir_lock)
