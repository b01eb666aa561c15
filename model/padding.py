"""Size buckets for sealed content (ADR-0016): what goes inside the AEAD, so sizes say less.

An event's ciphertext is as long as its plaintext plus a fixed tag, so without padding the
relay — and anyone with a copy of its database — learns every message's exact length. Content
is therefore padded to a *bucket* before it is sealed:

    padded = MARKER ‖ content ‖ 0x80 ‖ 0x00 … 0x00          (len(padded) = a bucket size)

The buckets: 256 bytes, then each power of two up to 8 KiB (512, 1 KiB, 2 KiB, 4 KiB, 8 KiB),
then every multiple of 8 KiB; the last one is cut to what still fits in an event body, so a
message near the limit is as long as the limit allows. Within a bucket all contents have the
same sealed size.

Removal is unambiguous: `MARKER` (0x00) first — a byte no unpadded content starts with, since
content is always a msgpack map or array — then the content, one 0x80, and only zeros after
it (ISO/IEC 7816-4 padding). Anything else is refused (`BadPadding`), and because the padding
is inside the AEAD nobody without the key can change it. Content sealed before padding existed
has no marker and is returned as it is (`unpad`), so old histories stay readable.

Readers check the padding's form, not that its length is one of today's buckets, so a later
bucket table needs no reader change. Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

MARKER: Final = 0x00
_END: Final = 0x80
MIN_BUCKET: Final = 256
STEP_FROM: Final = 8 * 1024
"""Powers of two up to here, then every multiple of it."""


class BadPadding(ValueError):
    """Padded content whose padding is malformed. Callers turn it into their opaque error."""


def bucket_size(length: int) -> int:
    """The smallest bucket holding `length` bytes (marker and end byte included). Pure."""
    if length <= MIN_BUCKET:
        return MIN_BUCKET
    if length <= STEP_FROM:
        return 1 << (length - 1).bit_length()
    return -(-length // STEP_FROM) * STEP_FROM


def pad(content: bytes, *, limit: int) -> bytes:
    """`content` padded to its bucket, or to `limit` when the bucket would not fit under it.

    Raises `ValueError` when even `limit` bytes cannot hold the content and the two framing
    bytes.
    """
    need = len(content) + 2
    if need > limit:
        raise ValueError(f"{len(content)} bytes of content do not fit in {limit} padded bytes")
    size = min(bucket_size(need), limit)
    return bytes([MARKER]) + content + b"\x80" + bytes(size - need)


def unpad(padded: bytes) -> bytes:
    """The content inside `padded`. Raises `BadPadding` when the padding is malformed.

    Plaintext without the marker byte was sealed before padding existed and is returned whole.
    """
    if not padded or padded[0] != MARKER:
        return padded
    body = padded.rstrip(b"\x00")
    if len(body) < 2 or body[-1] != _END:
        raise BadPadding("the content's padding is malformed")
    return body[1:-1]
