"""The startup durability check: refuse a Postgres that could lose acknowledged events.

An ack means the event is durable (SPEC §9). That promise is only as good as the database's
own: with ``fsync = off`` a power loss or OS crash can lose or corrupt committed rows, with
``full_page_writes = off`` a torn page can make a crash unrecoverable, and with
``synchronous_commit = off`` Postgres reports a commit before its WAL reaches disk, so a crash
loses the last acked events. ``local`` waits for the local disk but not for a synchronous
standby, so after a failover the newest acked events may be missing; the relay asks for
``on`` (or the stricter ``remote_write`` / ``remote_apply``) instead.

The settings are read from a ledger connection (`Ledger.durability_settings`), so per-database
and per-role overrides (``ALTER DATABASE … SET synchronous_commit = off``) are seen exactly as
the relay's own sessions see them. Benchmarks may run on an unsafe database on purpose with
``COZY_ALLOW_UNSAFE_DURABILITY=1``; the relay then starts and logs a loud warning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import structlog

from relay.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

log = structlog.get_logger("cozy.relay")

# The settings whose safe values are listed: anything else is refused.
SAFE_VALUES: Final[Mapping[str, frozenset[str]]] = {
    "fsync": frozenset({"on"}),
    "full_page_writes": frozenset({"on"}),
    "synchronous_commit": frozenset({"on", "remote_write", "remote_apply"}),
}
OVERRIDE_HINT: Final = (
    "set COZY_ALLOW_UNSAFE_DURABILITY=1 (or allow_unsafe_durability = true) only for a"
    " benchmark whose data you can lose"
)


class UnsafeDurability(ConfigError):
    """The database may lose committed transactions, so the relay's acks would be lies."""


def durability_problems(settings: Mapping[str, str]) -> list[str]:
    """What is unsafe about these Postgres settings, one sentence per setting ([] when safe).

    A setting missing from `settings` counts as unsafe: the relay could not confirm it.
    """
    problems = []
    for name, safe in SAFE_VALUES.items():
        value = settings.get(name)
        if value is None:
            problems.append(f"{name} could not be read (SHOW {name})")
        elif value.lower() not in safe:
            fix = "on" if name != "synchronous_commit" else "on (or remote_write/remote_apply)"
            problems.append(
                f"{name} = {value}: set it to {fix} in postgresql.conf, or undo an override with"
                f" ALTER DATABASE/ROLE … RESET {name}, then restart the relay"
            )
    return problems


def check_durability(settings: Mapping[str, str], *, allow_unsafe: bool) -> None:
    """Raise `UnsafeDurability` naming each unsafe setting, unless `allow_unsafe` (then warn)."""
    problems = durability_problems(settings)
    if not problems:
        return
    if allow_unsafe:
        log.warning(
            "UNSAFE_DURABILITY",
            problems=problems,
            message="acknowledged events may be lost on a crash: allowed by"
            " COZY_ALLOW_UNSAFE_DURABILITY for benchmarks only; never run users on this",
        )
        return
    raise UnsafeDurability(
        "the database could lose acknowledged events on a crash, so the relay will not start: "
        + "; ".join(problems)
        + f". To {OVERRIDE_HINT}."
    )
