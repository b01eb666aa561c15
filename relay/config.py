"""Relay configuration: environment variables override a TOML file, which overrides defaults.

Secrets (the JWT signing key, the relay's signing seed) are wrapped in `Secret` so that they
never show up in a repr, a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from fanout import CatchupLimits
from localfs import atomic_write
from model.note import ALG_COSIGNATURE_V1, NoteError, NoteVerifier, is_valid_key_name
from relay._cf_access import DEFAULT_LEEWAY_SECONDS, AccessConfigError, AccessPolicy
from relay.broker import BaoAuth, ToolSpec, tools_from_config

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

DEFAULT_DATA_DIR: Final = Path(".cozy/relay")
DEFAULT_OPS_HOST: Final = "127.0.0.1"
DEFAULT_OPS_PORT: Final = 9465
_OPS_OFF: Final = frozenset({"off", "none", "disabled", "false"})
JWT_KEY_FILE: Final = "jwt_signing_key"


class ConfigError(Exception):
    """The configuration is unusable. The message names the setting and how to fix it."""


@dataclass(frozen=True)
class Secret:
    """A secret value that refuses to be printed."""

    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True)
class FrontDoorLimits:
    """What the relay spends on callers who have not logged in yet (docs/operator-guide.md,
    "The front door"; ADR-0018). Each field has an environment variable, named in
    `FRONT_DOOR_ENV`, and the same key in the TOML file."""

    # Connections accepted that have not logged in or authenticated yet. One more closes the
    # oldest of them with 4002, so idle sockets cannot keep a new user out.
    max_unauthenticated_connections: int = 256
    # Seconds a connection may stay unauthenticated; then it is closed with 4001 (after the
    # login or sign-up it is waiting for, if any, is answered).
    auth_timeout_seconds: int = 30
    # Argon2id computations at once (password hashing and verification), shared fairly:
    # sign-ups and logins take turns, and within logins each handle, within sign-ups each
    # caller, gets one turn per round.
    argon2_slots: int = 2
    # Sign-ups per caller (Cloudflare Access identity, else peer address) and for the whole
    # relay, per hour; each budget also allows a burst of its full hourly size.
    signups_per_caller_per_hour: int = 20
    signups_per_hour: int = 600
    # `get_account` by handle and `create_agent` (the requests that answer whether a handle
    # exists), per caller and for the whole relay, per hour.
    handle_lookups_per_caller_per_hour: int = 120
    handle_lookups_per_hour: int = 3600


FRONT_DOOR_ENV: Final = {
    "max_unauthenticated_connections": ("COZY_MAX_UNAUTHENTICATED_CONNECTIONS", 1, 1_000_000),
    "auth_timeout_seconds": ("COZY_AUTH_TIMEOUT", 1, 3600),
    "argon2_slots": ("COZY_ARGON2_SLOTS", 1, 256),
    "signups_per_caller_per_hour": ("COZY_SIGNUPS_PER_CALLER_PER_HOUR", 1, 1_000_000),
    "signups_per_hour": ("COZY_SIGNUPS_PER_HOUR", 1, 10_000_000),
    "handle_lookups_per_caller_per_hour": (
        "COZY_HANDLE_LOOKUPS_PER_CALLER_PER_HOUR",
        1,
        1_000_000,
    ),
    "handle_lookups_per_hour": ("COZY_HANDLE_LOOKUPS_PER_HOUR", 1, 10_000_000),
}
"""Each front-door limit's environment variable and allowed range (inclusive)."""


@dataclass(frozen=True)
class WitnessTarget:
    """One witness the relay asks to cosign: its tlog-witness URL prefix and verifier key."""

    url: str
    vkey: str


@dataclass(frozen=True)
class RelayConfig:
    database_url: str | None
    data_dir: Path
    host: str
    port: int
    jwt_signing_key: Secret
    relay_signing_seed: Secret | None
    session_ttl_seconds: int = 15 * 60
    bao_addr: str | None = None
    bao_token: Secret | None = None  # dev and tests; production uses AppRole
    bao_role_id: str | None = None
    bao_secret_id: Secret | None = None
    tools: Mapping[str, ToolSpec] = field(default_factory=dict)
    # The operations listener (/healthz, /readyz, /metrics): its own address, apart from the
    # WebSocket origin so it need not be published. ops_port None: no listener; 0: a free port.
    ops_host: str = DEFAULT_OPS_HOST
    ops_port: int | None = DEFAULT_OPS_PORT
    # `cozy dev` only: when ops_port is taken, listen on a free port instead of failing.
    ops_port_fallback: bool = False
    # Cloudflare Access at the origin (SO-6): None means no Access check (local and dev use).
    cf_access: AccessPolicy | None = None
    # Start on a Postgres that may lose commits (fsync/synchronous_commit off): benchmarks only.
    allow_unsafe_durability: bool = False
    # Load limits (docs/protocol.md, "Limits"): concurrent connections one account may hold,
    # and the largest artifact one upload may store.
    max_connections_per_account: int = 16
    max_artifact_bytes: int = 64 * 1024 * 1024
    # Writer liveness (docs/reliability.md): how long the ledger writer waits for one group
    # commit before it starts the next group beside it, so a commit in doubt (its outcome being
    # settled, or its reply never coming) holds up only its own collabs.
    writer_stall_ms: int = 1000
    # Worker processes that check appends' signatures (relay/_sigprocs.py), started on the first
    # batch that needs them: in threads the checks share the relay's GIL. 0 checks them in
    # threads only.
    signature_workers: int = 2
    # Signed checkpoints (ADR-0020): the relay's name, the first part of every collab's
    # checkpoint origin `<relay_name>/collab/<collab_id>` (a key name: no spaces or '+'), and
    # how often an open subscription gets a signed checkpoint when nothing else sent one.
    relay_name: str = "cozy-relay"
    checkpoint_interval_ms: int = 30_000
    # Witnesses (docs/witness.md): the relay submits each active collab's newest checkpoint to
    # each (at most every `witness_interval_ms`, and soon after a commit) and hands out the
    # cosignatures with its checkpoints, for members whose collab sets a witness policy.
    witnesses: tuple[WitnessTarget, ...] = ()
    witness_interval_ms: int = 1000
    # What catch-ups may cost and how many run at once (fanout/_catchup.py).
    catchup: CatchupLimits = field(default_factory=CatchupLimits)
    # Unauthenticated connections, Argon2 slots and the enumeration budgets (ADR-0018).
    front_door: FrontDoorLimits = field(default_factory=FrontDoorLimits)
    # Bytes one account may keep stored: its finished artifacts plus its uploads in progress.
    storage_quota_bytes: int = 1024 * 1024 * 1024
    # An upload that gets no piece for this long is deleted with its pieces (one left by a
    # crash; a live connection's uploads are deleted when it closes). Swept at start-up and
    # every `housekeeping_seconds`, with login-failure records older than the lockout window.
    upload_idle_seconds: int = 10 * 60
    housekeeping_seconds: int = 60
    # Accept keystores sealed with the documented test Argon2id profile (t=1, 8 MiB) instead of
    # MODERATE. Test suites only: a database thief cracks such a keystore in no time.
    allow_test_kdf: bool = False
    # Stamp each append's path through the relay for `cozy bench latency` (relay/_stages.py),
    # served at the ops listener's /debug/stages. A diagnostic: off in production.
    stage_times: bool = False


def load_config(
    env: Mapping[str, str] | None = None,
    toml_path: Path | None = None,
    **overrides: object,
) -> RelayConfig:
    """Build the config. Raises `ConfigError` naming the bad setting."""
    env = os.environ if env is None else env
    file_values: dict[str, object] = {}
    path = toml_path or (Path(env["COZY_RELAY_CONFIG"]) if "COZY_RELAY_CONFIG" in env else None)
    if path is not None:
        try:
            file_values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None

    def pick(env_name: str, key: str, default: object = None) -> object:
        if key in overrides and overrides[key] is not None:
            return overrides[key]
        if env_name in env:
            return env[env_name]
        return file_values.get(key, default)

    data_dir = Path(str(pick("COZY_DATA_DIR", "data_dir", DEFAULT_DATA_DIR)))
    port_raw = pick("COZY_LISTEN_PORT", "port", 8765)
    try:
        port = int(str(port_raw))
    except ValueError:
        raise ConfigError(f"listen port must be an integer, got {port_raw!r}") from None
    jwt_raw = pick("JWT_SIGNING_KEY", "jwt_signing_key")
    if jwt_raw is None:
        jwt_key = _persistent_secret(data_dir / JWT_KEY_FILE, 32).value
    else:
        jwt_key = str(jwt_raw).encode()
        if len(jwt_key) < 32:
            raise ConfigError("JWT_SIGNING_KEY must be at least 32 characters of random data")
    seed_raw = pick("COZY_RELAY_SIGNING_SEED", "relay_signing_seed")
    seed = None if seed_raw is None else Secret(_b64_seed(str(seed_raw)))
    ttl_raw = pick("COZY_SESSION_TTL", "session_ttl_seconds", 15 * 60)
    try:
        ttl = int(str(ttl_raw))
    except ValueError:
        raise ConfigError(f"COZY_SESSION_TTL must be whole seconds, got {ttl_raw!r}") from None
    if not 60 <= ttl <= 24 * 3600:
        raise ConfigError("COZY_SESSION_TTL must be between 60 and 86400 seconds")
    ops_port = _ops_port(pick("COZY_OPS_PORT", "ops_port", DEFAULT_OPS_PORT))
    cf_access = _cf_access_policy(pick)
    db = pick("DATABASE_URL", "database_url")
    bao = pick("BAO_ADDR", "bao_addr")
    bao_token = pick("BAO_TOKEN", "bao_token")
    role_id = pick("BAO_ROLE_ID", "bao_role_id")
    secret_id = pick("BAO_SECRET_ID", "bao_secret_id")
    try:
        tools = tools_from_config(overrides.get("tools") or file_values.get("tools"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return RelayConfig(
        database_url=None if db is None else str(db),
        data_dir=data_dir,
        host=str(pick("COZY_LISTEN_HOST", "host", "127.0.0.1")),
        port=port,
        jwt_signing_key=Secret(jwt_key),
        relay_signing_seed=seed,
        session_ttl_seconds=ttl,
        bao_addr=None if bao is None else str(bao),
        bao_token=None if bao_token is None else Secret(str(bao_token).encode()),
        bao_role_id=None if role_id is None else str(role_id),
        bao_secret_id=None if secret_id is None else Secret(str(secret_id).encode()),
        tools=tools,
        ops_host=str(pick("COZY_OPS_HOST", "ops_host", DEFAULT_OPS_HOST)),
        ops_port=ops_port,
        cf_access=cf_access,
        allow_unsafe_durability=_flag(
            "COZY_ALLOW_UNSAFE_DURABILITY",
            pick("COZY_ALLOW_UNSAFE_DURABILITY", "allow_unsafe_durability", False),
        ),
        stage_times=_flag("COZY_STAGE_TIMES", pick("COZY_STAGE_TIMES", "stage_times", False)),
        max_connections_per_account=_bounded_int(
            "COZY_MAX_CONNECTIONS_PER_ACCOUNT",
            pick("COZY_MAX_CONNECTIONS_PER_ACCOUNT", "max_connections_per_account", 16),
            1,
            100_000,
        ),
        max_artifact_bytes=_bounded_int(
            "COZY_MAX_ARTIFACT_BYTES",
            pick("COZY_MAX_ARTIFACT_BYTES", "max_artifact_bytes", 64 * 1024 * 1024),
            1024,
            1024**4,
        ),
        writer_stall_ms=_bounded_int(
            "COZY_WRITER_STALL_MS",
            pick("COZY_WRITER_STALL_MS", "writer_stall_ms", 1000),
            10,
            60_000,
        ),
        signature_workers=_bounded_int(
            "COZY_SIGNATURE_WORKERS", pick("COZY_SIGNATURE_WORKERS", "signature_workers", 2), 0, 64
        ),
        relay_name=_relay_name(pick("COZY_RELAY_NAME", "relay_name", "cozy-relay")),
        checkpoint_interval_ms=_bounded_int(
            "COZY_CHECKPOINT_INTERVAL_MS",
            pick("COZY_CHECKPOINT_INTERVAL_MS", "checkpoint_interval_ms", 30_000),
            10,
            3_600_000,
        ),
        witnesses=_witnesses(pick("COZY_WITNESSES", "witnesses", ())),
        witness_interval_ms=_bounded_int(
            "COZY_WITNESS_INTERVAL_MS",
            pick("COZY_WITNESS_INTERVAL_MS", "witness_interval_ms", 1000),
            10,
            3_600_000,
        ),
        catchup=_catchup_limits(pick),
        front_door=_front_door(pick),
        storage_quota_bytes=_bounded_int(
            "COZY_STORAGE_QUOTA_BYTES",
            pick("COZY_STORAGE_QUOTA_BYTES", "storage_quota_bytes", 1024**3),
            0,
            1024**5,
        ),
        upload_idle_seconds=_bounded_int(
            "COZY_UPLOAD_IDLE_SECONDS",
            pick("COZY_UPLOAD_IDLE_SECONDS", "upload_idle_seconds", 10 * 60),
            10,
            7 * 24 * 3600,
        ),
        housekeeping_seconds=_bounded_int(
            "COZY_HOUSEKEEPING_SECONDS",
            pick("COZY_HOUSEKEEPING_SECONDS", "housekeeping_seconds", 60),
            1,
            24 * 3600,
        ),
        allow_test_kdf=_flag(
            "COZY_ALLOW_TEST_KDF", pick("COZY_ALLOW_TEST_KDF", "allow_test_kdf", False)
        ),
    )


# Catch-up settings: (environment, TOML key, CatchupLimits field, lowest, highest).
_CATCHUP_SETTINGS: Final = (
    ("COZY_CATCHUPS_PER_CONNECTION", "catchups_per_connection", "per_connection", 1, 1000),
    ("COZY_CATCHUPS_PER_ACCOUNT", "catchups_per_account", "per_account", 1, 100_000),
    ("COZY_CATCHUPS_PER_RELAY", "catchups_per_relay", "per_relay", 1, 100_000),
    ("COZY_CATCHUP_PAGE_BYTES", "catchup_page_bytes", "page_bytes", 64 * 1024, 64 * 1024 * 1024),
    ("COZY_CATCHUP_STALL_SECONDS", "catchup_stall_seconds", "stall_seconds", 1, 86_400),
)


def _catchup_limits(pick: Callable[[str, str, object], object]) -> CatchupLimits:
    default = CatchupLimits()
    values = {
        attr: _bounded_int(env, pick(env, key, getattr(default, attr)), low, high)
        for env, key, attr, low, high in _CATCHUP_SETTINGS
    }
    return dataclasses.replace(default, **values)


def _front_door(pick: Callable[[str, str, object], object]) -> FrontDoorLimits:
    defaults = FrontDoorLimits()
    values = {
        key: _bounded_int(env_name, pick(env_name, key, getattr(defaults, key)), low, high)
        for key, (env_name, low, high) in FRONT_DOOR_ENV.items()
    }
    return FrontDoorLimits(**values)


def bao_auth(config: RelayConfig) -> BaoAuth | None:
    """How the broker reaches OpenBao, or None when no BAO_ADDR is configured."""
    if config.bao_addr is None:
        return None
    return BaoAuth(
        config.bao_addr,
        token=None if config.bao_token is None else config.bao_token.value.decode(),
        role_id=config.bao_role_id,
        secret_id=None if config.bao_secret_id is None else config.bao_secret_id.value.decode(),
    )


def relay_signing_seed(config: RelayConfig) -> bytes:
    """The relay's Ed25519 seed: configured, or created once in the data dir (mode 0600)."""
    if config.relay_signing_seed is not None:
        return config.relay_signing_seed.value
    return _persistent_secret(config.data_dir / "relay_signing_seed", 32).value


def jwt_signing_key_origin(
    env: Mapping[str, str] | None = None, toml_path: Path | None = None
) -> str | None:
    """Where the operator set the JWT signing key (as `load_config` would find it), or None
    when the relay keeps it in its data dir. Raises `ConfigError` for an unreadable TOML."""
    env = os.environ if env is None else env
    if "JWT_SIGNING_KEY" in env:
        return "the JWT_SIGNING_KEY environment variable"
    path = toml_path or (Path(env["COZY_RELAY_CONFIG"]) if "COZY_RELAY_CONFIG" in env else None)
    if path is None:
        return None
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return f"jwt_signing_key in {path}" if "jwt_signing_key" in values else None


def new_jwt_signing_key() -> str:
    """A fresh value for JWT_SIGNING_KEY: 64 URL-safe characters (384 random bits)."""
    return secrets.token_urlsafe(48)


def rotate_jwt_signing_key(data_dir: Path) -> Path:
    """Replace `<data_dir>/jwt_signing_key` with a new random key, atomically, mode 0600.

    The kill switch (SO-6): a relay (re)started with the new key refuses every session and
    agent token signed with the old one. Readers see the old file or the new one, never a
    partial one. Returns the path.
    """
    path = data_dir / JWT_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, base64.b64encode(secrets.token_bytes(32)), mode=0o600)
    return path


def _persistent_secret(path: Path, nbytes: int) -> Secret:
    try:
        return Secret(base64.b64decode(path.read_bytes(), validate=True))
    except FileNotFoundError:
        pass
    except (binascii.Error, OSError) as exc:
        raise ConfigError(f"{path} is unreadable or damaged ({type(exc).__name__})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_bytes(nbytes)
    try:
        atomic_write(path, base64.b64encode(value), mode=0o600, overwrite=False)
    except FileExistsError:  # another relay on this data dir created it first: use theirs
        return _persistent_secret(path, nbytes)
    return Secret(value)


def _bounded_int(name: str, raw: object, low: int, high: int) -> int:
    try:
        value = int(str(raw))
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _ops_port(raw: object) -> int | None:
    """COZY_OPS_PORT / ops_port: a port (0 picks a free one), or off (`off`, `false`) for none."""
    if raw is False or str(raw).strip().lower() in _OPS_OFF:
        return None
    try:
        port = int(str(raw))
    except ValueError:
        port = -1
    if not 0 <= port <= 65535 or isinstance(raw, bool):
        raise ConfigError(
            f"COZY_OPS_PORT must be a port number (0 picks a free one) or `off`, got {raw!r}"
        )
    return port


def _cf_access_policy(pick: Callable[[str, str], object]) -> AccessPolicy | None:
    """CF_ACCESS_TEAM_DOMAIN + CF_ACCESS_AUD (both or neither), optional CF_ACCESS_CERTS_URL
    and CF_ACCESS_LEEWAY. Half a configuration is an error, never a silently open relay."""
    team = pick("CF_ACCESS_TEAM_DOMAIN", "cf_access_team_domain")
    aud = pick("CF_ACCESS_AUD", "cf_access_aud")
    certs_url = pick("CF_ACCESS_CERTS_URL", "cf_access_certs_url")
    leeway_raw = pick("CF_ACCESS_LEEWAY", "cf_access_leeway_seconds")
    if team is None and aud is None:
        if certs_url is not None or leeway_raw is not None:
            raise ConfigError(
                "CF_ACCESS_CERTS_URL / CF_ACCESS_LEEWAY are set but Cloudflare Access is not: "
                "set CF_ACCESS_TEAM_DOMAIN and CF_ACCESS_AUD too, or remove them"
            )
        return None
    if team is None or aud is None or not str(team).strip():
        raise ConfigError(
            "Cloudflare Access needs both CF_ACCESS_TEAM_DOMAIN (your team, e.g. 'myteam') and "
            "CF_ACCESS_AUD (the application's AUD tag); set both, or neither to run without it"
        )
    try:
        leeway = DEFAULT_LEEWAY_SECONDS if leeway_raw is None else int(str(leeway_raw))
    except ValueError:
        raise ConfigError(f"CF_ACCESS_LEEWAY must be whole seconds, got {leeway_raw!r}") from None
    auds: str | list[str] = [str(a) for a in aud] if isinstance(aud, list) else str(aud)
    try:
        return AccessPolicy.for_team(
            str(team),
            auds,
            certs_url=None if certs_url is None else str(certs_url),
            leeway_seconds=leeway,
        )
    except AccessConfigError as exc:
        raise ConfigError(str(exc)) from None


def _flag(name: str, raw: object) -> bool:
    """A yes/no setting: a TOML boolean, or 1/0, true/false, yes/no in the environment."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false), got {raw!r}")


def _b64_seed(raw: str) -> bytes:
    try:
        seed = base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise ConfigError("COZY_RELAY_SIGNING_SEED must be base64 of 32 random bytes") from None
    if len(seed) != 32:
        raise ConfigError("COZY_RELAY_SIGNING_SEED must be base64 of exactly 32 bytes")
    return seed


def _relay_name(value: object) -> str:
    name = str(value)
    if not is_valid_key_name(name + "/clock") or "\n" in name:
        raise ConfigError(
            f"COZY_RELAY_NAME must be a name without spaces or '+' (e.g. the public host), got"
            f" {name!r}"
        )
    return name


def _witnesses(raw: object) -> tuple[WitnessTarget, ...]:
    """`COZY_WITNESSES="URL VKEY, URL VKEY"`, or TOML `[[witnesses]]` tables of url and vkey."""
    pairs: list[tuple[object, object]] = []
    if isinstance(raw, str):
        for item in filter(None, (part.strip() for part in raw.split(","))):
            first, _, rest = item.partition(" ")
            pairs.append((first, rest.strip()))
    elif isinstance(raw, list | tuple):
        for entry in raw:
            if isinstance(entry, WitnessTarget):
                pairs.append((entry.url, entry.vkey))
            elif isinstance(entry, dict):
                pairs.append((entry.get("url"), entry.get("vkey")))
            else:
                raise ConfigError("each [[witnesses]] entry has a url and a vkey")
    else:
        raise ConfigError("witnesses: COZY_WITNESSES='URL VKEY, ...' or [[witnesses]] tables")
    targets: list[WitnessTarget] = []
    for url, vkey in pairs:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"a witness URL is http(s)://host[:port][/prefix], not {url!r}")
        try:
            ok = isinstance(vkey, str) and NoteVerifier.from_vkey(vkey).alg == ALG_COSIGNATURE_V1
        except NoteError:
            ok = False
        if not ok:
            raise ConfigError(
                f"witness {url}: give its verifier key string (`cozy witness init` printed it)"
            )
        targets.append(WitnessTarget(url, str(vkey)))
    return tuple(targets)
