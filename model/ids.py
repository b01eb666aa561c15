"""Opaque identifiers: 128 random bits, lowercase base32 without padding (26 characters)."""

from __future__ import annotations

import base64
import re

from model._crypto import random_bytes

_ID_RE = re.compile(r"^[a-z]_[a-z2-7]{26}$")


def new_id(prefix: str) -> str:
    """A fresh random id such as ``c_…`` (collab) or ``a_…`` (account)."""
    if not re.fullmatch(r"[a-z]", prefix):
        raise ValueError("id prefix must be one lowercase letter")
    raw = base64.b32encode(random_bytes(16)).decode("ascii").rstrip("=").lower()
    return f"{prefix}_{raw}"


def is_id(value: str, prefix: str) -> bool:
    return bool(_ID_RE.fullmatch(value)) and value[0] == prefix
