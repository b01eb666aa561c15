"""A C2SP `tlog-witness` anyone can run: `cozy witness serve` (docs/witness.md).

It cosigns a log's checkpoint only when the log's signature verifies and the checkpoint is
consistent with the last one it cosigned for that origin, and it records that checkpoint
durably before answering. The decision itself is pure (`model.tlog.witness_add_checkpoint`);
this package is its I/O half: the state directory, the trusted-log configuration and the HTTP
listener. It imports `model` only, never the relay or the client kit.
"""

from witness._http import WitnessServer as WitnessServer
from witness._logs import LogConfigError as LogConfigError
from witness._logs import TrustedLogs as TrustedLogs
from witness._logs import build_trusted_logs as build_trusted_logs
from witness._state import WitnessStateError as WitnessStateError
from witness._state import WitnessStore as WitnessStore
from witness._state import init_state as init_state
from witness._state import open_state as open_state
