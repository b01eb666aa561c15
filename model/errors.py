"""Errors raised by the pure core. Each names what went wrong and what the caller can do next."""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error the pure core raises."""


class InvalidEvent(ModelError):
    """The event is not well-formed (encoding, field values or size). Fix the sender."""


class BadSignature(ModelError):
    """The signature does not verify under the key registered for the claimed author."""


class ChainMismatch(ModelError):
    """A sequenced event's chain hash is not the hash of its predecessor and itself."""
