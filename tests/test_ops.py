"""The operations listener: /healthz, /readyz, /metrics (relay/_ops.py), against real relays.

Everything here is real: the relay on loopback with its ops listener on a port of its own, the
test's Postgres made unreachable by refusing connections to its database and terminating its
backends, an OpenBao dev server that is stopped mid-test. HTTP is spoken over raw sockets, so
the tests see exactly the bytes an orchestrator or Prometheus would.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.parse
from typing import TYPE_CHECKING

import psycopg
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import relay._ops as ops
from clientkit import RelayRefused, connect
from model import wire
from relay import _stages
from relay.embedded import embedded_openbao, free_port
from tests.relay_harness import PASSWORD, post, relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from pathlib import Path

    from relay._server import Relay


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


def _address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def _parse(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


async def _read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def raw_exchange(url: str, request: bytes) -> bytes:
    """Send `request` as is and read until the server closes."""
    stream = await trio.open_tcp_stream(*_address(url))
    async with stream:
        await stream.send_all(request)
        return await _read_all(stream)


async def get(url: str, path: str, method: str = "GET") -> Reply:
    request = f"{method} {path} HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n"
    return _parse(await raw_exchange(url, request.encode()))


async def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics as `name{label="v",…}` → value (labels sorted)."""
    reply = await get(url, "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


# --- health and the listener's shape ---------------------------------------------------------


async def test_healthz_readyz_and_everything_else_on_a_port_of_its_own(relay: Relay) -> None:
    with trio.fail_after(20):
        assert relay.ops_url.startswith("http://127.0.0.1:")
        assert _address(relay.ops_url)[1] != _address(relay.url)[1]

        health = await get(relay.ops_url, "/healthz")
        assert (health.status, health.body) == (200, b"ok\n")
        assert health.headers["content-type"] == "text/plain; charset=utf-8"

        ready = await get(relay.ops_url, "/readyz")
        assert ready.status == 200, ready
        assert ready.headers["content-type"] == "application/json"
        # No BAO_ADDR in this config, so no openbao check.
        assert ready.json() == {"status": "ready", "checks": {"relay": "ok", "postgres": "ok"}}

        assert (await get(relay.ops_url, "/nowhere")).status == 404
        assert (await get(relay.ops_url, "/healthz/extra")).status == 404
        refused = await get(relay.ops_url, "/metrics", method="POST")
        assert (refused.status, refused.headers["allow"]) == (405, "GET")
        # A query string does not change the route.
        assert (await get(relay.ops_url, "/healthz?verbose=1")).status == 200

        # The WebSocket origin serves none of this, and the ops port speaks no WebSocket.
        on_ws = _parse(
            await raw_exchange(
                relay.url.replace("ws://", "http://"), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            )
        )
        assert on_ws.status != 200


async def test_bad_requests_get_400_and_oversized_heads_431(relay: Relay) -> None:
    with trio.fail_after(20):
        garbage = _parse(await raw_exchange(relay.ops_url, b"\x16\x03\x01 not http at all\r\n\r\n"))
        assert garbage.status == 400
        with_body = _parse(
            await raw_exchange(
                relay.ops_url,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            )
        )
        assert with_body.status == 400
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (16 * 1024) + b"\r\n\r\n"
        assert _parse(await raw_exchange(relay.ops_url, huge)).status == 431
        # The listener still serves after all that.
        assert (await get(relay.ops_url, "/healthz")).status == 200


async def test_keep_alive_serves_several_requests_on_one_connection(relay: Relay) -> None:
    with trio.fail_after(20):
        one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        last = b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        raw = await raw_exchange(relay.ops_url, one + one + last)
        assert raw.count(b"HTTP/1.1 200 OK\r\n") == 3
        assert raw.endswith(b"\n")


async def test_a_slow_client_is_cut_off_at_the_request_deadline(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "REQUEST_TIMEOUT", 0.5)
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream(*_address(relay.ops_url))
        async with stream:
            started = time.monotonic()
            await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
            # Dribble a header byte at a time, slower than the deadline allows.
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(40):
                    await stream.send_all(b"X")
                    await trio.sleep(0.1)
            assert await _read_all(stream) == b""  # closed unanswered
            assert time.monotonic() - started < 3
        assert (await get(relay.ops_url, "/healthz")).status == 200


async def test_the_ops_listener_can_be_turned_off(database_url: str, tmp_path: Path) -> None:
    config = dataclasses.replace(relay_config(database_url, tmp_path), ops_port=None)
    with trio.fail_after(20):
        async with running_relay(config) as relay:
            assert relay.ops_url == ""
            await sign_up(relay.url)  # the relay itself works without it


# --- readiness ------------------------------------------------------------------------------


def _set_connections(admin_url: str, database_url: str, *, allowed: bool) -> None:
    """Refuse (or allow again) new connections to the test's database; when refusing, also
    terminate every backend connected to it, as a Postgres restart or failover would."""
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                psycopg.sql.Identifier(str(name)), psycopg.sql.SQL("true" if allowed else "false")
            )
        )
        if not allowed:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


async def test_readyz_is_503_naming_postgres_while_it_is_unreachable_then_200_again(
    pg_admin_url: str, database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(90):
        async with running_relay(relay_config(database_url, tmp_path)) as relay:
            assert (await get(relay.ops_url, "/readyz")).status == 200
            _set_connections(pg_admin_url, database_url, allowed=False)
            try:
                started = time.monotonic()
                down = await get(relay.ops_url, "/readyz")
                took = time.monotonic() - started
                assert down.status == 503, down
                body = down.json()
                assert body["status"] == "not_ready"
                assert body["failing"] == ["postgres"]
                checks = body["checks"]
                assert isinstance(checks, dict)
                assert checks["relay"] == "ok"
                assert checks["postgres"] in ("unreachable", "timeout")
                assert took < ops.CHECK_TIMEOUT + 2  # the check's deadline holds
                # Alive all the same: liveness must not depend on the database.
                assert (await get(relay.ops_url, "/healthz")).status == 200
                # Still down on a second look (the pool cannot reconnect yet).
                assert (await get(relay.ops_url, "/readyz")).status == 503
            finally:
                _set_connections(pg_admin_url, database_url, allowed=True)
            # The pool reconnects on its own; readiness follows.
            for _ in range(120):
                ready = await get(relay.ops_url, "/readyz")
                if ready.status == 200:
                    break
                await trio.sleep(0.5)
            assert ready.json()["checks"] == {"relay": "ok", "postgres": "ok"}


async def test_readyz_is_503_naming_openbao_when_it_is_configured_but_down(
    database_url: str, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = dataclasses.replace(relay_config(database_url, tmp_path), bao_addr=closed)
    with trio.fail_after(30):
        async with running_relay(config) as relay:
            down = await get(relay.ops_url, "/readyz")
            assert down.status == 503
            assert down.json() == {
                "status": "not_ready",
                "checks": {"relay": "ok", "postgres": "ok", "openbao": "unreachable"},
                "failing": ["openbao"],
            }


async def test_readyz_follows_a_real_openbao_that_is_stopped(
    database_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            bao_up = trio.Event()
            stop_bao = trio.Event()
            found: list[str] = []

            async def run_bao() -> None:
                async with embedded_openbao() as bao:
                    found.append(bao.addr)
                    bao_up.set()
                    await stop_bao.wait()

            nursery.start_soon(run_bao)
            await bao_up.wait()
            config = dataclasses.replace(relay_config(database_url, tmp_path), bao_addr=found[0])
            async with running_relay(config) as relay:
                up = await get(relay.ops_url, "/readyz")
                assert up.status == 200, up
                assert up.json()["checks"] == {"relay": "ok", "postgres": "ok", "openbao": "ok"}
                stop_bao.set()  # `bao server -dev` is terminated; the relay keeps running
                for _ in range(100):
                    down = await get(relay.ops_url, "/readyz")
                    if down.status != 200:
                        break
                    await trio.sleep(0.2)
                assert down.status == 503
                assert down.json()["failing"] == ["openbao"]


async def test_readyz_is_503_once_shutdown_begins(database_url: str, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_relay(relay_config(database_url, tmp_path)) as relay:
            user = await sign_up(relay.url)
            async with session(relay.url, user):
                # Hold a connection open so shutdown takes a moment (it is closed with 1001).
                relay.request_shutdown()
                during = await get(relay.ops_url, "/readyz")
                assert during.status == 503
                assert during.json() == {
                    "status": "not_ready",
                    "checks": {"relay": "shutting_down"},
                    "failing": ["relay"],
                }
                assert (await get(relay.ops_url, "/healthz")).status == 200
        with pytest.raises(OSError):  # and the listener is gone once the relay stopped
            await get(relay.ops_url, "/healthz")


# --- metrics ----------------------------------------------------------------------------------


async def test_metrics_count_appends_commits_subscribers_and_auth_failures(relay: Relay) -> None:
    with trio.fail_after(60):
        user = await sign_up(relay.url)
        before = await metrics(relay.ops_url)
        async with session(relay.url, user) as writer, session(relay.url, user) as reader:
            async with reader.subscribe(user.collab_id) as frames:
                while not isinstance(await frames.receive(), wire.CaughtUp):
                    pass
                for i in range(3):
                    await post(writer, user, user.collab_id, f"message {i}")
                # A retried append (same signed event) gets its seq back and writes nothing.
                event = user.event("retried", ts=int(time.time() * 1000))
                first = await writer.append(event)
                again = await writer.append(event)
                assert again.seq == first.seq
                after = await metrics(relay.ops_url)
                assert after['cozy_subscriptions{state="live"}'] == 1
                assert after['cozy_subscriptions{state="catching_up"}'] == 0
                assert after["cozy_connections"] == 2

        def delta(name: str) -> float:
            return after[name] - before.get(name, 0.0)

        assert delta("cozy_events_appended_total") == 4
        assert delta("cozy_append_duplicates_total") == 1
        assert delta("cozy_ledger_commit_events_sum") == 4  # duplicates are not written
        commits = delta("cozy_ledger_commits_total")
        assert 1 <= commits <= 5
        assert delta("cozy_ledger_commit_events_count") == commits
        assert delta("cozy_ledger_commit_seconds_count") == commits
        assert after["cozy_ledger_commit_seconds_sum"] > 0
        assert after["cozy_ledger_commit_failures_total"] == 0
        assert after["cozy_sequencer_failures_total"] == 0
        assert "cozy_ledger_stalled_groups_total" in after
        assert (
            after['cozy_ledger_commit_events_bucket{le="+Inf"}']
            == after["cozy_ledger_commit_events_count"]
        )
        assert delta("cozy_fanout_deliveries_total") == 4  # the live subscriber got each new one
        assert after["cozy_connections_accepted_total"] >= 3
        # Nothing failed to log in yet.
        assert not [k for k in after if k.startswith("cozy_auth_failures_total")]
        assert after["cozy_lockouts_total"] == 0

        async with connect(relay.url) as client:
            for _ in range(2):
                with pytest.raises(RelayRefused):
                    await client.login(user.handle, "not the password at all")
            with pytest.raises(RelayRefused):
                await client.authenticate("not-a-token")
            await client.login(user.handle, PASSWORD)
        counted = await metrics(relay.ops_url)
        assert counted['cozy_auth_failures_total{reason="invalid_credentials"}'] == 2
        assert counted['cozy_auth_failures_total{reason="invalid_token"}'] == 1
        assert counted["cozy_lockouts_total"] == 0


async def test_metrics_count_lockouts_and_refusals_while_locked(relay: Relay) -> None:
    with trio.fail_after(60):
        user = await sign_up(relay.url)
        async with connect(relay.url) as client:
            # Five consecutive failures are free; the sixth locks the handle (1 s, as shipped).
            for _ in range(6):
                with pytest.raises(RelayRefused):
                    await client.login(user.handle, "a wrong guess, again")
            with pytest.raises(RelayRefused) as locked:
                await client.login(user.handle, PASSWORD)  # refused unverified while locked
            assert locked.value.code.value == "rate_limited"
        counted = await metrics(relay.ops_url)
        assert counted['cozy_auth_failures_total{reason="invalid_credentials"}'] == 6
        assert counted['cozy_auth_failures_total{reason="locked_out"}'] == 1
        assert counted["cozy_lockouts_total"] == 1


async def test_each_relay_has_its_own_registry(database_url: str, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_relay(relay_config(database_url, tmp_path / "a")) as a:
            async with running_relay(relay_config(database_url, tmp_path / "b")) as b:
                user = await sign_up(a.url)
                async with session(a.url, user) as client:
                    await post(client, user, user.collab_id, "only on a")
                on_a, on_b = await metrics(a.ops_url), await metrics(b.ops_url)
                assert on_a["cozy_events_appended_total"] == 1
                assert on_b["cozy_events_appended_total"] == 0
                assert a.ops_url != b.ops_url


# --- stage times (a bench diagnostic) --------------------------------------------------------


async def test_stage_times_are_served_only_when_turned_on(relay: Relay) -> None:
    """Production relays do not expose the diagnostic: the path is a 404 like any other."""
    with trio.fail_after(20):
        assert (await get(relay.ops_url, "/debug/stages")).status == 404


async def test_stage_times_follow_each_append_from_inbox_to_socket(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With COZY_STAGE_TIMES on, each append's stamps come back in path order (received →
    published) with the subscriber's deliveries, taken once: the bench's breakdown needs both."""
    monkeypatch.setattr(_stages, "RECORDER", None)  # the switch is per process: undone after
    monkeypatch.setattr(_stages, "DELIVERY_SAMPLE", 1)  # every message's writes, not 1 in 8
    config = relay_config(database_url, tmp_path, stage_times=True)
    with trio.fail_after(60):
        async with running_relay(config) as relay:
            user = await sign_up(relay.url)
            await get(relay.ops_url, "/debug/stages")  # what signing up stamped
            async with session(relay.url, user) as writer, session(relay.url, user) as reader:
                async with reader.subscribe(user.collab_id) as frames:
                    while not isinstance(await frames.receive(), wire.CaughtUp):
                        pass
                    seqs = [await post(writer, user, user.collab_id, f"m{i}") for i in range(3)]
                    got: list[int] = []
                    while len(got) < 3:
                        frame = await frames.receive()
                        if isinstance(frame, wire.Event):
                            got.append(frame.seq)
            reply = await get(relay.ops_url, "/debug/stages")
            assert reply.status == 200
            doc = reply.json()
            events = {seq: stamps for c, seq, stamps in doc["events"] if c == user.collab_id}  # type: ignore[union-attr]
            assert sorted(events) == seqs
            for stamps in events.values():
                assert len(stamps) == len(_stages.EVENT_STAMPS)
                assert stamps == sorted(stamps)  # one clock, in path order
            delivered = {last for _port, last, _n, _at in doc["deliveries"]}  # type: ignore[union-attr]
            assert set(seqs) <= delivered
            again = (await get(relay.ops_url, "/debug/stages")).json()
            assert again["events"] == []
            assert again["deliveries"] == []
