"""Posting and reading: `cozy post`, `dm`, `attach`, `fetch`, `verify`, and `cozy evidence check`
with the proof export an equivocation alarm leaves behind (`tail` is in `_cli_tail`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clientkit import _quorum as quorum
from clientkit._cli_session import CliError, _as_member, _member, _opened, _unlock, _view
from clientkit._home import Home
from clientkit.errors import EquivocationDetected, ForkDetected, StaleView, TamperDetected
from localfs import atomic_write
from model import artifacts, checkpoints, equivocation
from model import content as contentmod
from model._crypto import CryptoError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator


async def cmd_post(args: argparse.Namespace) -> None:
    me = await _unlock(Home.from_env())
    async with _opened(me) as session:
        with _as_member(args.collab):
            sent = await session.post(args.collab, contentmod.Message(text=args.text))
    print(f"posted as seq {sent.seq}{' (already posted)' if sent.earlier else ''}")


async def cmd_dm(args: argparse.Namespace) -> None:
    """A direct message, sealed to the recipient's key as this device's fold pinned it."""
    me = await _unlock(Home.from_env())
    async with _opened(me) as session:
        view = await _view(session, args.collab)
        to = await _member(session.client, view, args.handle)
        sent = await session.dm(args.collab, to.account_id, contentmod.Message(text=args.text))
    print(f"sent a direct message to {args.handle} as seq {sent.seq}")


async def cmd_attach(args: argparse.Namespace) -> None:
    """Seal a file under a fresh file key, upload it piece by piece, and post a reference
    (with the file key, under the collab key) so exactly the collab's readers can open it."""
    me = await _unlock(Home.from_env())
    name, size = _file_facts(args.file)
    async with _opened(me) as session:
        with _as_member(args.collab):
            attached = await session.attach(args.collab, name, size, _read_pieces(args.file))
    print(attached.ref)


async def cmd_fetch(args: argparse.Namespace) -> None:
    """Download an artifact to a spool file, then check it against its ref and decrypt it into
    OUT piece by piece; only a complete, verified file replaces OUT. Memory stays bounded.

    The file key comes from the attachment event, read through this device's checked view."""
    me = await _unlock(Home.from_env())
    out = Path(args.out)
    spool = out.with_name(f".{out.name}.download")
    async with _opened(me) as session:
        await _view(session, args.collab)  # a collab this account cannot read: one line
        async with session.fetch(args.collab, args.ref) as (attachment, pieces):
            with _Spool(spool) as writer:
                async for piece in pieces:
                    writer.add(piece)
    try:
        written = _open_spool(spool, out, attachment.key, args.collab, args.ref)
    finally:
        spool.unlink(missing_ok=True)
    print(f"{out}: {written} bytes, verified against {args.ref}")


# Small blocking file helpers: a CLI process does nothing else while they run.


def _file_facts(file: str) -> tuple[str, int]:
    path = Path(file)
    if not path.is_file():
        raise CliError(f"{path} is not a readable file")
    return path.name, path.stat().st_size


def _read_pieces(file: str) -> Iterator[bytes]:
    with Path(file).open("rb") as f:
        while piece := f.read(artifacts.CHUNK_BYTES):
            yield piece


class _Spool:
    """Length-prefixed sealed pieces on disk, so a download is never held in memory whole."""

    def __init__(self, path: Path) -> None:
        self._f = path.open("wb")

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._f.close()

    def add(self, piece: bytes) -> None:
        self._f.write(len(piece).to_bytes(4, "big") + piece)


def _spooled(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while head := f.read(4):
            yield f.read(int.from_bytes(head, "big"))


def _open_spool(spool: Path, out: Path, key: bytes, collab_id: str, ref: str) -> int:
    partial_out = out.with_name(f".{out.name}.partial")
    written = 0
    try:
        with partial_out.open("wb") as f:
            for plain in artifacts.open_stream(
                key, collab_id, artifacts.check_ref(ref, _spooled(spool))
            ):
                f.write(plain)
                written += len(plain)
        partial_out.replace(out)
    except CryptoError:
        partial_out.unlink(missing_ok=True)
        raise TamperDetected(
            "the download does not verify against its ref or the collab key; nothing was written",
            collab_id=collab_id,
            seq=None,
        ) from None
    return written


async def cmd_verify(args: argparse.Namespace) -> None:
    """Re-verify a collab's whole history from seq 1 and print the head to compare with other
    members out of band; with --against, compare with the head another member read out; with
    --max-age, fail when the freshest signed head this device holds (after this read) is older:
    a relay can keep serving an old head, but not sign a fresh date for it without its receipts
    for newer events contradicting it (ADR-0020)."""
    me = await _unlock(Home.from_env())
    against = _parse_head(args.against) if args.against else None
    async with _opened(me) as session:
        with _as_member(args.collab):
            view = await session.verify(
                args.collab,
                progress=lambda n: print(
                    f"\r  verified {n} events…", end="", file=sys.stderr, flush=True
                ),
            )
        book, relay_pk = session.client.checkpoints, session.client.relay_pk
        heads = (book.held(relay_pk, args.collab), book.top(relay_pk, args.collab))
    print(f"\r  verified {view.head.seq} events", file=sys.stderr)
    if args.max_age is not None:
        # With a witness policy, the witnesses' dates (docs/ordering.md, "Whose date").
        policy = view.membership.witnesses if view.membership is not None else None
        freshest = max(
            (quorum.witnessed_at(relay_pk, h, policy) for h in heads if h is not None), default=0
        )
        age = time.time() - freshest
        if age > args.max_age:
            raise StaleView(args.collab, age=age, bound=args.max_age)
    print(f"head {_short_head(view.head.seq, view.head.chain)}")
    if against is None:
        return
    seq, prefix = against
    mine = view.chain_at(seq)
    if mine is None:
        raise ForkDetected(
            f"the other member read seq {seq}, but the relay has shown this device only up to"
            f" {view.head.seq}: it is withholding events from one of you",
            collab_id=args.collab,
            seq=seq,
        )
    if not mine.hex().startswith(prefix):
        raise ForkDetected(
            f"at seq {seq} this device verified {_short_head(seq, mine)} but the other member"
            f" read {seq}:{prefix}: the relay showed you different histories",
            collab_id=args.collab,
            seq=seq,
        )
    print(f"matches the other member's head at seq {seq}")


def _short_head(seq: int, chain: bytes) -> str:
    return f"{seq}:{chain.hex()[:16]}"


def _parse_head(text: str) -> tuple[int, str]:
    seq, _, prefix = text.partition(":")
    if not seq.isdigit() or len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise CliError("--against takes a head as `cozy verify` prints it: SEQ:HEX (8+ hex digits)")
    return int(seq), prefix


def _export_proof(alarm: EquivocationDetected) -> None:
    """Keep the relay's self-contradiction where the user can hand it on."""
    home = Home.from_env()
    proof = alarm.proof
    if isinstance(proof, checkpoints.CheckpointProof):
        name, data = f"checkpoints-{alarm.collab_id}-{alarm.seq}.json", checkpoints.encode(proof)
    else:
        name, data = f"equivocation-{alarm.collab_id}-{alarm.seq}.json", equivocation.encode(proof)
    path = home.path / "evidence" / name
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, data, mode=0o600)
    except OSError as exc:
        print(f"(could not save the proof: {exc.strerror})", file=sys.stderr)
        return
    print(
        f"the relay's signed contradiction is saved in {path}; anyone can check it with"
        f" `cozy evidence check {path}`",
        file=sys.stderr,
    )


async def cmd_evidence_check(args: argparse.Namespace) -> None:
    print(_check_proof_file(args.file))


def _check_proof_file(file: str) -> str:
    """Either kind of evidence: two receipts / a receipt and a served history
    (model/equivocation.py), or two contradicting checkpoints (model/checkpoints.py)."""
    try:
        data = Path(file).read_bytes()
        if checkpoints.PROOF_KIND.encode() in data:
            cp = checkpoints.decode(data)
            return f"valid proof: {checkpoints.check(cp)} (relay key {cp.relay_pk.hex()[:16]}…)"
        proof = equivocation.decode(data)
        return f"valid proof: {equivocation.check(proof)} (relay key {proof.relay_pk.hex()[:16]}…)"
    except (OSError, equivocation.NotAProof, checkpoints.NotAContradiction) as exc:
        raise CliError(f"{file}: {exc}") from None
