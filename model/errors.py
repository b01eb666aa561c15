"""Errors raised by the pure core. Each names what went wrong and what the caller can do next."""

from __future__ import annotations

import msgspec


class ModelError(Exception):
    """Base of every error the pure core raises."""


class InvalidEvent(ModelError):
    """The event is not well-formed (encoding, field values or size). Fix the sender."""


class BadSignature(ModelError):
    """The signature does not verify under the key registered for the claimed author."""


class ChainMismatch(ModelError):
    """A sequenced event's chain hash is not the hash of its predecessor and itself."""


# msgspec raises more than DecodeError on hostile input: invalid UTF-8 surfaces as
# UnicodeDecodeError and deep nesting as RecursionError (msgspec issue #714). Every decoder of
# untrusted bytes catches all three.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
