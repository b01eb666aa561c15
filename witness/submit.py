"""Asking a C2SP tlog witness to cosign a checkpoint: `POST <prefix>/add-checkpoint`.

The I/O half of the witness protocol's client side (the bodies are `model.tlog`'s). It is what a
relay calls to gather cosignatures; it holds no state. h11 frames the HTTP/1.1 exchange and Trio
moves the bytes (TLS for https:// prefixes, with the system's trust store). One connection per
call: a relay asking a handful of witnesses once per commit group does not need keep-alive yet.

Every answer but 200 becomes a typed `WitnessError` (witness/errors.py). A 200 is parsed as
signature lines; given the witness's key, only its lines that verify over the checkpoint are
returned, and a 200 with none is `WitnessReplyInvalid` (the spec tells clients to ignore lines
from unknown keys, so those are dropped, not refused).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import h11
import trio

from model.note import NoteError, open_note
from model.tlog import (
    MalformedWitnessMessage,
    add_signatures,
    parse_cosignature_reply,
    parse_size_body,
)
from witness.errors import (
    WitnessBadRequest,
    WitnessConflict,
    WitnessProofRejected,
    WitnessReplyInvalid,
    WitnessUnavailable,
    WitnessUnknownLog,
    WitnessUntrustedSignature,
)

if TYPE_CHECKING:
    from model.note import NoteSignature, NoteVerifier
    from model.tlog import AddCheckpointRequest

SUBMIT_TIMEOUT: Final = 10.0
MAX_REPLY_BYTES: Final = 64 * 1024
_RECEIVE_BYTES: Final = 16 * 1024


async def submit_checkpoint(
    url: str,
    request: AddCheckpointRequest,
    *,
    witness: NoteVerifier | None = None,
) -> tuple[NoteSignature, ...]:
    """Submit `request` to the witness whose submission prefix is `url`; return its cosignatures.

    With `witness` (its verifier key, type 0x04), only that key's cosignature lines that verify
    over the checkpoint are returned; without it, every line the witness sent (check them with
    `model.tlog.open_checkpoint` before counting them). Add them to the note with
    `model.tlog.add_signatures`. A caller wanting a tighter bound than SUBMIT_TIMEOUT wraps
    the call in its own cancel scope.

    Raises `WitnessConflict` (409, with the witness's `size`), `WitnessProofRejected` (422),
    `WitnessUnknownLog` (404), `WitnessUntrustedSignature` (403), `WitnessBadRequest` (400,
    413), `WitnessUnavailable` (unreachable, no answer within SUBMIT_TIMEOUT, another status),
    `WitnessReplyInvalid` (a 200 that is not a cosignature by `witness`); `ValueError` for a
    URL that is not http(s)://.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a witness URL is http(s)://host[:port][/prefix], not {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path.rstrip("/") + "/add-checkpoint"
    body = request.encode()
    with trio.move_on_after(SUBMIT_TIMEOUT) as waited:
        try:
            status, content_type, reply = await _post(
                parts.scheme, parts.hostname, port, parts.netloc, target, body
            )
        except (OSError, trio.BrokenResourceError, h11.ProtocolError, _ReplyTooLarge) as exc:
            raise WitnessUnavailable(
                f"no usable answer ({type(exc).__name__}); retry later", url=url
            ) from None
    if waited.cancelled_caught:
        raise WitnessUnavailable(f"no answer within {SUBMIT_TIMEOUT:g} s; retry later", url=url)
    if status == 200:
        return _cosignatures(url, request, reply, witness)
    said = _printable(reply)
    if status == 409:
        try:
            size = parse_size_body(reply)
        except MalformedWitnessMessage:
            raise WitnessUnavailable(
                "409 without a tree size in its body; it does not speak tlog-witness",
                url=url,
                status=409,
            ) from None
        raise WitnessConflict(
            f"its last cosigned size for this log is {size}, not {request.old_size}"
            f" ({content_type or 'no content type'}); resubmit with a proof from {size}",
            url=url,
            size=size,
        )
    kinds: dict[int, type[WitnessBadRequest | WitnessProofRejected]] = {
        400: WitnessBadRequest,
        413: WitnessBadRequest,
        422: WitnessProofRejected,
    }
    if status in kinds:
        raise kinds[status](f"refused ({status}): {said}", url=url, status=status)
    if status == 404:
        raise WitnessUnknownLog(
            f"does not witness this origin (404: {said}); ask its operator to add the log",
            url=url,
            status=404,
        )
    if status == 403:
        raise WitnessUntrustedSignature(
            f"trusts no key that signed this checkpoint (403: {said}); check the log key it "
            "was given",
            url=url,
            status=403,
        )
    raise WitnessUnavailable(f"answered {status}: {said}; retry later", url=url, status=status)


def _cosignatures(
    url: str, request: AddCheckpointRequest, reply: bytes, witness: NoteVerifier | None
) -> tuple[NoteSignature, ...]:
    try:
        lines = parse_cosignature_reply(reply)
    except MalformedWitnessMessage:
        raise WitnessReplyInvalid("its 200 is not signature lines", url=url, status=200) from None
    if witness is None:
        return lines
    mine = tuple(s for s in lines if s.name == witness.name and s.key_id == witness.key_id)
    try:
        opened = open_note(add_signatures(request.checkpoint, mine), [witness])
    except NoteError:
        raise WitnessReplyInvalid(
            f"its 200 holds no valid cosignature by {witness.name} over this checkpoint",
            url=url,
            status=200,
        ) from None
    return opened.verified


class _ReplyTooLarge(Exception):
    pass


async def _post(
    scheme: str, host: str, port: int, netloc: str, target: str, body: bytes
) -> tuple[int, str, bytes]:
    """One POST; (status, content type, body)."""
    stream: trio.abc.Stream
    if scheme == "https":
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl.create_default_context()
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        data = conn.send(
            h11.Request(
                method="POST",
                target=target,
                headers=[
                    ("host", netloc.rpartition("@")[2]),
                    ("content-length", str(len(body))),
                    ("content-type", "text/plain; charset=utf-8"),
                    ("user-agent", "cozy-witness-client"),
                    ("connection", "close"),
                ],
            )
        )
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        response: h11.Response | None = None
        reply = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(_RECEIVE_BYTES)))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                reply += event.data
                if len(reply) > MAX_REPLY_BYTES:
                    raise _ReplyTooLarge
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    if response is None:
        raise h11.RemoteProtocolError("the connection closed before an answer")
    content_type = dict(response.headers).get(b"content-type", b"").decode("latin-1")
    return response.status_code, content_type, bytes(reply)


def _printable(reply: bytes) -> str:
    """The witness's own words, one line, bounded, with nothing a terminal would interpret."""
    text = reply.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
    return "".join(c if c.isprintable() else "?" for c in text) or "no reason given"
