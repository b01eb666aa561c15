"""What every wire frame shares: the tagged base Struct and the error codes (see model/wire.py).

Its own module so that the request and reply frames can live in separate modules of a readable
size; everything here is re-exported by `model.wire`, the one place callers import frames from.
"""

from __future__ import annotations

import enum

import msgspec


class ErrorCode(enum.StrEnum):
    MALFORMED_FRAME = "malformed_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNAUTHENTICATED = "unauthenticated"
    UNAUTHORIZED = "unauthorized"
    INVALID_CREDENTIALS = "invalid_credentials"
    RATE_LIMITED = "rate_limited"
    STALE = "stale"
    HANDLE_TAKEN = "handle_taken"
    INVALID_REQUEST = "invalid_request"
    INVALID_EVENT = "invalid_event"
    BAD_SIGNATURE = "bad_signature"
    NOT_FOUND = "not_found"
    OVERLOADED = "overloaded"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    QUOTA_EXCEEDED = "quota_exceeded"
    WEAK_KEYSTORE = "weak_keystore"
    TOOL_FAILED = "tool_failed"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class _Frame(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True):
    pass
