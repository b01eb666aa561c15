"""`cozy witness init|serve|status` as an operator runs it and a log (or an attacker) talks to it.

Every witness here is a real `cozy witness serve` child process on a loopback port picked by the
OS (`--listen 127.0.0.1:0`, the bound URL read from its first stdout line), with its state in
the test's temp directory. Logs are built with model.merkle / model.tlog, requests sent with
`clientkit.submit_checkpoint` (or raw HTTP, for what a client library would never send), and
every cosignature is verified with model.note / model.tlog, as a relay's clients would.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio

from clientkit import (
    WitnessBadRequest,
    WitnessConflict,
    WitnessProofRejected,
    WitnessReplyInvalid,
    WitnessUnavailable,
    WitnessUnknownLog,
    WitnessUntrustedSignature,
    submit_checkpoint,
)
from model import merkle
from model.merkle import leaf_hash
from model.note import ALG_COSIGNATURE_V1, NoteSigner, NoteVerifier, b64encode
from model.tlog import (
    AddCheckpointRequest,
    Checkpoint,
    add_signatures,
    cosign_checkpoint,
    open_checkpoint,
    parse_cosignature_reply,
    sign_checkpoint,
)
from tests.cli_harness import COZY

RELAY = "relay.example"
ORIGIN = f"{RELAY}/collab/0c0ffee0"
WITNESS_NAME = "witness.example/w1"


class Log:
    """A log (one collab's tree, as ADR-0020 has the relay keep it) that can fork."""

    def __init__(self, origin: str = ORIGIN, seed: bytes = bytes(range(32))) -> None:
        self.seed = seed
        self.signer = NoteSigner(origin, seed)
        self.leaves: list[bytes] = []

    @property
    def verifier(self) -> NoteVerifier:
        return self.signer.verifier

    def fork(self, tag: bytes) -> Log:
        """The same log (same key) with a copy of its leaves, to grow another branch."""
        other = Log(self.signer.name, self.seed)
        other.leaves = list(self.leaves)
        other.grow(1, tag)
        return other

    def grow(self, n: int, tag: bytes = b"event") -> None:
        start = len(self.leaves)
        self.leaves += [leaf_hash(tag + b"-%d" % i) for i in range(start, start + n)]

    def note(self, size: int | None = None) -> bytes:
        size = len(self.leaves) if size is None else size
        cp = Checkpoint(self.signer.name, size, merkle.tree_root(self.leaves[:size]))
        return sign_checkpoint(cp, self.signer)

    def request(self, old: int, size: int | None = None) -> AddCheckpointRequest:
        size = len(self.leaves) if size is None else size
        proof = merkle.consistency_proof(self.leaves[:size], old) if 0 < old < size else ()
        return AddCheckpointRequest(old, tuple(proof), self.note(size))


class WitnessProcess:
    """`cozy witness serve` in a child process; `url` is what it printed it listens on."""

    def __init__(self, state: Path, *args: str) -> None:
        self.state = state
        self.args = args
        self.log_path = state.parent / "witness.log"
        self.url = ""
        self.vkey = ""
        self._proc: trio.Process | None = None

    async def start(self) -> None:
        command = [*COZY, "witness", "serve", "--state", str(self.state)]
        command += ["--listen", "127.0.0.1:0", *self.args]
        with self.log_path.open("ab") as log:
            self._proc = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=log
            )
        assert self._proc.stdout is not None
        out = b""
        with trio.fail_after(30):
            while out.count(b"\n") < 2:
                chunk = await self._proc.stdout.receive_some(4096)
                if not chunk:
                    pytest.fail(f"the witness exited: {self.log_path.read_text()}")
                out += chunk
        match = re.search(rb"listening on (\S+)", out)
        vkey = re.search(rb"witness key (\S+)", out)
        assert match, out
        assert vkey, out
        self.url = match.group(1).decode()
        self.vkey = vkey.group(1).decode()

    async def restarted(self) -> WitnessProcess:
        """Stop this witness cleanly and start it again on the same address and state."""
        port = self.url.rsplit(":", 1)[1]
        assert await self.stop() == 0
        again = WitnessProcess(self.state, *self.args, "--listen", f"127.0.0.1:{port}")
        await again.start()
        return again

    async def kill9(self) -> None:
        assert self._proc is not None
        self._proc.kill()
        await self._proc.wait()

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum` (SIGKILL after 15 s); the exit code. Safe when already stopped."""
        proc = self._proc
        assert proc is not None
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signum)
                with trio.move_on_after(15):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
            return await proc.wait()


async def cozy_witness(*args: str) -> tuple[int, str, str]:
    with trio.fail_after(60):
        done = await trio.run_process(
            [*COZY, "witness", *args],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def init_witness(tmp_path: Path, name: str = WITNESS_NAME) -> tuple[Path, NoteVerifier]:
    state = tmp_path / "witness-state"
    code, out, err = await cozy_witness("init", "--state", str(state), "--name", name)
    assert code == 0, err
    return state, NoteVerifier.from_vkey(out.strip())


@asynccontextmanager
async def serving_witness(
    tmp_path: Path, log_vkey: str
) -> AsyncIterator[tuple[WitnessProcess, NoteVerifier]]:
    """A fresh witness state served for one log key; stopped on the way out."""
    state, w = await init_witness(tmp_path)
    witness = WitnessProcess(state, "--log", log_vkey)
    await witness.start()
    try:
        yield witness, w
    finally:
        await witness.stop()


def assert_cosigned(note: bytes, sigs: tuple[object, ...], log: Log, w: NoteVerifier) -> int:
    """Verify the witness's lines over the log's note as a client would; the cosigned size."""
    verified = open_checkpoint(add_signatures(note, sigs), log.verifier, witnesses=[w], quorum=1)  # type: ignore[arg-type]
    assert set(verified.cosigned_at) == {w.name}
    return verified.checkpoint.size


async def raw_post(
    url: str, body: bytes, *, method: str = "POST", path: str = "/add-checkpoint"
) -> tuple[int, bytes]:
    """One HTTP/1.1 request written by hand (what a hostile client sends), and its answer."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode()
        await stream.send_all(head + body)
        data = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some(65536):
                data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


# --- An honest log -------------------------------------------------------------------------------


async def test_a_witness_cosigns_a_growing_log_and_every_cosignature_verifies(
    tmp_path: Path,
) -> None:
    state, w = await init_witness(tmp_path)
    log = Log()
    witness = WitnessProcess(state, "--log", log.verifier.vkey())
    await witness.start()
    try:
        assert witness.vkey == w.vkey()
        old = 0
        for grow in (1, 2, 5, 0, 13, 1):  # 0: the same checkpoint again is cosigned again
            log.grow(grow)
            request = log.request(old)
            sigs = await submit_checkpoint(witness.url, request, witness=w)
            assert assert_cosigned(request.checkpoint, sigs, log, w) == len(log.leaves)
            old = len(log.leaves)
        # A log that lost track asks with old 0 and learns the witness's size from the 409.
        with pytest.raises(WitnessConflict) as conflict:
            await submit_checkpoint(witness.url, log.request(0), witness=w)
        assert conflict.value.size == 22
    finally:
        assert await witness.stop() == 0
    code, out, _ = await cozy_witness("status", "--state", str(state))
    assert code == 0
    assert f"{ORIGIN} size=22" in out
    assert w.vkey() in out
    assert "FORK" not in out  # an honest log's lost-track 409 is not evidence of anything


async def test_concurrent_submissions_never_roll_the_witness_back(tmp_path: Path) -> None:
    """tlog-witness's race: requests for sizes N and N+K checked at once must not both store.
    Twenty sizes sent at once, each with old 0: exactly one is cosigned, and it is what stays."""
    state, w = await init_witness(tmp_path)
    log = Log()
    log.grow(20)
    witness = WitnessProcess(state, "--log", log.verifier.vkey())
    await witness.start()
    won: list[int] = []
    lost: list[int] = []

    async def submit(size: int) -> None:
        try:
            await submit_checkpoint(witness.url, log.request(0, size), witness=w)
            won.append(size)
        except WitnessConflict as exc:
            lost.append(exc.size)

    try:
        async with trio.open_nursery() as nursery:
            for size in range(1, 21):
                nursery.start_soon(submit, size)
        assert len(won) == 1
        assert set(lost) == {won[0]}
        # and the stored size is the one cosigned: the next step from it is accepted
        log.grow(1)
        await submit_checkpoint(witness.url, log.request(won[0]), witness=w)
    finally:
        await witness.stop()


# --- A lying log ---------------------------------------------------------------------------------


@pytest.mark.objective("SO-4")
async def test_a_forked_checkpoint_is_refused_and_never_cosigned(tmp_path: Path) -> None:
    honest = Log()
    honest.grow(5)
    async with serving_witness(tmp_path, honest.verifier.vkey()) as (witness, w):
        await submit_checkpoint(witness.url, honest.request(0), witness=w)
        # The relay shows someone else another history, signed with its real key.
        other = Log()
        other.grow(4)
        other = other.fork(b"split")  # 5 leaves, the last one different
        # Same size, another root: 409 with the witness's size (and no cosignature).
        status, body = await raw_post(witness.url, other.request(5).encode())
        assert (status, body) == (409, b"5\n")
        with pytest.raises(WitnessConflict) as conflict:
            await submit_checkpoint(witness.url, other.request(5), witness=w)
        assert conflict.value.size == 5
        # Growing the fork and claiming it extends what was cosigned: the proof cannot verify.
        other.grow(3)
        status, body = await raw_post(witness.url, other.request(5).encode())
        assert status == 422
        assert "\u2014" not in body.decode()
        with pytest.raises(WitnessProofRejected):
            await submit_checkpoint(witness.url, other.request(5), witness=w)
        # A proof lifted from the honest log does not help the fork either.
        honest.grow(3)
        forged = AddCheckpointRequest(5, honest.request(5).proof, other.note())
        with pytest.raises(WitnessProofRejected):
            await submit_checkpoint(witness.url, forged, witness=w)
        # Trying from scratch (old 0) is a 409: the witness remembers.
        with pytest.raises(WitnessConflict):
            await submit_checkpoint(witness.url, other.request(0), witness=w)
        # The honest branch carries on.
        sigs = await submit_checkpoint(witness.url, honest.request(5), witness=w)
        assert assert_cosigned(honest.note(), sigs, honest, w) == 8
    code, out, _ = await cozy_witness("status", "--state", str(witness.state))
    assert f"{ORIGIN} size=8 root={merkle_b64(honest.leaves)}" in out
    # The fork the log signed is kept as evidence beside what was cosigned: two log-signed
    # checkpoints of size 5 with different roots, and the one whose proof failed.
    assert code == 3
    assert f"FORK {ORIGIN} size=5 root={merkle_b64(other.leaves[:5])} refused=409" in out
    assert f"FORK {ORIGIN} size=8 root={merkle_b64(other.leaves)} refused=422" in out
    assert out.count("FORK ") == 2
    db = sqlite3.connect(witness.state / "state.sqlite")
    try:
        rows = db.execute("SELECT size, note FROM evidence ORDER BY size").fetchall()
    finally:
        db.close()
    assert open_checkpoint(rows[0][1], honest.verifier).checkpoint == Checkpoint(
        ORIGIN, 5, merkle.tree_root(other.leaves[:5])
    )


def merkle_b64(leaves: list[bytes]) -> str:
    return b64encode(merkle.tree_root(leaves))


@pytest.mark.objective("SO-4")
async def test_a_witness_killed_right_after_cosigning_still_refuses_the_fork_on_restart(
    tmp_path: Path,
) -> None:
    """kill -9 the moment the 200 arrives: the record was committed before the answer, so the
    restarted witness still refuses a fork of what it cosigned, and an older checkpoint."""
    state, w = await init_witness(tmp_path)
    honest = Log()
    honest.grow(7)
    witness = WitnessProcess(state, "--log", honest.verifier.vkey())
    await witness.start()
    try:
        await submit_checkpoint(witness.url, honest.request(0, 3), witness=w)
        await submit_checkpoint(witness.url, honest.request(3, 7), witness=w)
        await witness.kill9()
        await witness.start()
        fork = Log()
        fork.grow(6)
        fork = fork.fork(b"split")
        with pytest.raises(WitnessConflict) as conflict:
            await submit_checkpoint(witness.url, fork.request(0), witness=w)
        assert conflict.value.size == 7
        with pytest.raises(WitnessConflict):  # same size, another root
            await submit_checkpoint(witness.url, fork.request(7), witness=w)
        with pytest.raises(WitnessConflict):  # rolled back to what it cosigned before
            await submit_checkpoint(witness.url, honest.request(0, 3), witness=w)
        honest.grow(1)
        await submit_checkpoint(witness.url, honest.request(7), witness=w)
    finally:
        await witness.stop()


@pytest.mark.objective("SO-4")
async def test_serve_refuses_to_start_without_its_initialised_state(tmp_path: Path) -> None:
    """A witness that forgot what it cosigned would cosign a fork: it must not start blank."""
    log_key = Log().verifier.vkey()

    async def serve(state: Path) -> tuple[int, str]:
        code, out, err = await cozy_witness(
            "serve", "--state", str(state), "--log", log_key, "--listen", "127.0.0.1:0"
        )
        assert "Traceback" not in err
        assert out == ""
        return code, err

    code, err = await serve(tmp_path / "missing")
    assert code == 1
    assert "cozy witness init" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, err = await serve(tmp_path / "empty")
    assert (code, "cozy witness init" in err) == (1, True)
    assert not list((tmp_path / "empty").iterdir())  # nothing was created

    state, _ = await init_witness(tmp_path)
    (state / "state.sqlite").unlink()
    for extra in ("state.sqlite-wal", "state.sqlite-shm"):
        (state / extra).unlink(missing_ok=True)
    code, err = await serve(state)
    assert code == 1
    assert "missing" in err
    assert len(err.strip().splitlines()) == 1
    assert not (state / "state.sqlite").exists()

    # init never overwrites a witness (its key and record are the witness)
    code, _, err = await cozy_witness("init", "--state", str(state), "--name", "again")
    assert code == 1
    assert "never overwritten" in err
    # an init that died between the database and the key says how to start over
    half = tmp_path / "half"
    half.mkdir()
    (half / "state.sqlite").write_bytes(b"")
    code, _, err = await cozy_witness("init", "--state", str(half), "--name", "again")
    assert (code, "did not finish" in err) == (1, True)
    code, err = await serve(half)
    assert (code, "holds no witness key" in err) == (1, True)


async def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    state, _ = await init_witness(tmp_path)
    assert (state / "witness.key").stat().st_mode & 0o777 == 0o600
    assert (state.stat().st_mode & 0o777) == 0o700
    os.chmod(state / "witness.key", 0o644)
    code, _, err = await cozy_witness(
        "serve", "--state", str(state), "--log", Log().verifier.vkey()
    )
    assert code == 1
    assert "chmod 600" in err
    assert len(err.strip().splitlines()) == 1


async def test_serve_needs_a_log_and_a_usable_listen_address(tmp_path: Path) -> None:
    state, _ = await init_witness(tmp_path)
    code, _, err = await cozy_witness("serve", "--state", str(state))
    assert code == 1
    assert "no log configured" in err
    code, _, err = await cozy_witness("serve", "--state", str(state), "--log", "not-a-key")
    assert (code, "verifier key" in err) == (1, True)
    code, _, err = await cozy_witness(
        "serve", "--state", str(state), "--log", Log().verifier.vkey(), "--listen", "nope"
    )
    assert (code, "HOST:PORT" in err) == (1, True)
    # a witness key is not a log key
    code, _, err = await cozy_witness(
        "serve", "--state", str(state), "--log", (state / "witness.vkey").read_text().strip()
    )
    assert (code, "type 0x04" in err) == (1, True)


@pytest.mark.objective("SO-4")
async def test_unknown_logs_and_untrusted_keys_are_refused(tmp_path: Path) -> None:
    log = Log()
    log.grow(3)
    async with serving_witness(tmp_path, log.verifier.vkey()) as (witness, w):
        stranger = Log(f"{RELAY}/collab/0ther", bytes(range(32)))
        stranger.grow(3)
        with pytest.raises(WitnessUnknownLog):
            await submit_checkpoint(witness.url, stranger.request(0), witness=w)
        assert (await raw_post(witness.url, stranger.request(0).encode()))[0] == 404
        # The right origin, signed by a key the witness was not given.
        impostor = Log(ORIGIN, bytes(range(1, 33)))
        impostor.grow(3)
        with pytest.raises(WitnessUntrustedSignature):
            await submit_checkpoint(witness.url, impostor.request(0), witness=w)
        assert (await raw_post(witness.url, impostor.request(0).encode()))[0] == 403
        # Nothing was recorded: the real log's first checkpoint is still taken from size 0.
        await submit_checkpoint(witness.url, log.request(0), witness=w)


@pytest.mark.objective("SO-4")
async def test_junk_gets_a_4xx_and_the_witness_keeps_serving(tmp_path: Path) -> None:
    log = Log()
    log.grow(2)
    async with serving_witness(tmp_path, log.verifier.vkey()) as (witness, w):
        good = log.request(0).encode()
        for junk in (
            b"",
            b"\xff\xfe\x00junk",
            b"old 1\n\n",
            b"old -1\n\n" + log.note(),
            b"old 01\n\n" + log.note(),
            b"old 0\nnot base64!\n\n" + log.note(),
            b"old 0\n\n" + log.note()[:-5],
            b"old 3\n\n" + log.note(),  # old size above the checkpoint's
            good.replace(b"\n\n", b"\n\n\x07", 1),
        ):
            status, body = await raw_post(witness.url, junk)
            assert status == 400, (junk, status, body)
            assert "\u2014" not in body.decode("utf-8", "replace")
        with pytest.raises(WitnessBadRequest):
            await submit_checkpoint(witness.url, AddCheckpointRequest(0, (), b"no note"))
        status, _ = await raw_post(witness.url, b"x" * (64 * 1024 + 1))
        assert status == 413
        assert (await raw_post(witness.url, b"", method="GET"))[0] == 405
        assert (await raw_post(witness.url, good, path="/other"))[0] == 404
        # Not HTTP at all.
        host, port = witness.url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(b"\x16\x03\x01 hello\r\n\r\n")
            with trio.fail_after(30):
                answer = await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 400")
        sigs = await submit_checkpoint(witness.url, log.request(0), witness=w)
        assert assert_cosigned(log.note(), sigs, log, w) == 2


# --- Configuration and lifecycle -----------------------------------------------------------------


async def test_a_relay_prefix_and_a_config_file_name_the_accepted_logs(tmp_path: Path) -> None:
    """One key for every collab of a relay (ADR-0020: key name = origin = RELAY/collab/ID)."""
    state, w = await init_witness(tmp_path)
    relay_key = NoteSigner(RELAY, bytes(range(32))).verifier
    other = Log("other.example/log", bytes(range(7, 39)))
    config = tmp_path / "witness.toml"
    config.write_text(f'[[log]]\nvkey = "{other.verifier.vkey()}"\n')
    witness = WitnessProcess(
        state, "--log-prefix", f"{RELAY}/collab/", relay_key.vkey(), "--config", str(config)
    )
    await witness.start()
    try:
        for collab in ("c0ffee01", "c0ffee02"):
            log = Log(f"{RELAY}/collab/{collab}", bytes(range(32)))
            log.grow(2)
            sigs = await submit_checkpoint(witness.url, log.request(0), witness=w)
            assert assert_cosigned(log.note(), sigs, log, w) == 2
        other.grow(1)
        await submit_checkpoint(witness.url, other.request(0), witness=w)
        outside = Log(f"{RELAY}/elsewhere", bytes(range(32)))
        outside.grow(1)
        with pytest.raises(WitnessUnknownLog):
            await submit_checkpoint(witness.url, outside.request(0), witness=w)
    finally:
        await witness.stop()
    db = sqlite3.connect(state / "state.sqlite")
    try:
        origins = {o for (o,) in db.execute("SELECT origin FROM cosigned")}
    finally:
        db.close()
    assert origins == {f"{RELAY}/collab/c0ffee01", f"{RELAY}/collab/c0ffee02", "other.example/log"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_witness_quietly(tmp_path: Path, signum: int) -> None:
    state, _ = await init_witness(tmp_path)
    witness = WitnessProcess(state, "--log", Log().verifier.vkey())
    await witness.start()
    assert await witness.stop(signum) == 0
    logged = witness.log_path.read_text()
    assert "witness stopped" in logged
    assert "Traceback" not in logged


async def test_the_witness_service_cosigns_what_an_independent_c2sp_log_sent(
    tmp_path: Path,
) -> None:
    """Requests recorded from aics-tlog / aics-witness (tests/data/tlog_vectors.json, an
    independent Python implementation of the C2SP specs), posted byte for byte to the real
    service configured with their log key: cosigned, and the cosignatures verify."""
    vectors = json.loads((Path(__file__).parent / "data" / "tlog_vectors.json").read_text())
    their_log = NoteVerifier.from_vkey(vectors["log_vkey"])
    async with serving_witness(tmp_path, vectors["log_vkey"]) as (witness, w):
        for body in (
            b"old 0\n\n" + vectors["checkpoints"]["13"].encode(),
            vectors["their_request_13_21"].encode(),
        ):
            status, reply = await raw_post(witness.url, body)
            assert status == 200, reply
            note = body.partition(b"\n\n")[2]
            sigs = parse_cosignature_reply(reply)
            opened = open_checkpoint(add_signatures(note, sigs), their_log, witnesses=[w], quorum=1)
            assert set(opened.cosigned_at) == {w.name}
        assert opened.checkpoint.size == 21


async def test_keep_alive_serves_several_requests_and_idle_connections_are_bounded(
    tmp_path: Path,
) -> None:
    state, w = await init_witness(tmp_path)
    log = Log()
    witness = WitnessProcess(state, "--log", log.verifier.vkey())
    await witness.start()
    host, port = witness.url.removeprefix("http://").split(":")
    try:
        # tlog-witness recommends keep-alive: three steps of a log on one connection.
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            old = 0
            for grow in (2, 3, 4):
                log.grow(grow)
                body = log.request(old).encode()
                head = h11.Request(
                    method="POST",
                    target="/add-checkpoint",
                    headers=[("host", host), ("content-length", str(len(body)))],
                )
                await stream.send_all(
                    conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
                )
                status, reply = 0, b""
                with trio.fail_after(30):
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(event, h11.Response):
                            status = event.status_code
                        elif isinstance(event, h11.Data):
                            reply += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            break
                assert status == 200
                sigs = parse_cosignature_reply(reply)
                assert assert_cosigned(log.note(), sigs, log, w) == len(log.leaves)
                old = len(log.leaves)
                conn.start_next_cycle()
        # Idle connections beyond the bound are closed unanswered; the others are not starved.
        idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(64)]
        try:
            await trio.sleep(0.5)  # let the witness accept all of them
            extra = await trio.open_tcp_stream(host, int(port))
            async with extra:
                await extra.send_all(b"POST /add-checkpoint HTTP/1.1\r\nhost: x\r\n\r\n")
                with trio.fail_after(30):
                    try:
                        answer = await extra.receive_some(4096)
                    except trio.BrokenResourceError:
                        answer = b""  # closed with a reset: unanswered all the same
                assert answer == b""
        finally:
            for s in idle:
                await s.aclose()
        await trio.sleep(0.5)
        log.grow(1)
        await submit_checkpoint(witness.url, log.request(old), witness=w)
    finally:
        await witness.stop()


async def test_one_witness_per_state_and_a_taken_address_is_one_line(tmp_path: Path) -> None:
    state, _ = await init_witness(tmp_path)
    log_key = Log().verifier.vkey()
    witness = WitnessProcess(state, "--log", log_key)
    await witness.start()
    try:
        code, out, err = await cozy_witness("serve", "--state", str(state), "--log", log_key)
        assert (code, out) == (1, "")
        assert "another `cozy witness serve` is using" in err
        assert len(err.strip().splitlines()) == 1
        code, out, _ = await cozy_witness("status", "--state", str(state))  # reads alongside
        assert (code, "nothing cosigned yet" in out) == (0, True)
        other_state = tmp_path / "other"
        other_state.mkdir()
        other, _ = await init_witness(other_state)
        taken = witness.url.removeprefix("http://")
        code, _, err = await cozy_witness(
            "serve", "--state", str(other), "--log", log_key, "--listen", taken
        )
        assert code == 1
        assert "already in use" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        await witness.stop()


async def test_submit_checkpoint_types_what_a_broken_or_hostile_witness_answers(
    tmp_path: Path,
) -> None:
    """The log's side: every answer but a valid cosignature is a typed error, never a crash."""
    log = Log()
    log.grow(2)
    request = log.request(0)
    impostor = NoteSigner(WITNESS_NAME, bytes(range(9, 41)), ALG_COSIGNATURE_V1)
    them = NoteSigner(WITNESS_NAME, bytes(range(2, 34)), ALG_COSIGNATURE_V1).verifier
    forged = cosign_checkpoint(Checkpoint(ORIGIN, 2, merkle.tree_root(log.leaves)), impostor, 1)

    answers = [
        (b"200 OK", b"text/plain", b"not a signature line\n", WitnessReplyInvalid),
        (b"200 OK", b"text/plain", forged.line().encode(), WitnessReplyInvalid),
        (b"409 Conflict", b"text/x.tlog.size", b"twelve\n", WitnessUnavailable),
        (b"500 Internal Server Error", b"text/plain", b"\x1b[31mboom\n", WitnessUnavailable),
        (b"418 I'm a teapot", b"text/plain", b"", WitnessUnavailable),
    ]

    async def fake_witness(stream: trio.SocketStream) -> None:
        status, ctype, body, _ = answers[0]
        with trio.move_on_after(5):
            await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 "
            + status
            + b"\r\ncontent-type: "
            + ctype
            + b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, fake_witness, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        while answers:
            expected = answers[0][3]
            with pytest.raises(expected) as caught:
                await submit_checkpoint(f"http://127.0.0.1:{port}", request, witness=them)
            assert "\x1b" not in str(caught.value)
            answers.pop(0)
        nursery.cancel_scope.cancel()
    with pytest.raises(WitnessUnavailable):  # nothing listens there any more
        await submit_checkpoint(f"http://127.0.0.1:{port}", request, witness=them)
    with pytest.raises(ValueError):
        await submit_checkpoint("ws://127.0.0.1:1", request)
