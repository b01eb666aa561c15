"""Which logs a witness accepts: their public keys and the origins each may sign for.

A witness cosigns only for logs its operator chose (tlog-witness: unknown origin is 404, no
trusted signature is 403); otherwise anyone could make it store and sign anything. Two shapes:

- an exact log: a verifier key string, for the origin named in it (C2SP's convention: a log's
  key name is its origin) or for an origin given beside it;
- a relay: a verifier key string and an origin prefix such as `relay.example/collab/`. A cozy
  relay keeps one tree per collab (ADR-0020) and signs each with its one key under the
  collab's origin as key name, so the witness checks a checkpoint for origin O under the
  prefix with the relay's public key named O. The name in the given key string only
  identifies the key; its public key is what is used.

Config file (TOML, `--config`)::

    [[log]]
    vkey = "example.com/log+a1b2c3d4+AU..."      # origin: the key's name
    [[log]]
    vkey = "relay.example+0badc0de+AU..."
    origin_prefix = "relay.example/collab/"
    [[log]]
    vkey = "other+12345678+AU..."
    origin = "other.example/tree"
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from model.note import ALG_ED25519, MalformedVerifierKey, NoteVerifier, is_valid_key_name

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

MAX_PREFIX_ORIGIN: Final = 1024
"""Longest origin accepted under a prefix (an origin is also the key name checked)."""


class LogConfigError(ValueError):
    """A `--log`, `--log-prefix` or config-file entry is not usable. One line, says which."""


@dataclass(frozen=True, slots=True)
class TrustedLogs(Mapping[str, Sequence[NoteVerifier]]):
    """origin -> the log keys trusted for it, as `model.tlog.witness_add_checkpoint` reads it.

    Exact origins come first; an origin under a configured prefix gets the prefix's public key
    under the origin's own name. Iteration lists the exact origins only (prefixes are open sets).
    """

    exact: Mapping[str, tuple[NoteVerifier, ...]]
    prefixes: tuple[tuple[str, NoteVerifier], ...] = ()

    def __getitem__(self, origin: str) -> Sequence[NoteVerifier]:
        found = self.exact.get(origin)
        if found:
            return found
        keys = tuple(
            NoteVerifier(origin, key.alg, key.public_key)
            for prefix, key in self.prefixes
            if origin.startswith(prefix)
            and len(origin) > len(prefix)
            and len(origin) <= MAX_PREFIX_ORIGIN
            and is_valid_key_name(origin)
        )
        if not keys:
            raise KeyError(origin)
        return keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.exact)

    def __len__(self) -> int:
        return len(self.exact)

    def describe(self) -> list[str]:
        """One line per configured log, for the start-up banner."""
        lines = [f"{o} ({', '.join(k.vkey() for k in ks)})" for o, ks in self.exact.items()]
        lines += [f"{p}* ({k.vkey()})" for p, k in self.prefixes]
        return lines


def _log_key(vkey: str, where: str) -> NoteVerifier:
    try:
        key = NoteVerifier.from_vkey(vkey.strip())
    except MalformedVerifierKey as exc:
        raise LogConfigError(f"{where}: {exc} (copy the log's verifier key string)") from None
    if key.alg != ALG_ED25519:
        raise LogConfigError(
            f"{where}: {key.name} is a cosignature key (type 0x04); a log signs checkpoints "
            "with an Ed25519 note key (type 0x01)"
        )
    return key


def build_trusted_logs(
    *,
    logs: Sequence[str] = (),
    prefixed: Sequence[tuple[str, str]] = (),
    config: Path | None = None,
) -> TrustedLogs:
    """From `--log VKEY`, `--log-prefix PREFIX VKEY` and a TOML file. Raises `LogConfigError`."""
    exact: dict[str, list[NoteVerifier]] = {}
    prefixes: list[tuple[str, NoteVerifier]] = []

    def add_exact(origin: str, key: NoteVerifier, where: str) -> None:
        if not origin or "\n" in origin:
            raise LogConfigError(f"{where}: an origin is one non-empty line")
        if key not in exact.setdefault(origin, []):
            exact[origin].append(key)

    def add_prefix(prefix: str, key: NoteVerifier, where: str) -> None:
        if not prefix or not is_valid_key_name(prefix):
            raise LogConfigError(
                f"{where}: the origin prefix must be non-empty with no spaces or '+' (origins "
                "under it are key names), e.g. relay.example/collab/"
            )
        prefixes.append((prefix, key))

    for vkey in logs:
        key = _log_key(vkey, "--log")
        add_exact(key.name, key, "--log")
    for prefix, vkey in prefixed:
        add_prefix(prefix, _log_key(vkey, "--log-prefix"), "--log-prefix")
    if config is not None:
        try:
            data = tomllib.loads(config.read_text())
        except OSError as exc:
            raise LogConfigError(f"cannot read {config}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise LogConfigError(f"{config} is not valid TOML: {exc}") from None
        entries = data.get("log", [])
        unknown = set(data) - {"log"}
        if unknown or not isinstance(entries, list):
            raise LogConfigError(f"{config}: only [[log]] tables are read here")
        for i, entry in enumerate(entries, 1):
            where = f"{config} [[log]] #{i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("vkey"), str):
                raise LogConfigError(f'{where}: needs vkey = "<verifier key string>"')
            extra = set(entry) - {"vkey", "origin", "origin_prefix"}
            if extra or ("origin" in entry and "origin_prefix" in entry):
                raise LogConfigError(
                    f"{where}: holds vkey and at most one of origin / origin_prefix"
                )
            key = _log_key(entry["vkey"], where)
            if "origin_prefix" in entry:
                add_prefix(str(entry["origin_prefix"]), key, where)
            else:
                add_exact(str(entry.get("origin", key.name)), key, where)
    if not exact and not prefixes:
        raise LogConfigError(
            "no log configured: a witness cosigns only for logs you name; pass --log VKEY, "
            "--log-prefix PREFIX VKEY, or --config FILE with [[log]] entries"
        )
    return TrustedLogs({o: tuple(ks) for o, ks in exact.items()}, tuple(prefixes))
