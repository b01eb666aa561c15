"""What `cozy` loads before it runs a people's command.

Every `cozy post`, `cozy tail`, `cozy --help` is a fresh process, and a person (or a script, or
this suite, which runs a few hundred of them) waits for its imports each time. The server side
(the relay, Postgres, OpenBao, the witness's HTTP listener, structlog and the `rich` console it
picks up) and the passphrase strength estimator cost about 0.9 s of the ~1.4 s start-up they
once took, and none of them is needed to parse arguments or to talk to a relay as a client.
import-linter cannot see this: importing `witness.errors` runs `witness/__init__.py` first, an
edge its graph does not hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

# Each was imported by `import cozy.cli` before the start-up was trimmed, or would be by a
# careless top-level import of the server side.
SERVER_SIDE = (
    "witness._http",
    "httpserve",
    "structlog",
    "rich",
    "zxcvbn",
    "relay",
    "ledger",
    "fanout",
    "psycopg",
    "pgserver",
    "hvac",
    "jwt",
    "requests",
    "prometheus_client",
)

_PROBE = r"""
import sys
from cozy import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print("\nloaded:", *sorted(sys.modules))
"""


def _loaded_after(*argv: str, home: Path) -> set[str]:
    """The modules loaded by a fresh interpreter once `cozy ARGV` has run (in COZY_HOME `home`)."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        env={**os.environ, "COZY_HOME": str(home)},
        capture_output=True,
        check=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    last = result.stdout.decode().splitlines()[-1].split()  # after the help text, if any
    assert last[0] == "loaded:"
    return set(last[1:])


def _heavy(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if m.split(".")[0] in SERVER_SIDE or m in SERVER_SIDE)


def test_cozy_help_loads_nothing_of_the_server_side(tmp_path: Path) -> None:
    loaded = _loaded_after("--help", home=tmp_path)
    assert "clientkit.cli" in loaded  # the probe did build the parser
    assert _heavy(loaded) == []


def test_a_client_command_that_fails_early_loads_nothing_of_the_server_side(
    tmp_path: Path,
) -> None:
    # `cozy tail` without an account gets as far as reading COZY_HOME, through the whole
    # client kit and Trio, and fails there: what every people's command loads, and no more.
    loaded = _loaded_after("tail", "0" * 32, home=tmp_path / "no-account-here")
    assert {"trio", "clientkit._cli_tail"} <= loaded
    assert _heavy(loaded) == []
