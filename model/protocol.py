"""What outlives any one version of the wire protocol: its name, how a client learns the
relay's, and the WebSocket close codes (docs/protocol.md "Versions", ADR-0021).

Frames refuse fields they do not know (model/wire.py), so a client cannot decode a newer
relay's `welcome` with its own frame types. It reads the relay's first message here instead,
leniently and for two keys only (`t` and `protocol`, which every version keeps), and turns a
mismatch into one line that says who must upgrade, not a decode failure.

What does not live here: the frames themselves (model/wire.py) and raising the client's error
(clientkit). Pure: no sockets, no trio.
"""

from __future__ import annotations

import enum
import re
from typing import Final

import msgspec

from model.errors import DECODE_ERRORS

# The name of the protocol this code speaks. It changes (cozylabs/2, …) whenever a relay sends
# something an older client of the same name could not decode or would misread (ADR-0021).
PROTOCOL: Final = "cozylabs/2"

_NAME = re.compile(r"cozylabs/([1-9][0-9]{0,8})")
_probe = msgspec.msgpack.Decoder()


class CloseCode(enum.IntEnum):
    """Every WebSocket close code a CozyLabs peer sends, with its meaning (docs/protocol.md
    "Close codes"). 1000-1015 are RFC 6455's; 4000-4999 are this protocol's."""

    NORMAL = 1000  # either side ends the connection on purpose (clientkit's default close)
    GOING_AWAY = 1001  # the relay is shutting down: reconnect later and resume
    PROTOCOL_ERROR = 1002  # the client cannot read what the relay sent (or its version)
    MESSAGE_TOO_BIG = 1009  # the WebSocket layer: a message over WS_HARD_LIMIT
    AUTH_TIMEOUT = 4001  # no login within auth_timeout_seconds of connecting
    EVICTED = 4002  # the oldest of too many connections waiting to log in
    AGENT_REVOKED = 4003  # the agent this connection is logged in as was revoked
    LAGGING = 4008  # the client did not read fast enough: reconnect and resume


def announced_protocol(message: bytes) -> str | None:
    """The `protocol` a relay's first message announces, or None if it announces none.

    Reads only `t` and `protocol` of the first frame (inside a `batch` too, the relay may
    coalesce the welcome with what follows), ignoring every other key, so any version's welcome
    answers here. None: not msgpack, not a `welcome`, or no string `protocol`.
    """
    try:
        value = _probe.decode(message)
    except DECODE_ERRORS:
        return None
    if isinstance(value, dict) and value.get("t") == "batch":
        frames = value.get("frames")
        value = frames[0] if isinstance(frames, list) and frames else None
    if not isinstance(value, dict) or value.get("t") != "welcome":
        return None
    protocol = value.get("protocol")
    return protocol if isinstance(protocol, str) else None


def mismatch_message(relay_protocol: str | None, ours: str = PROTOCOL) -> str:
    """One line for a relay that speaks `relay_protocol` to a client that speaks `ours`: who is
    behind, and what to do. `relay_protocol` None: the server announced no protocol at all."""
    theirs = _version(relay_protocol) if relay_protocol is not None else None
    mine = _version(ours)
    if relay_protocol is None:
        return (
            f"the server did not introduce itself as a CozyLabs relay (this client speaks {ours}):"
            " check the relay URL"
        )
    shown = "".join(c if c.isprintable() else "?" for c in relay_protocol[:40])
    if theirs is None or mine is None:
        return f"the server speaks {shown!r}, not {ours}: check the relay URL"
    if theirs > mine:
        return (
            f"the relay speaks {shown}, newer than this client ({ours}): upgrade this client"
            f" to a release that speaks {shown}"
        )
    return (
        f"the relay speaks {shown}, older than this client ({ours}): ask its operator to"
        f" upgrade the relay, or use a client release that speaks {shown}"
    )


def _version(name: str) -> int | None:
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None
