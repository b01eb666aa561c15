"""A C2SP `tlog-witness` anyone can run: `cozy witness serve` (docs/witness.md).

It cosigns a log's checkpoint only when the log's signature verifies and the checkpoint is
consistent with the last one it cosigned for that origin, and it records that checkpoint
durably before answering. The decision itself is pure (`model.tlog.witness_add_checkpoint`);
this package is its I/O half: the state directory, the trusted-log configuration and the HTTP
listener. It imports `model` only, never the relay or the client kit.

The public names load on first use (PEP 562): the client kit imports `witness.errors` and
`witness.submit` for every command, and must not pay for the HTTP server, structlog and its
console renderer (about 0.5 s at start-up) to name an exception.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from witness._http import WitnessServer as WitnessServer
    from witness._logs import LogConfigError as LogConfigError
    from witness._logs import TrustedLogs as TrustedLogs
    from witness._logs import build_trusted_logs as build_trusted_logs
    from witness._state import WitnessStateError as WitnessStateError
    from witness._state import WitnessStore as WitnessStore
    from witness._state import init_state as init_state
    from witness._state import open_state as open_state

_EXPORTS: Final = {
    "WitnessServer": "witness._http",
    "LogConfigError": "witness._logs",
    "TrustedLogs": "witness._logs",
    "build_trusted_logs": "witness._logs",
    "WitnessStateError": "witness._state",
    "WitnessStore": "witness._state",
    "init_state": "witness._state",
    "open_state": "witness._state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'witness' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
