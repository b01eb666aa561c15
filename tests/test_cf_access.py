"""Cloudflare Access at the origin (SO-6): the relay checks `Cf-Access-Jwt-Assertion` first.

Real RSA keys (cryptography), real tokens (PyJWT), a real JWKS endpoint: a small Trio HTTP
server on loopback that serves whatever key set the test publishes and counts every GET. The
verifier is tested directly (fast, with a clock the test moves for the TTL and refetch floor)
and through a real relay with real WebSocket clients.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from clientkit import AccessRefused, connect
from clientkit._transport import open_websocket
from relay._cf_access import (
    AccessDenied,
    AccessKind,
    AccessPolicy,
    AccessVerifier,
    JwksUnavailable,
    fetch_jwks,
)
from relay.config import ConfigError, load_config
from tests.cli_harness import client_env, cozy
from tests.relay_harness import relay_config, running_relay, session, sign_up

if TYPE_CHECKING:
    from pathlib import Path

    from relay.config import RelayConfig

TEAM = "cozytest"
ISSUER = "https://cozytest.cloudflareaccess.com"
AUD = "4714c1358e65fe4b408ad6d432a5f878f08194bdb4752441fd56faefa9b2b6f2"
SECOND_AUD = "9c1f0a3e5b7d2c4f6e8a0b1c3d5e7f9a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e"
HEADER = b"Cf-Access-Jwt-Assertion"


@dataclass(frozen=True)
class Signer:
    """One RSA key pair, as Cloudflare holds it: it mints tokens and publishes its JWK."""

    kid: str
    private: rsa.RSAPrivateKey

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return jwk | {"kid": self.kid, "alg": "RS256", "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": kid or self.kid})


@pytest.fixture(scope="module")
def signers() -> list[Signer]:
    return [
        Signer(f"kid-{i}-{secrets.token_hex(4)}", rsa.generate_private_key(65537, 2048))
        for i in range(3)
    ]


def identity_claims(**changes: Any) -> dict[str, Any]:
    """A Cloudflare Access identity token's claims (a person who signed in); None removes."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": [AUD],
        "email": "ana@example.com",
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "type": "app",
        "identity_nonce": "6ei69kawdKzMIAPF",
        "sub": "7335d417-61da-459d-899c-0a01c76a2f94",
        "country": "NL",
    }
    return _changed(claims, changes)


def service_claims(**changes: Any) -> dict[str, Any]:
    """A service token's claims: `common_name` is the client id, `sub` is empty."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": [AUD],
        "exp": now + 600,
        "iat": now,
        "iss": ISSUER,
        "type": "app",
        "common_name": "f1c0d2a4b5e6.access",
        "sub": "",
    }
    return _changed(claims, changes)


def _changed(claims: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand, the way an attacker would: alg=none (key None) or HS256 with
    `key` as the HMAC secret (PyJWT itself refuses to make either)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    mac = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


class JwksServer:
    """A JWKS endpoint on 127.0.0.1: serves `keys` (or fails with `status`), counts GETs."""

    def __init__(self) -> None:
        self.keys: list[Any] = []  # JWK dicts, or junk a broken endpoint might serve
        self.status = 200
        self.body: bytes | None = None  # served as is instead of the key set, when set
        self.fetches = 0
        self.url = ""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/cdn-cgi/access/certs"
        task_status.started()
        await trio.serve_listeners(self._answer, listeners)

    async def _answer(self, stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 65536:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            request += chunk
        self.fetches += 1
        body = self.body if self.body is not None else json.dumps({"keys": self.keys}).encode()
        head = (
            f"HTTP/1.1 {self.status} Answer\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(trio.BrokenResourceError):  # the client gave up
            await stream.send_all(head.encode() + body)
        await stream.aclose()


@pytest.fixture
async def jwks(nursery: trio.Nursery, signers: list[Signer]) -> JwksServer:
    server = JwksServer()
    server.keys = [signers[0].jwk()]
    await nursery.start(server.serve)
    return server


class Clock:
    """Monotonic time the test moves by hand (TTL and refetch floor)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy_for(server: JwksServer, **changes: Any) -> AccessPolicy:
    return dataclasses.replace(
        AccessPolicy.for_team(TEAM, [AUD, SECOND_AUD], certs_url=server.url), **changes
    )


async def started_verifier(server: JwksServer, clock: Clock, **changes: Any) -> AccessVerifier:
    verifier = AccessVerifier(policy_for(server, **changes), clock=clock)
    await verifier.start()
    return verifier


async def refusal(verifier: AccessVerifier, token: str) -> AccessDenied:
    with pytest.raises(AccessDenied) as caught:
        await verifier.verify(token)
    assert token not in str(caught.value)
    return caught.value


# --- the verifier, directly --------------------------------------------------------------------


@pytest.mark.objective("SO-6")
async def test_identity_and_service_tokens_are_accepted_and_say_who_they_are(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    with trio.fail_after(10):
        verifier = await started_verifier(jwks, Clock())
        person = await verifier.verify(signers[0].token(identity_claims()))
        machine = await verifier.verify(signers[0].token(service_claims()))
        other_app = await verifier.verify(signers[0].token(identity_claims(aud=SECOND_AUD)))
    assert person.kind is AccessKind.IDENTITY
    assert (person.subject, person.email, person.common_name) == (
        "7335d417-61da-459d-899c-0a01c76a2f94",
        "ana@example.com",
        None,
    )
    assert machine.kind is AccessKind.SERVICE
    assert (machine.subject, machine.email, machine.common_name) == (
        "f1c0d2a4b5e6.access",
        None,
        "f1c0d2a4b5e6.access",
    )
    assert other_app.kind is AccessKind.IDENTITY  # any configured AUD tag will do
    stats = verifier.statistics()
    assert (stats.verified, stats.refused, stats.jwks_fetches, jwks.fetches) == (3, 0, 1, 1)


def _tampered(token: str) -> str:
    head, body, sig = token.split(".")
    middle = len(sig) // 2
    flipped = "A" if sig[middle] != "A" else "B"
    return f"{head}.{body}.{sig[:middle]}{flipped}{sig[middle + 1 :]}"


def _claims_swapped(token: str) -> str:
    """Keep the header and signature, swap in claims that say something else."""
    head, _, sig = token.split(".")
    forged = _b64(json.dumps(identity_claims(email="mallory@example.com")).encode())
    return f"{head}.{forged}.{sig}"


ForgedToken = Callable[[list[Signer]], str]

FORGERIES: dict[str, tuple[ForgedToken, str]] = {
    "wrong audience": (
        lambda s: s[0].token(identity_claims(aud=["someone-elses-app"])),
        "audience",
    ),
    "no audience": (lambda s: s[0].token(identity_claims(aud=None)), "claims"),
    "wrong issuer": (
        lambda s: s[0].token(identity_claims(iss="https://evil.cloudflareaccess.com")),
        "issuer",
    ),
    "expired": (lambda s: s[0].token(identity_claims(exp=int(time.time()) - 120)), "expired"),
    "not yet valid": (
        lambda s: s[0].token(identity_claims(nbf=int(time.time()) + 600)),
        "not_yet_valid",
    ),
    "issued in the future": (
        lambda s: s[0].token(identity_claims(iat=int(time.time()) + 600)),
        "not_yet_valid",
    ),
    "no expiry": (lambda s: s[0].token(identity_claims(exp=None)), "claims"),
    "no subject or common name": (lambda s: s[0].token(identity_claims(sub="")), "claims"),
    "tampered signature": (lambda s: _tampered(s[0].token(identity_claims())), "signature"),
    "claims swapped under a real signature": (
        lambda s: _claims_swapped(s[0].token(service_claims())),
        "signature",
    ),
    "signed by an unpublished key under a published kid": (
        lambda s: s[1].token(identity_claims(), kid=s[0].kid),
        "signature",
    ),
    "unknown kid": (lambda s: s[1].token(identity_claims()), "unknown_key"),
    "no kid": (
        lambda s: jwt.encode(identity_claims(), s[0].private, algorithm="RS256"),
        "malformed",
    ),
    "alg none": (
        lambda s: unsigned_token({"alg": "none", "kid": s[0].kid}, identity_claims(), None),
        "algorithm",
    ),
    "alg None spelled differently": (
        lambda s: unsigned_token({"alg": "None", "kid": s[0].kid}, identity_claims(), None),
        "algorithm",
    ),
    "HS256 with the public key as the secret": (
        lambda s: unsigned_token(
            {"alg": "HS256", "typ": "JWT", "kid": s[0].kid}, identity_claims(), s[0].public_pem()
        ),
        "algorithm",
    ),
    "RS512 instead of RS256": (
        lambda s: jwt.encode(
            identity_claims(), s[0].private, algorithm="RS512", headers={"kid": s[0].kid}
        ),
        "algorithm",
    ),
    "not a token": (lambda s: "this.is-not.a-jwt", "malformed"),
}


@pytest.mark.objective("SO-6")
@pytest.mark.parametrize("case", FORGERIES, ids=list(FORGERIES))
async def test_every_forged_or_misaddressed_token_is_refused_with_its_reason(
    case: str, jwks: JwksServer, signers: list[Signer]
) -> None:
    make, reason = FORGERIES[case]
    with trio.fail_after(10):
        verifier = await started_verifier(jwks, Clock())
        denied = await refusal(verifier, make(signers))
    assert (denied.reason, denied.status) == (reason, 403)
    assert verifier.statistics().refused == 1
    assert verifier.statistics().verified == 0


@pytest.mark.objective("SO-6")
async def test_a_wrong_algorithm_is_refused_before_any_key_lookup(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    """Past the TTL and the floor a lookup would refetch; a bad alg must not even get there."""
    clock = Clock()
    with trio.fail_after(10):
        verifier = await started_verifier(jwks, clock)
        clock.now += 10 * 3600
        for header, key in (
            ({"alg": "none", "kid": "fresh-kid"}, None),
            ({"alg": "HS256", "kid": signers[0].kid}, signers[0].public_pem()),
        ):
            denied = await refusal(verifier, unsigned_token(header, identity_claims(), key))
            assert denied.reason == "algorithm"
    assert jwks.fetches == 1


@pytest.mark.objective("SO-6")
async def test_the_leeway_absorbs_small_clock_skew_and_no_more(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    now = int(time.time())
    with trio.fail_after(10):
        verifier = await started_verifier(jwks, Clock())  # leeway 30 s
        await verifier.verify(signers[0].token(identity_claims(exp=now - 10, nbf=now + 10)))
        assert (
            await refusal(verifier, signers[0].token(identity_claims(exp=now - 45)))
        ).reason == ("expired")
        strict = await started_verifier(jwks, Clock(), leeway_seconds=0)
        assert (await refusal(strict, signers[0].token(identity_claims(exp=now - 10)))).reason == (
            "expired"
        )


@pytest.mark.objective("SO-6")
async def test_key_rotation_old_and_new_keys_both_work_and_a_new_kid_costs_one_refetch(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    old, new, newer = signers
    clock = Clock()
    with trio.fail_after(15):
        verifier = await started_verifier(jwks, clock)
        await verifier.verify(old.token(identity_claims()))
        assert jwks.fetches == 1
        # Cloudflare rotates: the new key becomes current, the old one stays published.
        jwks.keys = [new.jwk(), old.jwk()]
        clock.now += 31  # past the refetch floor, well within the TTL
        await verifier.verify(new.token(identity_claims()))
        assert jwks.fetches == 2  # exactly one refetch for the new kid
        for _ in range(5):
            await verifier.verify(old.token(identity_claims()))
            await verifier.verify(new.token(service_claims()))
        assert jwks.fetches == 2  # both kids known: no more fetches
        # The next rotation drops the old key; once the set is refetched it stops working.
        jwks.keys = [newer.jwk(), new.jwk()]
        clock.now += 31
        await verifier.verify(newer.token(identity_claims()))
        assert jwks.fetches == 3
        assert (await refusal(verifier, old.token(identity_claims()))).reason == "unknown_key"
        await verifier.verify(new.token(identity_claims()))
    assert jwks.fetches == 3  # the old kid asked again within the floor: no fetch
    assert verifier.jwks.key_ids == (newer.kid, new.kid)


@pytest.mark.objective("SO-6")
async def test_a_storm_of_unknown_kids_costs_at_most_one_fetch_per_floor(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    clock = Clock()
    refused: list[str] = []

    async def bogus() -> None:
        token = signers[1].token(identity_claims(), kid=f"bogus-{secrets.token_hex(8)}")
        with pytest.raises(AccessDenied) as caught:
            await verifier.verify(token)
        refused.append(caught.value.reason)

    with trio.fail_after(20):
        verifier = await started_verifier(jwks, clock)
        clock.now += 31  # the floor has passed: the storm may cause one refetch, not 200
        async with trio.open_nursery() as storm:
            for _ in range(200):
                storm.start_soon(bogus)
        assert jwks.fetches == 2
        async with trio.open_nursery() as storm:  # a second wave within the floor: none
            for _ in range(200):
                storm.start_soon(bogus)
        await verifier.verify(signers[0].token(identity_claims()))  # real users still get in
    assert refused == ["unknown_key"] * 400
    assert jwks.fetches == 2
    assert verifier.statistics().refused == 400


@pytest.mark.objective("SO-6")
async def test_concurrent_first_users_of_a_new_key_share_one_fetch_and_all_get_in(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    """Requests arriving while the refetch is in flight wait for it rather than being refused."""
    clock = Clock()
    found: list[AccessKind] = []

    async def first_user() -> None:
        found.append((await verifier.verify(signers[1].token(identity_claims()))).kind)

    with trio.fail_after(10):
        verifier = await started_verifier(jwks, clock)
        jwks.keys = [signers[1].jwk(), signers[0].jwk()]
        clock.now += 31
        async with trio.open_nursery() as crowd:
            for _ in range(50):
                crowd.start_soon(first_user)
    assert found == [AccessKind.IDENTITY] * 50
    assert jwks.fetches == 2


@pytest.mark.objective("SO-6")
async def test_a_failed_refetch_keeps_the_keys_it_had(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    clock = Clock()
    with trio.fail_after(10):
        verifier = await started_verifier(jwks, clock)
        jwks.status = 500
        clock.now += 2 * 3600  # past the TTL: the next lookup refreshes, and that fails
        await verifier.verify(signers[0].token(identity_claims()))
        jwks.status, jwks.body = 200, b"<html>captive portal</html>"
        clock.now += 31
        await verifier.verify(signers[0].token(identity_claims()))
    stats = verifier.statistics()
    assert (jwks.fetches, stats.jwks_fetches, stats.jwks_fetch_failures) == (3, 1, 2)
    assert verifier.jwks.key_ids == (signers[0].kid,)


@pytest.mark.objective("SO-6")
async def test_without_any_keys_requests_get_503_until_a_fetch_works(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    clock = Clock()
    jwks.status = 503
    token = signers[0].token(identity_claims())
    with trio.fail_after(10):
        verifier = await started_verifier(jwks, clock)
        denied = await refusal(verifier, token)
        assert (denied.reason, denied.status) == ("keys_unavailable", 503)
        jwks.status = 200
        await refusal(verifier, token)  # within the floor: not asked again yet
        assert jwks.fetches == 1
        clock.now += 31
        assert (await verifier.verify(token)).kind is AccessKind.IDENTITY
    assert jwks.fetches == 2


@pytest.mark.objective("SO-6")
async def test_the_header_must_be_there_once_and_of_sane_size(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    token = signers[0].token(identity_claims()).encode()
    with trio.fail_after(10):
        verifier = await started_verifier(jwks, Clock())
        cases = {
            "missing": [(b"host", b"relay.example")],
            "malformed": [(b"cf-access-jwt-assertion", token), (b"cf-access-jwt-assertion", token)],
        }
        for reason, headers in cases.items():
            with pytest.raises(AccessDenied) as caught:
                await verifier.verify_headers(headers)
            assert caught.value.reason == reason
        with pytest.raises(AccessDenied) as caught:
            await verifier.verify_headers([(b"cf-access-jwt-assertion", b"x" * 20000)])
        assert caught.value.reason == "malformed"
        found = await verifier.verify_headers([(b"Cf-Access-Jwt-Assertion", token)])
    assert found.email == "ana@example.com"


@pytest.mark.objective("SO-6")
async def test_only_usable_rs256_keys_are_taken_from_the_jwks(
    jwks: JwksServer, signers: list[Signer]
) -> None:
    weak = rsa.generate_private_key(65537, 1024)
    jwks.keys = [
        {"kty": "oct", "kid": "hmac", "k": _b64(signers[0].public_pem()), "alg": "HS256"},
        Signer("weak", weak).jwk(),
        signers[1].jwk() | {"alg": "RS512"},
        signers[2].jwk() | {"use": "enc"},
        {k: v for k, v in signers[0].jwk().items() if k != "kid"},
        signers[0].jwk(),
        "not a key",
    ]
    with trio.fail_after(10):
        keys = await trio.to_thread.run_sync(fetch_jwks, jwks.url, 5.0)
        assert list(keys) == [signers[0].kid]
        jwks.keys = [signers[1].jwk() | {"alg": "RS512"}]
        with pytest.raises(JwksUnavailable, match="no usable RS256 key"):
            await trio.to_thread.run_sync(fetch_jwks, jwks.url, 5.0)
        jwks.body = b"{" + b" " * 300_000 + b"}"
        with pytest.raises(JwksUnavailable, match="more than"):
            await trio.to_thread.run_sync(fetch_jwks, jwks.url, 5.0)


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.objective("SO-6")
def test_access_is_configured_by_both_settings_or_neither(tmp_path: Path) -> None:
    base = {"COZY_DATA_DIR": str(tmp_path)}
    assert load_config(base).cf_access is None
    config = load_config(
        base | {"CF_ACCESS_TEAM_DOMAIN": "CozyTest", "CF_ACCESS_AUD": f" {AUD} ,{SECOND_AUD},"}
    )
    assert config.cf_access is not None
    assert config.cf_access.issuer == ISSUER
    assert config.cf_access.audiences == (AUD, SECOND_AUD)
    assert config.cf_access.certs_url == f"{ISSUER}/cdn-cgi/access/certs"
    assert config.cf_access.leeway_seconds == 30
    toml = tmp_path / "relay.toml"
    toml.write_text(
        f'cf_access_team_domain = "https://cozytest.cloudflareaccess.com/"\n'
        f'cf_access_aud = ["{AUD}"]\n'
        'cf_access_certs_url = "http://127.0.0.1:9/certs"\n'
    )
    from_file = load_config(base, toml)
    assert from_file.cf_access is not None
    assert (from_file.cf_access.issuer, from_file.cf_access.audiences) == (ISSUER, (AUD,))
    assert from_file.cf_access.certs_url == "http://127.0.0.1:9/certs"
    bad = {
        "team only": {"CF_ACCESS_TEAM_DOMAIN": TEAM},
        "aud only": {"CF_ACCESS_AUD": AUD},
        "empty aud": {"CF_ACCESS_TEAM_DOMAIN": TEAM, "CF_ACCESS_AUD": " , "},
        "bad team": {"CF_ACCESS_TEAM_DOMAIN": "my team!", "CF_ACCESS_AUD": AUD},
        "aud with spaces": {"CF_ACCESS_TEAM_DOMAIN": TEAM, "CF_ACCESS_AUD": "a b"},
        "plain http certs": {
            "CF_ACCESS_TEAM_DOMAIN": TEAM,
            "CF_ACCESS_AUD": AUD,
            "CF_ACCESS_CERTS_URL": "http://certs.example/",
        },
        "certs url alone": {"CF_ACCESS_CERTS_URL": "https://certs.example/"},
        "bad leeway": {
            "CF_ACCESS_TEAM_DOMAIN": TEAM,
            "CF_ACCESS_AUD": AUD,
            "CF_ACCESS_LEEWAY": "9999",
        },
    }
    for name, env in bad.items():
        with pytest.raises(ConfigError, match="CF_ACCESS_") as caught:
            load_config(base | env)
        assert "CF_ACCESS" in str(caught.value), name


# --- through a real relay ----------------------------------------------------------------------


def gated_config(
    database_url: str, tmp_path: Path, jwks: JwksServer, **changes: Any
) -> RelayConfig:
    """A test relay's config with Cloudflare Access on, pointed at the local JWKS."""
    config = relay_config(database_url, tmp_path / "relay")
    return dataclasses.replace(config, cf_access=policy_for(jwks, **changes))


async def upgrade_refusal(url: str, token: str) -> tuple[int, str]:
    """Connect with the client kit, sending `token` ("" sends no header); return the refusal."""
    with pytest.raises(AccessRefused) as caught:
        async with connect(url, access_token=token):
            pass
    return caught.value.status, caught.value.reason


@pytest.mark.objective("SO-6")
async def test_a_person_and_a_service_token_get_through_and_the_relay_knows_who(
    database_url: str,
    tmp_path: Path,
    jwks: JwksServer,
    signers: list[Signer],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    person = signers[0].token(identity_claims())
    machine = signers[0].token(service_claims())
    with trio.fail_after(60):
        async with running_relay(gated_config(database_url, tmp_path, jwks)) as relay:
            assert relay.access is not None
            async with connect(relay.url, access_token=person) as client:
                assert client.relay_pk == relay.relay_pk
                seen = [c.access for c in relay._connections if c.access is not None]
                assert [(a.kind, a.email) for a in seen] == [
                    (AccessKind.IDENTITY, "ana@example.com")
                ]
            # The client kit sends COZY_CF_ACCESS_TOKEN on every connection it opens: a whole
            # sign-up, collab creation and session works through the gate with a service token.
            monkeypatch.setenv("COZY_CF_ACCESS_TOKEN", machine)
            user = await sign_up(relay.url)
            async with session(relay.url, user) as client:
                me = await client.account(user.account_id)
                assert me.handle == user.handle
                kinds = {c.access.kind for c in relay._connections if c.access is not None}
                assert AccessKind.SERVICE in kinds
            stats = relay.access.statistics()
            assert stats.refused == 0
            assert stats.verified >= 3
            assert stats.jwks_fetches == jwks.fetches == 1
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    assert "access_verified" in logs
    assert "ana@example.com" in logs
    assert "f1c0d2a4b5e6.access" in logs
    for token in (person, machine):
        assert token.split(".")[2] not in logs  # not the token, not even its signature


WRONG_AT_THE_DOOR: dict[str, tuple[ForgedToken, str]] = {
    "no header": (lambda s: "", "header is missing"),
    "expired": (lambda s: s[0].token(identity_claims(exp=int(time.time()) - 120)), "expired"),
    "wrong audience": (lambda s: s[0].token(identity_claims(aud=["other"])), "another Access"),
    "wrong issuer": (
        lambda s: s[0].token(identity_claims(iss="https://evil.cloudflareaccess.com")),
        "another Cloudflare Access team",
    ),
    "alg none": (FORGERIES["alg none"][0], "not signed with RS256"),
    "HS256 confusion": (
        FORGERIES["HS256 with the public key as the secret"][0],
        "not signed with RS256",
    ),
    "unknown kid": (lambda s: s[2].token(identity_claims()), "does not publish"),
    "tampered": (lambda s: _tampered(s[0].token(identity_claims())), "does not verify"),
}


@pytest.mark.objective("SO-6")
async def test_without_a_valid_access_token_no_websocket_is_ever_accepted(
    database_url: str, tmp_path: Path, jwks: JwksServer, signers: list[Signer]
) -> None:
    with trio.fail_after(60):
        async with running_relay(gated_config(database_url, tmp_path, jwks)) as relay:
            assert relay.access is not None
            for case, (make, says) in WRONG_AT_THE_DOOR.items():
                token = make(signers)
                status, body = await upgrade_refusal(relay.url, token)
                assert status == 403, case
                assert body.startswith("Cloudflare Access: "), case
                assert says in body, case
                assert not token or token not in body, case
            assert relay.statistics().accepted_total == 0  # nothing got past the upgrade
            assert relay.access.statistics().refused == len(WRONG_AT_THE_DOOR)
            assert relay.access.statistics().verified == 0


@pytest.mark.objective("SO-6")
async def test_a_relay_whose_jwks_is_unreachable_starts_answers_503_and_recovers(
    database_url: str,
    tmp_path: Path,
    jwks: JwksServer,
    signers: list[Signer],
    capfd: pytest.CaptureFixture[str],
) -> None:
    jwks.status = 502
    token = signers[0].token(identity_claims())
    config = gated_config(database_url, tmp_path, jwks, refetch_floor_seconds=0.5)
    with trio.fail_after(60):
        async with running_relay(config) as relay:
            status, body = await upgrade_refusal(relay.url, token)
            assert status == 503
            assert "retry shortly" in body
            jwks.status = 200
            await trio.sleep(0.6)  # past the refetch floor: the next upgrade fetches again
            async with connect(relay.url, access_token=token) as client:
                assert client.relay_pk == relay.relay_pk
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    assert "cf_access_jwks_unavailable" in logs
    assert "HTTP 502" in logs
    assert "cf_access_keys_loaded" in logs


# --- the client kit's side ---------------------------------------------------------------------


async def test_the_client_kit_sends_the_access_headers_it_is_given(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Cloudflare's edge reads (cf-access-token, or a service token's id and secret) and
    what the relay reads (Cf-Access-Jwt-Assertion), from the environment or the argument."""
    seen: list[dict[bytes, bytes]] = []

    async def record(request: trio_websocket.WebSocketRequest) -> None:
        seen.append({name.lower(): value for name, value in request.headers})
        ws = await request.accept()
        await ws.aclose()

    server = await nursery.start(trio_websocket.serve_websocket, record, "127.0.0.1", 0, None)
    url = f"ws://127.0.0.1:{server.port}"
    access = (b"cf-access-token", b"cf-access-jwt-assertion")
    service = (b"cf-access-client-id", b"cf-access-client-secret")
    for name in (
        "COZY_CF_ACCESS_TOKEN",
        "COZY_CF_ACCESS_CLIENT_ID",
        "COZY_CF_ACCESS_CLIENT_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    with trio.fail_after(10):
        async with trio.open_nursery() as conns:
            async with open_websocket(url, conns):
                pass
            monkeypatch.setenv("COZY_CF_ACCESS_TOKEN", "from.the.environment\n")
            monkeypatch.setenv("COZY_CF_ACCESS_CLIENT_ID", "f1c0d2a4b5e6.access")
            monkeypatch.setenv("COZY_CF_ACCESS_CLIENT_SECRET", "service-secret")
            async with open_websocket(url, conns):
                pass
            async with open_websocket(url, conns, access_token="from.the.argument"):
                pass
            monkeypatch.delenv("COZY_CF_ACCESS_CLIENT_SECRET")  # half a service token: not sent
            async with open_websocket(url, conns, access_token=""):
                pass
    bare, from_env, from_arg, none = seen
    assert not any(name in bare for name in access + service)
    assert [from_env[name] for name in access] == [b"from.the.environment"] * 2
    assert [from_env[name] for name in service] == [b"f1c0d2a4b5e6.access", b"service-secret"]
    assert [from_arg[name] for name in access] == [b"from.the.argument"] * 2
    assert not any(name in none for name in access + service)


@pytest.mark.objective("SO-6")
async def test_the_cli_explains_an_access_refusal_and_works_with_a_token(
    database_url: str, tmp_path: Path, jwks: JwksServer, signers: list[Signer]
) -> None:
    token = signers[0].token(identity_claims())
    signup = ("account", "signup", "--handle", "carla")
    with trio.fail_after(120):
        async with running_relay(gated_config(database_url, tmp_path, jwks)) as relay:
            env = client_env(tmp_path / "home")
            env.pop("COZY_CF_ACCESS_TOKEN", None)
            refused = await cozy(*signup, "--relay", relay.url, env=env, check=False)
            env["COZY_CF_ACCESS_TOKEN"] = token
            await cozy(*signup, "--relay", relay.url, env=env)
    err = refused.stderr.decode()
    assert refused.returncode == 1
    assert "error: the relay refused the connection (HTTP 403: Cloudflare Access: " in err
    assert "COZY_CF_ACCESS_TOKEN" in err
    assert "Traceback" not in err
