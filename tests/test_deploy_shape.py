"""The tunnel deployment shape in docs/deploy/ stays closed (SO-6).

SO-6 asks for one public origin behind Cloudflare Access, with Postgres and OpenBao publishing no
ports. The shipped shape is a compose file; nothing here starts containers (there is no Docker
engine on CI). Instead the files are parsed and held to these rules:

- nothing publishes a port (``ports:`` in short or long form, on any service, cloudflared
  included: it dials out) and no service uses ``network_mode`` (``host`` shares the host's
  stack, ``service:``/``container:`` would bypass the network rules below);
- the data plane (postgres, openbao) attaches only to ``internal: true`` networks, and
  cloudflared shares no network with it;
- only cloudflared and the relay are on a network that is not internal (the edge), and the
  relay shares a network with each of cloudflared, postgres and openbao;
- OpenBao runs ``bao server -config=…`` (never dev mode) on persistent Raft/file storage;
- Postgres keeps ``fsync``, ``full_page_writes`` and ``synchronous_commit`` safe (the relay's
  own startup check, relay/_durability.py, accepts the same values), requires a password and
  keeps its data on a volume;
- the relay image installs only from the frozen pdm.lock, with the Makefile's pdm bootstrap,
  and runs ``cozy relay serve`` as a non-root user;
- cloudflared's ingress sends the public hostname to the relay and everything else to a
  catch-all ``http_status:404``.

Each rule is a small function over the parsed files, returning what is wrong. The honest files
must pass, and every rule is shown to fail by feeding it a mutated copy.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "docs" / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
INGRESS = DEPLOY / "cloudflared.yml"
OPENBAO_HCL = DEPLOY / "openbao.hcl"
RELAY_TOML = DEPLOY / "relay.toml"
MAKEFILE = ROOT / "Makefile"

EDGE_SERVICES = frozenset({"cloudflared", "relay"})
DATA_PLANE = ("postgres", "openbao")
REQUIRED_SERVICES = ("cloudflared", "relay", "postgres", "openbao")
# The values relay/_durability.py accepts at startup; booleans spelled otherwise count as on.
SAFE_PG = {
    "fsync": {"on"},
    "full_page_writes": {"on"},
    "synchronous_commit": {"on", "remote_write", "remote_apply"},
}
PG_TRUE = {"on", "true", "yes", "1"}
RELAY_PORT = 8765


# --- reading compose values in every syntax compose accepts -----------------------------------


def _tokens(value: object) -> list[str]:
    """A command or entrypoint as argv: compose takes a list or a shell-like string."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    return [repr(value)]


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    out: dict[str, str] = {}
    for item in env:
        key, _, val = str(item).partition("=")
        out[key] = val
    return out


def _service_networks(service: Mapping[str, Any]) -> set[str]:
    """The networks a service joins; compose puts a service with none listed on `default`."""
    nets = service.get("networks")
    if nets is None:
        return {"default"}
    if isinstance(nets, Mapping):
        return {str(n) for n in nets}
    return {str(n) for n in nets}


def _internal_networks(doc: Mapping[str, Any]) -> set[str]:
    """Networks declared `internal: true` (the boolean) and not external. An undeclared network
    (the implicit `default`) or an external one cannot be shown internal, so it is not."""
    declared = doc.get("networks") or {}
    return {
        str(name)
        for name, spec in declared.items()
        if isinstance(spec, Mapping) and spec.get("internal") is True and not spec.get("external")
    }


def _volume_targets(service: Mapping[str, Any], doc: Mapping[str, Any]) -> set[str]:
    """Container paths backed by a named volume of this compose file (short or long form)."""
    named = set((doc.get("volumes") or {}).keys())
    targets: set[str] = set()
    for vol in service.get("volumes") or []:
        if isinstance(vol, Mapping):
            if vol.get("type", "volume") == "volume" and vol.get("source") in named:
                targets.add(str(vol.get("target", "")).rstrip("/"))
            continue
        parts = str(vol).split(":")
        if len(parts) >= 2 and parts[0] in named:
            targets.add(parts[1].rstrip("/"))
    return targets


def _pg_settings(tokens: list[str]) -> dict[str, str]:
    """`-c name=value`, `-cname=value` and `--name=value` settings on a postgres command line."""
    settings: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        pair = None
        if tok == "-c" and i + 1 < len(tokens):
            pair = tokens[i + 1]
            i += 1
        elif (tok.startswith("-c") and len(tok) > 2) or (tok.startswith("--") and "=" in tok):
            pair = tok[2:]  # `-cname=value` or `--name=value`
        if pair is not None and "=" in pair:
            name, _, value = pair.partition("=")
            settings[name.strip().lower().replace("-", "_")] = value.strip().strip("'\"").lower()
        i += 1
    return settings


# --- the rules ---------------------------------------------------------------------------------


def shape_problems(doc: Mapping[str, Any]) -> list[str]:
    """Every way the parsed compose document breaks the tunnel shape; empty when it holds."""
    problems: list[str] = []
    services: Mapping[str, Any] = doc.get("services") or {}
    if "include" in doc:
        problems.append("top-level include: the shape must be one self-contained file")
    for name in REQUIRED_SERVICES:
        if name not in services:
            problems.append(f"service {name} is missing")

    internal = _internal_networks(doc)
    members: dict[str, set[str]] = {}
    for name, svc in services.items():
        if "extends" in svc:
            problems.append(f"{name}: extends hides part of the service from this check")
        if svc.get("ports"):
            problems.append(f"{name} publishes ports: {svc['ports']!r}")
        if "network_mode" in svc:
            problems.append(f"{name} sets network_mode {svc['network_mode']!r}")
        for net in _service_networks(svc):
            members.setdefault(net, set()).add(name)

    for net, who in sorted(members.items()):
        if net in internal:
            continue
        for name in sorted(who - EDGE_SERVICES):
            problems.append(f"{name} is on network {net}, which is not internal")
    data_nets = {
        net for name in DATA_PLANE if name in services for net in _service_networks(services[name])
    }
    if "cloudflared" in services:
        shared = _service_networks(services["cloudflared"]) & data_nets
        if shared:
            problems.append(f"cloudflared shares networks {sorted(shared)} with the data plane")
    if "relay" in services:
        relay_nets = _service_networks(services["relay"])
        for name in ("cloudflared", *DATA_PLANE):
            if name in services and not relay_nets & _service_networks(services[name]):
                problems.append(f"the relay shares no network with {name}")

    if "openbao" in services:
        problems += _openbao_problems(services["openbao"], doc)
    if "postgres" in services:
        problems += _postgres_problems(services["postgres"], doc)
    if "relay" in services:
        problems += _relay_problems(services["relay"])
    return problems


def _openbao_problems(svc: Mapping[str, Any], doc: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    argv = _tokens(svc.get("entrypoint")) + _tokens(svc.get("command"))
    if not argv:
        # The image's default command is `server -dev`.
        problems.append("openbao has no explicit command: the image defaults to dev mode")
    if any(t.lstrip("-").startswith("dev") and t.startswith("-") for t in argv):
        problems.append(f"openbao runs in dev mode: {argv!r}")
    if argv and ("server" not in argv or not any(t.startswith("-config") for t in argv)):
        problems.append(f"openbao must run `bao server -config=…`, not {argv!r}")
    dev_env = [k for k in _environment(svc) if re.match(r"(BAO|VAULT)_DEV_", k)]
    if dev_env:
        problems.append(f"openbao has dev-mode settings {dev_env}")
    if not _volume_targets(svc, doc):
        problems.append("openbao keeps no data on a named volume")
    return problems


def _postgres_problems(svc: Mapping[str, Any], doc: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    settings = _pg_settings(_tokens(svc.get("entrypoint")) + _tokens(svc.get("command")))
    for name, safe in SAFE_PG.items():
        if name not in settings:
            continue
        value = "on" if settings[name] in PG_TRUE else settings[name]
        if value not in safe:
            problems.append(f"postgres sets {name}={settings[name]}: acked events could be lost")
    env = _environment(svc)
    if env.get("POSTGRES_HOST_AUTH_METHOD", "").lower() == "trust":
        problems.append("postgres accepts connections without a password (trust)")
    pgdata = env.get("PGDATA", "/var/lib/postgresql/data").rstrip("/")
    if pgdata not in _volume_targets(svc, doc):
        problems.append(f"postgres keeps {pgdata} off a named volume")
    image = str(svc.get("image", ""))
    if not image.startswith("postgres:16"):
        problems.append(f"postgres image is {image!r}, not postgres:16")
    return problems


def _relay_problems(svc: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    build = svc.get("build")
    dockerfile = None
    if isinstance(build, Mapping):
        context = COMPOSE.parent / str(build.get("context", "."))
        dockerfile = (context / str(build.get("dockerfile", "Dockerfile"))).resolve()
    if dockerfile != DOCKERFILE.resolve():
        problems.append(f"the relay is not built from {DOCKERFILE.relative_to(ROOT)}")
    user = str(svc.get("user", "")).split(":")[0]
    if user in {"root", "0"}:
        problems.append("the relay runs as root")
    env = _environment(svc)
    unsafe = env.get("COZY_ALLOW_UNSAFE_DURABILITY", "0").strip().lower()
    if unsafe not in {"", "0", "false", "no", "off"}:
        problems.append("the relay allows an unsafe-durability Postgres")
    if "PGOPTIONS" in env:
        # libpq sends these with every session: `-c synchronous_commit=off` would weaken acks
        # for the relay's sessions alone (the relay's startup check reads them back, too).
        problems.append("the relay sets PGOPTIONS: session settings must not be overridden")
    command = _tokens(svc.get("command"))
    if command and command[:2] != ["relay", "serve"]:
        problems.append(f"the relay runs {command!r}, not `cozy relay serve`")
    return problems


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD arguments: the JSON exec form, or the shell form split into words."""
    try:
        value = json.loads(args)
    except ValueError:
        return shlex.split(args)
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _bootstrap_pins(text: str) -> set[str]:
    return set(re.findall(r'"((?:pdm|hishel)[^"]*)"', text))


def dockerfile_problems(text: str, makefile: str) -> list[str]:
    """How the relay image could install something other than the frozen lock, or run as root."""
    problems: list[str] = []
    steps = _instructions(text)
    runs = [args for word, args in steps if word == "RUN"]
    if not any(word == "COPY" and "pdm.lock" in args.split() for word, args in steps):
        problems.append("pdm.lock is not copied into the build")
    if not any(re.search(r"\bpdm sync\b", r) for r in runs):
        problems.append("dependencies are not installed with `pdm sync`")
    if not any(re.search(r"\bpdm lock --check\b", r) for r in runs):
        problems.append("the build does not fail on a stale lock (`pdm lock --check`)")
    for run in runs:
        for cmd in re.split(r"&&|;|\|\|", run):
            cmd = cmd.strip()
            if re.search(r"\bpdm lock\b", cmd) and "--check" not in cmd:
                problems.append(f"the build re-locks: {cmd!r}")
            if re.search(r"\bpdm (add|update|remove)\b", cmd):
                problems.append(f"the build changes the lock: {cmd!r}")
            if re.search(r"\bpdm install\b", cmd) and "--frozen-lockfile" not in cmd:
                problems.append(f"`pdm install` without --frozen-lockfile: {cmd!r}")
            if re.search(r"\b(pip|uv pip|pipx)\b.*\binstall\b", cmd):
                wanted = _bootstrap_pins(makefile)
                if not wanted or _bootstrap_pins(cmd) != wanted:
                    problems.append(f"pip installs outside the lock or the bootstrap pins: {cmd!r}")
    users = [args for word, args in steps if word == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append("the image runs as root (no final non-root USER)")
    entry = [args for word, args in steps if word == "ENTRYPOINT"]
    cmd = [args for word, args in steps if word == "CMD"]
    argv = (_exec_form(entry[-1]) if entry else []) + (_exec_form(cmd[-1]) if cmd else [])
    if argv[:3] != ["cozy", "relay", "serve"]:
        problems.append(f"the image runs {argv!r}, not `cozy relay serve`")
    return problems


def ingress_problems(config: Mapping[str, Any], relay_port: int = RELAY_PORT) -> list[str]:
    """cloudflared's ingress must reach the relay only, and 404 everything else."""
    rules = config.get("ingress")
    if not isinstance(rules, list) or not rules:
        return ["cloudflared.yml has no ingress rules"]
    problems: list[str] = []
    *routes, last = rules
    if last.get("hostname") or last.get("path") or last.get("service") != "http_status:404":
        problems.append(f"the last ingress rule is not a catch-all http_status:404: {last!r}")
    if not routes:
        problems.append("no ingress rule routes a hostname to the relay")
    for rule in routes:
        if not rule.get("hostname"):
            problems.append(f"an ingress rule before the catch-all matches every host: {rule!r}")
        if rule.get("service") != f"http://relay:{relay_port}":
            problems.append(f"an ingress rule routes somewhere other than the relay: {rule!r}")
    return problems


def openbao_config_problems(hcl: str, doc: Mapping[str, Any]) -> list[str]:
    """OpenBao's storage is persistent and sits on the openbao service's named volume."""
    match = re.search(r'storage\s+"(\w+)"\s*\{[^}]*?path\s*=\s*"([^"]+)"', hcl)
    if match is None:
        return ["openbao.hcl declares no storage with a path (in-memory storage loses secrets)"]
    kind, path = match.groups()
    problems = []
    if kind not in {"raft", "file"}:
        problems.append(f"openbao storage {kind!r} is not raft or file")
    svc = (doc.get("services") or {}).get("openbao") or {}
    if path.rstrip("/") not in _volume_targets(svc, doc):
        problems.append(f"openbao storage path {path} is not on a named volume")
    return problems


# --- the shipped files --------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _ingress() -> dict[str, Any]:
    doc = yaml.safe_load(INGRESS.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.objective("SO-6")
def test_the_shipped_compose_file_keeps_the_tunnel_shape():
    doc = _compose()
    assert shape_problems(doc) == []
    assert openbao_config_problems(OPENBAO_HCL.read_text(), doc) == []
    # docker compose merges compose.override.yaml silently: none may sit beside the shape.
    assert not list(DEPLOY.glob("*compose.override.*"))
    # Exactly one service is on a non-internal network with the relay, and it is cloudflared.
    internal = _internal_networks(doc)
    edge = {name for name, svc in doc["services"].items() if _service_networks(svc) - internal}
    assert edge == {"cloudflared", "relay"}


@pytest.mark.objective("SO-6")
def test_the_relay_image_installs_only_from_the_frozen_lock_as_a_non_root_user():
    assert dockerfile_problems(DOCKERFILE.read_text(), MAKEFILE.read_text()) == []
    # The pins the rule compares are really there (an empty set would compare equal).
    assert _bootstrap_pins(MAKEFILE.read_text()) >= {"pdm==2.29.4"}


@pytest.mark.objective("SO-6")
def test_cloudflared_routes_the_public_hostname_to_the_relay_and_404s_the_rest():
    relay_toml = tomllib.loads(RELAY_TOML.read_text())
    assert relay_toml["port"] == RELAY_PORT
    assert relay_toml.get("allow_unsafe_durability", False) is False
    assert ingress_problems(_ingress(), relay_toml["port"]) == []
    # cloudflared reads exactly this file.
    svc = _compose()["services"]["cloudflared"]
    argv = _tokens(svc["command"])
    config_path = argv[argv.index("--config") + 1]
    assert f"./cloudflared.yml:{config_path}:ro" in svc["volumes"]
    assert "tunnel" in argv
    assert "run" in argv


# --- every rule can fail -------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _svc(doc: dict[str, Any], name: str) -> dict[str, Any]:
    svc = doc["services"][name]
    assert isinstance(svc, dict)
    return svc


def _set(name: str, key: str, value: object) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        _svc(doc, name)[key] = value

    return mutate


def _drop(name: str, key: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        del _svc(doc, name)[key]

    return mutate


def _append_command(name: str, *args: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        _svc(doc, name)["command"] = [*_tokens(_svc(doc, name)["command"]), *args]

    return mutate


def _set_env(name: str, key: str, value: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        _svc(doc, name).setdefault("environment", {})[key] = value

    return mutate


def _network(key: str, value: object) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        if value is None:
            del doc["networks"]["data"][key]
        else:
            doc["networks"]["data"][key] = value

    return mutate


def _add_service(doc: dict[str, Any]) -> None:
    doc["services"]["adminer"] = {"image": "adminer", "networks": ["edge", "data"]}


def _remove_openbao(doc: dict[str, Any]) -> None:
    del doc["services"]["openbao"]


def _include(doc: dict[str, Any]) -> None:
    doc["include"] = ["more.yaml"]


def _postgres_long_volume_elsewhere(doc: dict[str, Any]) -> None:
    _svc(doc, "postgres")["volumes"] = [
        {"type": "volume", "source": "postgres-data", "target": "/somewhere/else"}
    ]


COMPOSE_MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "postgres short ports": (_set("postgres", "ports", ["5432:5432"]), "postgres publishes"),
    "openbao long-form ports": (
        _set("openbao", "ports", [{"target": 8200, "published": "8200", "protocol": "tcp"}]),
        "openbao publishes",
    ),
    "relay ports on loopback": (
        _set("relay", "ports", ["127.0.0.1:8765:8765"]),
        "relay publishes",
    ),
    "relay ops port": (_set("relay", "ports", ["9465"]), "relay publishes"),
    "cloudflared metrics port": (_set("cloudflared", "ports", ["2000:2000"]), "cloudflared"),
    "postgres host network": (_set("postgres", "network_mode", "host"), "network_mode"),
    "relay host network": (_set("relay", "network_mode", "host"), "network_mode"),
    "openbao in relay's namespace": (
        _set("openbao", "network_mode", "service:relay"),
        "network_mode",
    ),
    "data network not internal": (_network("internal", None), "not internal"),
    "data network internal as a string": (_network("internal", "yes"), "not internal"),
    "data network external": (_network("external", True), "not internal"),
    "postgres on the edge too": (
        _set("postgres", "networks", {"edge": {}, "data": {}}),
        "postgres is on network edge",
    ),
    "openbao on the default network": (_drop("openbao", "networks"), "openbao is on network"),
    "cloudflared on the data network": (
        _set("cloudflared", "networks", ["edge", "data"]),
        "cloudflared shares networks",
    ),
    "relay not on the data network": (
        _set("relay", "networks", ["edge"]),
        "shares no network with postgres",
    ),
    "another service on the edge": (_add_service, "adminer is on network edge"),
    "openbao missing": (_remove_openbao, "service openbao is missing"),
    "compose include": (_include, "include"),
    "relay extends": (_set("relay", "extends", {"file": "x.yaml", "service": "r"}), "extends"),
    "openbao -dev flag": (
        _set("openbao", "command", ["bao", "server", "-dev", "-dev-root-token-id=root"]),
        "dev mode",
    ),
    "openbao dev command string": (_set("openbao", "command", "server -dev"), "dev mode"),
    "openbao default command": (_drop("openbao", "command"), "dev mode"),
    "openbao without config": (_set("openbao", "command", ["bao", "server"]), "-config"),
    "openbao dev env": (_set_env("openbao", "BAO_DEV_ROOT_TOKEN_ID", "root"), "dev-mode"),
    "openbao without volume": (_drop("openbao", "volumes"), "named volume"),
    "postgres fsync off": (_append_command("postgres", "-c", "fsync=off"), "fsync=off"),
    "postgres synchronous_commit off, joined": (
        _append_command("postgres", "-csynchronous_commit=off"),
        "synchronous_commit=off",
    ),
    "postgres synchronous_commit local": (
        _append_command("postgres", "-c", "synchronous_commit=local"),
        "synchronous_commit=local",
    ),
    "postgres long option": (_append_command("postgres", "--fsync=false"), "fsync=false"),
    "postgres command string": (
        _set("postgres", "command", "postgres -c full_page_writes='off'"),
        "full_page_writes=off",
    ),
    "relay PGOPTIONS": (_set_env("relay", "PGOPTIONS", "-c synchronous_commit=off"), "PGOPTIONS"),
    "postgres trust auth": (
        _set_env("postgres", "POSTGRES_HOST_AUTH_METHOD", "trust"),
        "without a password",
    ),
    "postgres without volume": (_drop("postgres", "volumes"), "named volume"),
    "postgres volume elsewhere": (_postgres_long_volume_elsewhere, "named volume"),
    "postgres other major": (_set("postgres", "image", "postgres:13"), "postgres:16"),
    "relay as root": (_set("relay", "user", "0:0"), "runs as root"),
    "relay from an image": (_drop("relay", "build"), "not built from"),
    "relay other dockerfile": (
        _set("relay", "build", {"context": "../..", "dockerfile": "Dockerfile.dev"}),
        "not built from",
    ),
    "relay unsafe durability": (
        _set_env("relay", "COZY_ALLOW_UNSAFE_DURABILITY", "1"),
        "unsafe-durability",
    ),
    "relay runs something else": (_set("relay", "command", ["dev"]), "not `cozy relay serve`"),
}


@pytest.mark.objective("SO-6")
@pytest.mark.parametrize(
    ("mutate", "expected"), COMPOSE_MUTATIONS.values(), ids=COMPOSE_MUTATIONS.keys()
)
def test_each_compose_rule_fails_on_a_loosened_shape(mutate: Mutation, expected: str):
    doc = copy.deepcopy(_compose())
    mutate(doc)
    problems = shape_problems(doc)
    assert any(expected in p for p in problems), problems


DOCKERFILE_MUTATIONS: dict[str, tuple[str, str, str]] = {
    "pdm install instead of sync": (
        "pdm sync --prod --no-self --clean",
        "pdm install --prod --no-self",
        "without --frozen-lockfile",
    ),
    "no stale-lock check": ("&& /opt/pdm/bin/pdm lock --check \\\n", "", "stale lock"),
    "re-lock": ("pdm lock --check", "pdm lock", "re-locks"),
    "pdm update": ("pdm lock --check", "pdm update", "changes the lock"),
    "pip requirements": (
        "COPY model",
        "RUN /opt/cozy/bin/pip install -r requirements.txt\nCOPY model",
        "pip installs outside",
    ),
    "pip install the project": (
        "COPY model",
        "RUN pip install .\nCOPY model",
        "pip installs outside",
    ),
    "other pdm pin": ('"pdm==2.29.4"', '"pdm==2.30.0"', "bootstrap pins"),
    "unpinned pdm": ('"pdm==2.29.4"', '"pdm"', "bootstrap pins"),
    "no lock copied": ("COPY pyproject.toml pdm.lock README.md", "COPY pyproject.toml", "pdm.lock"),
    "no sync": ("pdm sync --prod --no-self --clean", "true", "pdm sync"),
    "root user": ("USER 10001:10001", "USER root", "runs as root"),
    "uid 0": ("USER 10001:10001", "USER 0", "runs as root"),
    "no user": ("USER 10001:10001\n", "", "runs as root"),
    "other command": ('CMD ["relay", "serve", "--json-logs"]', 'CMD ["dev"]', "cozy relay serve"),
}


@pytest.mark.objective("SO-6")
@pytest.mark.parametrize(
    ("old", "new", "expected"), DOCKERFILE_MUTATIONS.values(), ids=DOCKERFILE_MUTATIONS.keys()
)
def test_each_image_rule_fails_on_a_loosened_dockerfile(old: str, new: str, expected: str):
    text = DOCKERFILE.read_text()
    assert old in text  # the mutation really changes something
    problems = dockerfile_problems(text.replace(old, new), MAKEFILE.read_text())
    assert any(expected in p for p in problems), problems


def _without_catch_all(doc: dict[str, Any]) -> None:
    doc["ingress"].pop()


def _catch_all_first(doc: dict[str, Any]) -> None:
    doc["ingress"].reverse()


def _route_to_postgres(doc: dict[str, Any]) -> None:
    doc["ingress"].insert(0, {"hostname": "db.example.com", "service": "tcp://postgres:5432"})


def _catch_all_to_relay(doc: dict[str, Any]) -> None:
    doc["ingress"][-1]["service"] = "http://relay:8765"


def _catch_all_with_host(doc: dict[str, Any]) -> None:
    doc["ingress"][-1]["hostname"] = "relay.example.com"


def _route_without_host(doc: dict[str, Any]) -> None:
    del doc["ingress"][0]["hostname"]


def _only_catch_all(doc: dict[str, Any]) -> None:
    del doc["ingress"][0]


def _no_ingress(doc: dict[str, Any]) -> None:
    del doc["ingress"]


INGRESS_MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "no catch-all": (_without_catch_all, "catch-all"),
    "catch-all first": (_catch_all_first, "catch-all"),
    "route to postgres": (_route_to_postgres, "other than the relay"),
    "catch-all to the relay": (_catch_all_to_relay, "catch-all"),
    "catch-all with a hostname": (_catch_all_with_host, "catch-all"),
    "route without a hostname": (_route_without_host, "matches every host"),
    "no route to the relay": (_only_catch_all, "no ingress rule routes"),
    "no ingress": (_no_ingress, "no ingress rules"),
}


@pytest.mark.objective("SO-6")
@pytest.mark.parametrize(
    ("mutate", "expected"), INGRESS_MUTATIONS.values(), ids=INGRESS_MUTATIONS.keys()
)
def test_each_ingress_rule_fails_on_a_loosened_config(
    mutate: Callable[[dict[str, Any]], None], expected: str
):
    doc = copy.deepcopy(_ingress())
    mutate(doc)
    problems = ingress_problems(doc)
    assert any(expected in p for p in problems), problems


@pytest.mark.objective("SO-6")
@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('storage "raft"', 'storage "inmem"', "not raft or file"),
        ('path    = "/openbao/file"', 'path    = "/tmp/bao"', "not on a named volume"),
        ('path    = "/openbao/file"', "", "no storage with a path"),
    ],
    ids=["inmem storage", "storage off the volume", "no storage path"],
)
def test_the_openbao_storage_rule_fails_on_a_loosened_config(old: str, new: str, expected: str):
    text = OPENBAO_HCL.read_text()
    assert old in text
    problems = openbao_config_problems(text.replace(old, new), _compose())
    assert any(expected in p for p in problems), problems
