"""SO-1, the relay learns metadata only: a whole collab's life through a wire tap, then every
frame, every ledger row and the relay's log searched and walked field by field.

People sign up (with sealed keystores), one creates a collab and names it, adds members with
roles, members post (one batch of two), exchange DMs, attach a file that another member fetches,
a human creates an agent with capabilities that reads and posts, a member is removed (the key
rotates), the key is rotated again, the agent is revoked and removed, and a new device restores
a keystore, changes its passphrase and rotates the account keys. Every piece of content carries its own canary.

Then three kinds of assertion:

(a) No canary — and no key that opens content — appears anywhere on the wire (both directions,
    every connection, client frames unmasked), in any ledger row, or in the relay's log, in raw,
    hex, URL/JSON-escaped or base64 form at any offset (`tests.helpers.leak_forms`).
(b) Structure: every WebSocket message is decoded with the protocol's own decoders (batches
    unpacked) and every field of every frame, event body, proof and sealed keystore is checked
    against `FIELDS`, a classification of each field as routing metadata, opaque, proof,
    credential, relay-written or broker. Plaintext fields must have the shape of what they are
    (an id looks like an id, a kind is a known kind, a handle is a known handle); opaque fields
    must *be* ciphertext: each opens with a key the members hold (the collab key of its epoch,
    the DM pair's box, a wrap's recipient key, the keystore's passphrase, the file key from the
    encrypted attachment). Every column of every table is classified the same way
    (`COLUMNS`). A frame field or column that nobody classified fails the test, so a new field
    or a migration forces the decision.
(c) The test can fail: recipients really decrypted every canary; the walker, holding the
    members' keys, found every canary inside the ciphertexts it opened; the tap saw exactly the
    connections the scenario made; and a probe connection that sends a canary in a routing
    field and as fake ciphertext is caught by both the search and the walker.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import msgspec.inspect as mi
import nacl.public
import nacl.signing
import pytest
import trio
import trio_websocket

from clientkit import ConnectionLost, RelayRefused, _collab, connect
from model import artifacts, dm, keystore, recovery, wire
from model import content as contentmod
from model._crypto import random_bytes
from model.envelope import EventBody, seal_event, sign_body
from model.ids import new_id
from model.membership import Member, MemberKind, Role, SetWitnesses
from tests.helpers import find_leaks
from tests.metadata_walker import (
    FIELDS,
    OPAQUE,
    Check,
    Keyring,
    Walker,
    class_of,
    column_problems,
    dump_ledger,
    reachable_structs,
    reads_as_text,
    walk_capture,
)
from tests.relay_harness import relay_config, running_relay
from tests.wire_tap import Direction, Tap

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

    from clientkit import Client


# --- the scenario -----------------------------------------------------------------------------


def canary(label: str, words: str) -> str:
    return f"CANARY-{label}-{secrets.token_hex(4)} {words}"


def tag_of(text: str) -> str:
    return text.split(" ", 1)[0]


@dataclass
class Person:
    handle: str
    sign: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)
    box: nacl.public.PrivateKey = field(default_factory=nacl.public.PrivateKey.generate)
    password: str = field(default_factory=lambda: f"login password {secrets.token_hex(6)}")
    passphrase: str = field(default_factory=lambda: f"an encryption passphrase {secrets.token_hex(8)}")  # fmt: skip
    account_id: str = ""
    token: str = ""
    recovery_code: str = ""
    past: list[tuple[nacl.signing.SigningKey, nacl.public.PrivateKey]] = field(default_factory=list)

    @property
    def past_boxes(self) -> list[nacl.public.PrivateKey]:
        return [box for _, box in self.past]

    @property
    def sign_pk(self) -> bytes:
        return bytes(self.sign.verify_key)

    @property
    def box_pk(self) -> bytes:
        return bytes(self.box.public_key)


def now_ms() -> int:
    return int(time.time() * 1000)


class Scenario:
    """Drives in-process clients through one relay URL (the tap), counting connections."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialled = 0

    @asynccontextmanager
    async def dial(self) -> AsyncIterator[Client]:
        self.dialled += 1
        async with connect(self.url) as client:
            yield client

    @asynccontextmanager
    async def session(self, who: Person) -> AsyncIterator[Client]:
        async with self.dial() as client:
            await client.authenticate(who.token)
            client.use_key(who.sign)
            yield client

    async def sign_up(self, handle: str) -> Person:
        """A person signs up with a sealed keystore (the fast test-only Argon2id profile)."""
        who = Person(handle)
        who.recovery_code = recovery.new_recovery_code()
        secret = keystore.KeystoreContent(sign_seed=bytes(who.sign), box_sk=bytes(who.box))
        sealed, _ = await trio.to_thread.run_sync(
            partial(
                keystore.seal_new,
                secret,
                who.passphrase,
                keystore.KdfProfile.INSECURE_TEST,
                recovery_key=recovery.recovery_key(recovery.parse_code(who.recovery_code)),
            )
        )
        async with self.dial() as client:
            who.account_id = await client.signup(
                handle, who.password, who.sign, who.box_pk, sealed_keystore=keystore.encode_sealed(sealed)
            )  # fmt: skip
            who.token = (await client.login(handle, who.password)).token
        return who


async def post(
    client: Client, who: Person, cid: str, content: contentmod.Content, refs: tuple[str, ...] = ()
) -> int:
    """Post as a member: read (verify) the collab, seal under its current epoch with evidence."""
    view = await client.read(cid, who.box)
    epoch, key = view.current_key()
    ts = now_ms()
    ack = await client.post(
        signing_key=who.sign, collab_key=key, epoch=epoch, collab_id=cid, content=content,
        ts=ts, refs=refs, evidence=view.evidence("main", ts),
    )  # fmt: skip
    return ack.seq


async def send_dm(client: Client, sender: Person, to: Person, cid: str, text: str) -> int:
    view = await client.read(cid, sender.box)
    assert view.membership is not None
    pinned = view.membership.members[to.account_id]  # the key this fold pinned, not the relay's
    signed = dm.seal_dm(
        signing_key=sender.sign, sender_box_key=sender.box, recipient_box_pk=pinned.box_pk,
        collab_id=cid, sender_id=sender.account_id, recipient_id=to.account_id, ts=now_ms(),
        epoch=view.membership.epoch,
        content=contentmod.encode_content(contentmod.Message(text)),
    )  # fmt: skip
    return (await client.append(signed)).seq


async def readable(client: Client, who: Person, cid: str) -> dict[int, contentmod.Content]:
    """What this member's client verified and decrypted, seq → content (two passes, so a
    member added mid-epoch reads that epoch's earlier events too)."""
    keys = (await client.read(cid, who.box, past_box_keys=who.past_boxes)).known_keys()
    out: dict[int, contentmod.Content] = {}
    async with client.history(cid, who.box, keys=keys, past_box_keys=who.past_boxes) as events:
        async for entry in events:
            if entry.content is not None:
                out[entry.seq] = entry.content
    return out


def texts_of(contents: Mapping[int, contentmod.Content]) -> set[str]:
    out: set[str] = set()
    for c in contents.values():
        match c:
            case contentmod.Message(text=t) | contentmod.CollabMeta(name=t):
                out.add(t)
            case contentmod.Attachment(name=n):
                out.add(n)
    return out


@dataclass
class Outcome:
    """What the scenario produced: who read what, and every key the members hold."""

    canaries: dict[str, str]
    file_bytes: bytes
    keys: Keyring
    read_by: dict[str, set[str]]  # reader → texts decrypted
    fetched: bytes  # the artifact as another member downloaded and opened it
    collab_id: str
    carol_refused: wire.ErrorCode
    agent_cut_off: bool
    ended_for_carol: bool
    secret_keys: dict[str, bytes]
    alice: Person


async def run_scenario(s: Scenario) -> Outcome:
    cn = {
        "collab name": canary("name", "Project Nightingale acquisition"),
        "alice message": canary("a1", "the quarterly numbers are down"),
        "batched message 1": canary("a2", "layoffs are planned for march"),
        "batched message 2": canary("a3", "do not tell the press"),
        "bob message": canary("b1", "the auditor found the hole"),
        "dm alice to bob": canary("dma", "meet me at the docks"),
        "dm bob to alice": canary("dmb", "bring the ledger"),
        "file name": canary("fname", "board-minutes.pdf"),
        "file bytes": canary("fbytes", "strictly confidential minutes"),
        "agent message 1": canary("bot1", "summary of the thread"),
        "after removal": canary("rm", "carol must not read this"),
        "agent message 2": canary("bot2", "second summary after rotation"),
        "after revocation": canary("rv", "the bot must not read this"),
    }
    alice, bob, carol = [await s.sign_up(h) for h in ("alice", "bob", "carol")]
    people = [alice, bob, carol]
    keys = Keyring(handles={"alice", "bob", "carol", "helper-bot"})
    # Three sealed chunks (CHUNK_BYTES each at most) with the canary at the start, in the
    # second chunk and at the end.
    tag = cn["file bytes"].encode()
    filler = random_bytes(150_000)
    file_bytes = tag + filler[:70_000] + tag + filler[70_000:] + tag
    read_by: dict[str, set[str]] = {}
    agent = Person("helper-bot")

    async with s.session(alice) as a:
        keys.relay_pk = a.relay_pk
        cid, _ = await a.create_collab(alice.sign, alice.box_pk)
        await post(a, alice, cid, contentmod.CollabMeta(name=cn["collab name"]))
        for who in (bob, carol):
            info = await a.lookup(who.handle)
            new = Member(info.account_id, Role.MEMBER, MemberKind.HUMAN, info.sign_pk, info.box_pk)
            await a.manage(alice.sign, alice.box, cid, partial(_collab.add, member=new))
        await a.manage(
            alice.sign, alice.box, cid, lambda _v: _collab.change_role(bob.account_id, Role.MANAGER)
        )
        await a.manage(  # a tool grant: capability names are the metadata a `caps` proof shows
            alice.sign,
            alice.box,
            cid,
            lambda v: _collab.set_caps(v, carol.account_id, grant=("tool:weather",)),
        )
        await post(a, alice, cid, contentmod.Message(cn["alice message"]))
        view = await a.read(cid, alice.box)
        epoch, key = view.current_key()
        ts = now_ms()
        batch = [
            seal_event(
                signing_key=alice.sign,
                collab_key=key,
                collab_id=cid,
                actor_id=alice.account_id,
                kind="msg",
                ts=ts,
                epoch=epoch,
                content=contentmod.encode_content(
                    contentmod.Message(cn[name]), view.evidence(device, ts)
                ),
            )
            for name, device in (("batched message 1", "laptop"), ("batched message 2", "phone"))
        ]
        await a.append_many(batch)  # one Batch frame on the wire
        await a.request(wire.Ping, wire.Pong)

        async with s.session(bob) as b:
            await post(b, bob, cid, contentmod.Message(cn["bob message"]))
            async with b.subscribe(cid, follow=True) as frames:  # live, then left: unsubscribed
                async for frame in frames:
                    if isinstance(frame, wire.TreeHead):  # a heartbeat, after `caught_up`
                        break
            await send_dm(a, alice, bob, cid, cn["dm alice to bob"])
            await send_dm(b, bob, alice, cid, cn["dm bob to alice"])
            # Alice attaches a file; Bob fetches it and opens it with the key from the event.
            file_key = random_bytes(32)
            stored = await a.upload_artifact(
                cid, artifacts.seal_stream(file_key, cid, [file_bytes[i : i + 40_000] for i in range(0, len(file_bytes), 40_000)])
            )  # fmt: skip
            attachment = contentmod.Attachment(
                cn["file name"], len(file_bytes), stored.ref, file_key
            )
            await post(a, alice, cid, attachment, refs=(stored.ref,))
            seen = await readable(b, bob, cid)
            found = [c for c in seen.values() if isinstance(c, contentmod.Attachment)]
            assert [f.ref for f in found] == [stored.ref]
            async with b.download_artifact(cid, stored.ref) as pieces:
                got = [p async for p in pieces]
            fetched = b"".join(
                artifacts.open_stream(found[0].key, cid, artifacts.check_ref(stored.ref, got))
            )

        # Alice creates an agent that may read and post; it reads the collab and posts.
        agent.account_id = new_id("a")
        created = await a.create_agent(agent.account_id, agent.handle, agent.sign_pk, agent.box_pk)
        agent.token = created.token
        bot_member = Member(agent.account_id, Role.MEMBER, MemberKind.AGENT, agent.sign_pk,
                            agent.box_pk, ("read", "post"))  # fmt: skip
        await a.manage(alice.sign, alice.box, cid, lambda v: _collab.add(v, bot_member))
        async with s.session(agent) as bot:
            read_by["agent (before)"] = texts_of(await readable(bot, agent, cid))
            await post(bot, agent, cid, contentmod.Message(cn["agent message 1"]))

            # Carol reads (DMs reach her only as `withheld` links), follows live, and is
            # removed: the relay ends her stream and refuses her from then on.
            async with s.session(carol) as c:
                read_by["carol"] = texts_of(await readable(c, carol, cid))
                ended = False
                async with c.subscribe(cid, follow=True) as frames:
                    async for frame in frames:
                        if isinstance(frame, wire.CaughtUp):
                            break
                    await a.manage(
                        alice.sign, alice.box, cid, lambda v: _collab.remove(v, carol.account_id)
                    )
                    async for frame in frames:
                        if isinstance(frame, wire.SubscriptionEnded):
                            ended = True
                            break
                with pytest.raises(RelayRefused) as refused:
                    await c.read(cid, carol.box)
            await post(a, alice, cid, contentmod.Message(cn["after removal"]))
            await a.manage(alice.sign, alice.box, cid, _collab.rotate)
            await post(bot, agent, cid, contentmod.Message(cn["agent message 2"]))
            read_by["agent"] = texts_of(await readable(bot, agent, cid))
            # Revoked while connected: its connection is closed at once; then removed.
            await a.revoke_agent(agent.account_id)
            assert [x.revoked for x in await a.list_agents()] == [True]
            agent_cut_off = False
            try:
                with trio.fail_after(10):
                    await bot.read(cid, agent.box)
            except (ConnectionLost, trio_websocket.ConnectionClosed):
                agent_cut_off = True
        await a.manage(alice.sign, alice.box, cid, lambda v: _collab.remove(v, agent.account_id))
        await post(a, alice, cid, contentmod.Message(cn["after revocation"]))
        final = await a.read(cid, alice.box)
        read_by["alice"] = texts_of(await readable(a, alice, cid))

    # Bob's new device: a wrong guess first, then restore and change the passphrase.
    bob_old_passphrase = bob.passphrase
    async with s.dial() as phone:
        with pytest.raises(RelayRefused):
            await phone.login(bob.handle, "a wrong guess at the password")
        await phone.login(bob.handle, bob.password)
        stored_ks = await phone.fetch_keystore()
        sealed = keystore.decode_sealed(stored_ks.blob)
        ks_key = keystore.unwrap_key(sealed, bob.passphrase)
        assert keystore.open_content(sealed, ks_key).sign_seed == bytes(bob.sign)
        bob.passphrase = f"a new encryption passphrase {secrets.token_hex(8)}"
        rewrapped = keystore.rewrap_passphrase(
            sealed, ks_key, bob.passphrase, keystore.KdfProfile.INSECURE_TEST
        )
        await phone.store_keystore(
            bob.sign, stored_ks.version + 1, keystore.encode_sealed(rewrapped)
        )
        # …and rotates his account keys (ADR-0017): directory first, then the collab.
        new_sign, new_box = nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate()
        rotated = keystore.KeystoreContent(
            sign_seed=bytes(new_sign),
            box_sk=bytes(new_box),
            retired=[keystore.RetiredKeys(bob.sign_pk, bytes(bob.box))],
            rotating_from=bytes(bob.sign),
        )
        bob.recovery_code = recovery.new_recovery_code()
        resealed, _ = keystore.seal_new(
            rotated, bob.passphrase, keystore.KdfProfile.INSECURE_TEST,
            recovery_key=recovery.recovery_key(recovery.parse_code(bob.recovery_code)),
        )  # fmt: skip
        await phone.rotate_account_keys(
            bob.sign, bob.box_pk, new_sign, bytes(new_box.public_key), stored_ks.version + 2,
            keystore.encode_sealed(resealed),
        )  # fmt: skip
        assert await phone.collabs() == [cid]
        await phone.manage(
            bob.sign, new_box, cid,
            lambda v: _collab.rekey(v, new_sign, bytes(new_box.public_key)),
            past_box_keys=[bob.box],
        )  # fmt: skip
        bob.past.append((bob.sign, bob.box))
        bob.sign, bob.box = new_sign, new_box
        read_by["bob"] = texts_of(await readable(phone, bob, cid))
        final = await phone.read(cid, bob.box, past_box_keys=bob.past_boxes)
        # Then a new login password and the end of every session: signed with the account key.
        phone.use_key(bob.sign)
        bob_old_password, bob.password = bob.password, f"new login password {secrets.token_hex(6)}"
        await phone.change_password(bob.password)
        await phone.end_sessions()

    for who in (*people, agent):
        keys.sign_pk[who.account_id] = who.sign_pk
        keys.box[who.account_id] = who.box
        keys.past_sign_pk[who.account_id] = [bytes(s.verify_key) for s, _ in who.past]
        keys.past_box[who.account_id] = who.past_boxes
        keys.passwords.add(who.password)
    keys.passwords |= {"a wrong guess at the password", bob_old_password}
    keys.passphrases = [p.passphrase for p in people] + [bob_old_passphrase]
    keys.epoch_keys[cid] = final.known_keys()
    assert sorted(keys.epoch_keys[cid]) == [0, 1, 2, 3, 4]  # 4: bob's rekey
    secret_keys = {f"epoch {e} key": k for e, k in keys.epoch_keys[cid].items()}
    secret_keys["file key"] = file_key
    for who in (*people, agent):
        secret_keys[f"{who.handle} signing seed"] = bytes(who.sign)
        secret_keys[f"{who.handle} box key"] = bytes(who.box)
        for n, (old_sign, old_box) in enumerate(who.past):
            secret_keys[f"{who.handle} old signing seed {n}"] = bytes(old_sign)
            secret_keys[f"{who.handle} old box key {n}"] = bytes(old_box)
    for who in people:
        secret_keys[f"{who.handle} passphrase"] = who.passphrase.encode()
        secret_keys[f"{who.handle} recovery secret"] = recovery.parse_code(who.recovery_code)
    secret_keys["bob's old passphrase"] = bob_old_passphrase.encode()
    return Outcome(
        canaries=cn, file_bytes=file_bytes, keys=keys, read_by=read_by, fetched=fetched,
        collab_id=cid, carol_refused=refused.value.code, agent_cut_off=agent_cut_off,
        ended_for_carol=ended, secret_keys=secret_keys, alice=alice,
    )  # fmt: skip


# --- the tests ------------------------------------------------------------------------------

# Every classified struct occurs in the scenario except the broker's (it needs OpenBao; its
# frames are covered by tests/test_broker.py and SO-9) and the witness policy (it needs running
# witnesses, or every read would refuse its heads: tests/test_witness_quorum.py and SO-4).
EXPECTED_TYPES = set(FIELDS) - {wire.CallTool, wire.ToolResult, SetWitnesses}
EXPECTED_CONNECTIONS = 8  # three sign-ups, Alice, Bob, the agent, Carol, Bob's new device


@pytest.mark.objective("SO-1")
async def test_the_relay_sees_only_classified_metadata_on_the_wire_in_the_ledger_and_logs(
    database_url: str, tmp_path: Path, nursery: trio.Nursery, capfd: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(60):
        # Heartbeats every 20 ms, so the scenario's open subscriptions get `checkpoint` pushes
        # and the walker classifies those too.
        config = replace(relay_config(database_url, tmp_path / "relay"), checkpoint_interval_ms=20)
        async with running_relay(config) as relay:
            upstream = int(relay.url.rsplit(":", 1)[1])
            tap, probe_tap = Tap(upstream), Tap(upstream)
            scenario = Scenario(f"ws://127.0.0.1:{await tap.serve(nursery)}")
            out = await run_scenario(scenario)
            probe, probe_text = await send_probe(
                f"ws://127.0.0.1:{await probe_tap.serve(nursery)}", out
            )
        await tap.wait_idle()
        await probe_tap.wait_idle()
        ledger_rows, columns, ledger_raw = await trio.to_thread.run_sync(dump_ledger, database_url)
    logs = "".join(capfd.readouterr()).encode()
    cn = out.canaries
    planted: dict[str, str | bytes] = {name: text for name, text in cn.items()}
    planted |= {f"{name} (tag)": tag_of(text) for name, text in cn.items()}
    planted |= out.secret_keys

    # (c) Content really travelled: every canary reached a member who is not its author.
    assert out.fetched == out.file_bytes
    alice_read = out.read_by["alice"]
    assert {cn["dm alice to bob"], cn["dm bob to alice"], cn["after revocation"]} <= alice_read
    assert {cn[k] for k in ("collab name", "alice message", "batched message 1", "batched message 2",
            "dm alice to bob", "file name", "agent message 1", "after removal",
            "agent message 2", "after revocation")} <= out.read_by["bob"]  # fmt: skip
    assert {cn["alice message"], cn["bob message"]} <= out.read_by["agent (before)"]
    assert cn["after removal"] in out.read_by["agent"]
    assert cn["alice message"] in out.read_by["carol"]
    assert not {cn["dm alice to bob"], cn["after removal"]} & out.read_by["carol"]
    assert not {cn["dm bob to alice"]} & out.read_by["agent"]
    assert out.ended_for_carol
    assert out.carol_refused is wire.ErrorCode.UNAUTHORIZED
    assert out.agent_cut_off

    # The capture is complete: exactly the connections the scenario made, both directions.
    assert tap.connections == scenario.dialled == EXPECTED_CONNECTIONS
    assert len(tap.recordings) == 2 * EXPECTED_CONNECTIONS
    assert all(len(r.data) > 100 for r in tap.recordings)

    # (a) No canary and no content key anywhere, in any encoding.
    wire_bytes = tap.payloads() + b"".join(bytes(r.data) for r in tap.recordings)
    assert find_leaks(wire_bytes, planted) == [], "plaintext crossed the wire"
    assert len(ledger_raw) > 10_000
    assert find_leaks(ledger_raw, planted) == [], "plaintext is in the ledger"
    assert "relay_listening" in logs.decode()  # the capture holds the relay's log
    assert find_leaks(logs, planted) == [], "plaintext reached the relay's log"

    # (b) Every frame, field by field.
    walker = Walker(out.keys)
    messages, stream_problems = walk_capture(tap, walker)
    walker.open_artifacts()
    assert stream_problems == []
    assert walker.problems == []
    assert messages > 150
    assert set(walker.types_seen) >= EXPECTED_TYPES, EXPECTED_TYPES - set(walker.types_seen)
    # The walker, holding the members' keys, found every canary inside what it opened: the
    # content was on the wire, sealed, in exactly the fields classified as ciphertext.
    opened = b"\n".join(walker.opened)
    assert [n for n, t in cn.items() if n != "file bytes" and t.encode() not in opened] == []
    assert walker.artifacts_opened == [out.file_bytes] * 2  # the upload and the download
    # DM bodies were pushed only to connections of their two participants (others: `withheld`).
    assert len(walker.dm_pushes) >= 4
    assert [p for p in walker.dm_pushes if p[0] not in p[1:]] == []
    assert walker.types_seen[wire.Withheld] > 0

    # Every ledger row, column by column.
    assert column_problems(columns) == []
    db = Walker(out.keys)
    for table, table_rows in ledger_rows.items():
        if table == "uploads":
            # Uploads in progress: nothing of one outlives its connection (issue 13, item 7),
            # and the relay stopped before the dump. Its columns are classified all the same.
            assert table_rows == []
            continue
        assert table_rows, f"table {table} is empty: extend the scenario so it is exercised"
        for row in table_rows:
            db.row(table, row)
    for row in ledger_rows["artifacts"]:
        db.piece_refs[("db", row["upload"])] = (row["collab_id"], row["ref"])
    db.open_artifacts()
    assert db.problems == []
    stored = b"\n".join(db.opened)
    assert [n for n, t in cn.items() if n != "file bytes" and t.encode() not in stored] == []
    assert db.artifacts_opened == [out.file_bytes]

    # (c) The searches and the walker can fail: the probe's plaintext is found by both.
    probe_wire = probe_tap.payloads()
    assert find_leaks(probe_wire, {"probe": probe_text}) == ["probe"]
    masked = b"".join(
        bytes(r.data) for r in probe_tap.recordings if r.direction is Direction.TO_RELAY
    )
    assert find_leaks(masked, {"probe": probe_text}) == []  # found only because the tap unmasks
    probed = Walker(out.keys)
    walk_capture(probe_tap, probed)
    flagged = "\n".join(probed.problems)
    assert "GetAccount.handle: not a known handle" in flagged
    assert "ciphertext: reads as text" in flagged
    assert "ciphertext: does not open as ciphertext under any key the members hold" in flagged
    assert len(probed.problems) == 3
    assert probe is wire.ErrorCode.UNAUTHENTICATED


async def send_probe(url: str, out: Outcome) -> tuple[wire.ErrorCode, str]:
    """A client that leaks on purpose: a canary as a handle and as an event's "ciphertext", and
    random bytes that are sealed under no key as another's (both events properly signed by
    Alice, so only the ciphertext check can object to them)."""
    text = canary("probe", "this must be caught")
    async with connect(url) as client:
        with pytest.raises(RelayRefused):
            await client.request(
                lambda rid: wire.GetAccount(rid=rid, handle=text), wire.AccountInfo
            )
        for fake in (text.encode(), random_bytes(64)):  # plaintext; bytes sealed under no key
            body = EventBody(1, out.collab_id, out.alice.account_id, "msg", now_ms(), (),
                             random_bytes(24), fake)  # fmt: skip
            with pytest.raises(RelayRefused) as refused:
                await client.append(sign_body(out.alice.sign, body))
    return refused.value.code, text


@pytest.mark.objective("SO-1")
def test_every_frame_field_is_classified() -> None:
    """A field added to any frame, event body, proof or keystore (or a new frame type) must be
    classified in FIELDS before anything passes; so must every frame type model/wire defines."""
    reachable = reachable_structs()
    unclassified = {
        f"{cls.__name__}.{name}"
        for cls, fields in reachable.items()
        for name in fields
        if name not in FIELDS.get(cls, {})
    }
    stale = {
        f"{cls.__name__}.{name}"
        for cls, rules in FIELDS.items()
        for name in rules
        if name not in reachable.get(cls, {})
    }
    assert unclassified == set()
    assert stale == set()
    defined = {
        v
        for v in vars(wire).values()
        if isinstance(v, type) and issubclass(v, wire._Frame) and v is not wire._Frame
    }
    assert defined <= set(reachable), "a frame type that is in neither union"
    # Every bytes field is a cryptographic value or opaque: none is classified as plaintext text.
    cryptographic = {
        Check.HASH, Check.SIGNATURE, Check.PUBLIC_KEY, Check.NONCE, Check.SALT, Check.CHALLENGE,
        Check.CHECKPOINT,
    }  # fmt: skip
    for cls, rules in FIELDS.items():
        for name, check in rules.items():
            if isinstance(reachable[cls][name], mi.BytesType):
                assert check in OPAQUE | cryptographic | {Check.BODY}, f"{cls.__name__}.{name}"
    # Of an event the relay reads exactly the routing fields of SO-1 (plus version, epoch and
    # nonce); the seq is the relay's own.
    plain = {n for n, c in FIELDS[EventBody].items() if class_of(EventBody, c) != "opaque"}
    assert plain == {"v", "collab_id", "actor_id", "kind", "ts", "refs", "epoch", "nonce"}
    classes = {class_of(cls, c) for cls, rules in FIELDS.items() for c in rules.values()}
    assert classes == {
        "routing metadata", "opaque", "proof", "credential", "relay-written", "broker", "container"
    }  # fmt: skip


def test_the_leak_search_finds_a_canary_in_every_form() -> None:
    text = canary("self", "check of the search")
    raw = text.encode()
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            buffer = b"\x00\xff" + encode(b"p" * offset + raw + b"q") + b"\x01"
            assert find_leaks(buffer, {"c": text}) == ["c"]
    for form in (raw, raw.hex().encode(), raw.hex().upper().encode(), json.dumps(text).encode()):
        assert find_leaks(b"junk" + form + b"junk", {"c": text}) == ["c"]
    assert find_leaks(random_bytes(4096), {"c": text}) == []
    assert reads_as_text(b"just some words, plainly readable here")
    assert not reads_as_text(random_bytes(64))
