"""How the CLI reports a failure: one line on stderr that says what to do next, and an exit code.

Every command's errors end up here (`report`), never as a traceback: a person who mistyped a URL
or a passphrase needs the next step, not our call stack. Text that came from the relay (a
refusal's message) or from a file is made printable and kept on one line, so a relay cannot
write terminal escapes or fake extra lines into a person's terminal. An error nobody expected
is a bug: it is named by its type only (its text could hold anything, a secret included), and
COZY_DEBUG=1 shows the traceback to report.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from typing import Final

import trio
import trio_websocket

from clientkit._agent import CredentialsError
from clientkit._cli_session import EXIT_FAILED, EXIT_INTEGRITY, CliError
from clientkit._home import HomeError
from clientkit.errors import (
    ClientError,
    ConnectionLost,
    EquivocationDetected,
    IntegrityAlarm,
    RelayRefused,
)
from model import wire
from model.excgroups import innermost

DEBUG_ENV: Final = "COZY_DEBUG"
EXIT_INTERRUPTED: Final = 130

# The next step for refusals whose text (the relay's own) does not say one.
_NEXT_STEP: Final = {
    wire.ErrorCode.INVALID_CREDENTIALS: "check the handle and the login password"
    " (COZY_PASSWORD), then try again",
    wire.ErrorCode.UNAUTHENTICATED: "run `cozy account login`",
    wire.ErrorCode.SHUTTING_DOWN: "the relay is restarting: try again in a moment",
    wire.ErrorCode.OVERLOADED: "the relay is busy: try again in a moment",
    wire.ErrorCode.INTERNAL: "try again; if it keeps failing, tell the relay's operator",
}


def report(exc: BaseException) -> int:
    """Print `exc` as one line on stderr; return the exit code. Re-raises what is not a
    failure (SystemExit), and anything unexpected when COZY_DEBUG is set."""
    error = innermost(exc)
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, SystemExit):
        raise error
    if isinstance(error, IntegrityAlarm):
        _say(f"INTEGRITY ALARM: {error}")
        if isinstance(error, EquivocationDetected):
            from clientkit._cli_messages import _export_proof

            _export_proof(error)
        return EXIT_INTEGRITY
    message = _message(error)
    if message is None:
        if os.environ.get(DEBUG_ENV):
            raise exc
        message = (
            f"unexpected {type(error).__name__} (a bug in cozy): run it again with"
            f" {DEBUG_ENV}=1 for the traceback, and report it"
        )
    _say(f"error: {message}")
    return EXIT_FAILED


def _message(error: BaseException) -> str | None:
    """The one-line text for an error we know, None for one we do not."""
    match error:
        case RelayRefused(code=code) if type(error) is RelayRefused and code in _NEXT_STEP:
            return f"{error}; {_NEXT_STEP[code]}"
        case ConnectionLost(reason=reason):
            return (
                f"the connection to the relay closed ({reason or 'no reason given'}); try again"
                " (the relay may be restarting)"
            )
        case CliError() | ClientError() | HomeError() | CredentialsError():
            return str(error)
        case trio_websocket.ConnectionClosed() | trio_websocket.HandshakeError():
            return "the connection to the relay broke off; try again (the relay may be restarting)"
        case sqlite3.DatabaseError():
            return (
                f"this device's verified state in COZY_HOME (state.db) cannot be used ({error}):"
                " restore it from a backup, or move it away to start afresh (this device then"
                " forgets the heads and receipts it verified)"
            )
        case trio.TooSlowError():
            return "the relay did not answer in time; check that it is running, then try again"
        case OSError(filename=str() as name) if name:
            return f"{name}: {error.strerror}"
        case OSError():
            return f"cannot reach the relay ({error.strerror or error}); is it running?"
    return None


def _say(line: str) -> None:
    """One printable line on stderr, whatever the text held (a relay's words included)."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in line).split())
    print(flat, file=sys.stderr)
