"""SO-6: every malformed, oversized or unauthenticated frame gets a typed refusal on its own
connection, nothing is stored, and the connection stays usable.

A raw WebSocket against a real relay on a real Postgres sends a table of hostile frames — a text
frame, truncated msgpack, an unknown tag, a missing rid, a frame over the limit, a nested batch,
an overlong batch, and every request type of the wire while not logged in — each followed by a
ping on the same connection. Every frame must be answered with the stated error code (never
`internal`) and the rid it carried when it had one; then the ping must be answered; and at the
end no table holds a row more. The unauthenticated rows are generated from the wire's list of
request types, so a new request type is covered (or fails here) without anyone remembering it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import msgspec
import msgspec.inspect as mi
import psycopg
import pytest
import trio

from clientkit._transport import FrameReader, open_websocket
from model import authz, wire
from model.envelope import SignedEvent
from tests.relay_harness import sign_up

if TYPE_CHECKING:
    from relay._server import Relay

SENTINEL: Final = 2**40
# Login failures are counted by design (the throttle), so that table is not compared.
TABLES: Final = ("accounts", "collabs", "collab_members", "events", "keystores", "artifacts",
                 "artifact_pieces")  # fmt: skip
REQUEST_TYPES: Final = tuple(c for c in typing.get_args(wire.Request) if c is not wire.Batch)
# The requests anyone may send without a session; each has its own row below.
OPEN_TO_ANYONE: Final = {wire.Ping, wire.Signup, wire.Login, wire.Authenticate}


@dataclass(frozen=True)
class Case:
    name: str
    message: bytes | str
    errors: tuple[tuple[wire.ErrorCode, int | None], ...]  # (code, rid) expected, in order
    pongs: int = 0  # pongs of pings inside the frame, besides the sentinel's


def _dummy(t: mi.Type) -> object:
    """Some value of type `t` (the content never matters: the session is checked first)."""
    match t:
        case mi.IntType():
            return 7
        case mi.StrType():
            return "x"
        case mi.BytesType():
            return b"x"
        case mi.BoolType():
            return False
        case mi.UnionType(types=types):
            return None if any(isinstance(u, mi.NoneType) for u in types) else _dummy(types[0])
        case mi.DictType():
            return {}
        case mi.ListType():
            return []
        case mi.StructType(cls=cls) if cls is SignedEvent:
            return SignedEvent(body=b"body", sig=b"s" * 64)
    raise AssertionError(f"no dummy value for {t!r}: extend _dummy")


def unauthenticated_request(cls: type[wire.Request], rid: int) -> wire.Request:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    fields = {f.name: _dummy(f.type) for f in info.fields if f.required and f.name != "rid"}
    build: typing.Any = cls
    request = build(rid=rid, **fields)
    assert isinstance(request, cls)
    return request


def cases(real_collab: str) -> list[Case]:
    ping = wire.encode(wire.Ping(rid=1))
    table = [
        Case("text frame", "hello relay", ((wire.ErrorCode.MALFORMED_FRAME, None),)),
        Case("empty frame", b"", ((wire.ErrorCode.MALFORMED_FRAME, None),)),
        Case("invalid msgpack", b"\xc1", ((wire.ErrorCode.MALFORMED_FRAME, None),)),
        Case(
            "truncated msgpack",
            wire.encode(wire.Subscribe(rid=11, collab_id="c_x"))[:-3],
            ((wire.ErrorCode.MALFORMED_FRAME, None),),
        ),
        Case(
            "unknown tag",
            msgspec.msgpack.encode({"t": "launch", "rid": 12}),
            ((wire.ErrorCode.MALFORMED_FRAME, 12),),
        ),
        Case(
            "missing rid",
            msgspec.msgpack.encode({"t": "get_keystore"}),
            ((wire.ErrorCode.MALFORMED_FRAME, None),),
        ),
        Case(
            "wrong field type",
            msgspec.msgpack.encode({"t": "subscribe", "rid": 13, "collab_id": 5}),
            ((wire.ErrorCode.MALFORMED_FRAME, 13),),
        ),
        Case(
            "oversized frame",
            wire.encode(wire.Ping(rid=14)) + b"\x00" * wire.MAX_FRAME_BYTES,
            ((wire.ErrorCode.FRAME_TOO_LARGE, None),),
        ),
        Case(
            "nested batch",
            wire.batch([wire.batch([ping, ping]), wire.encode(wire.Ping(rid=15))]),
            ((wire.ErrorCode.MALFORMED_FRAME, None),),
            pongs=1,
        ),
        Case(
            "overlong batch",
            wire.batch([ping] * (wire.MAX_BATCH_FRAMES + 1)),
            ((wire.ErrorCode.MALFORMED_FRAME, None),),
        ),
        Case(
            "a non-frame inside a batch",
            wire.batch([b"\x01", wire.encode(wire.Ping(rid=16))]),
            ((wire.ErrorCode.MALFORMED_FRAME, None),),
            pongs=1,
        ),
        # Open to anyone, but each refuses what it cannot accept, and stores nothing.
        Case(
            "authenticate with a forged token",
            wire.encode(wire.Authenticate(rid=20, token="eyJhbGciOiJub25lIn0.e30.")),
            ((wire.ErrorCode.UNAUTHENTICATED, 20),),
        ),
        Case(
            "sign-up with an unusable handle",
            wire.encode(
                wire.Signup(
                    rid=21, account_id="a_x", handle="\x00", password="p", sign_pk=b"k", box_pk=b"k"
                )
            ),
            ((wire.ErrorCode.INVALID_REQUEST, 21),),
        ),
        Case(
            "login to an unknown handle",
            wire.encode(wire.Login(rid=22, handle="nobody-here", password="guess")),
            ((wire.ErrorCode.INVALID_CREDENTIALS, 22),),
        ),
    ]
    gated = [c for c in REQUEST_TYPES if c not in OPEN_TO_ANYONE]
    for rid, cls in enumerate(gated, start=100):
        request = unauthenticated_request(cls, rid)
        table.append(
            Case(
                f"{cls.__name__} without a session",
                wire.encode(request),
                ((wire.ErrorCode.UNAUTHENTICATED, rid),),
            )
        )
    table.append(
        Case(
            "reading a real collab without a session",
            wire.encode(wire.Subscribe(rid=30, collab_id=real_collab, from_seq=1)),
            ((wire.ErrorCode.UNAUTHENTICATED, 30),),
        )
    )
    # The same requests all at once, in one batch: each refused on its own.
    table.append(
        Case(
            "a batch of requests without a session",
            wire.batch(
                [wire.encode(unauthenticated_request(c, 200 + i)) for i, c in enumerate(gated)]
            ),
            tuple((wire.ErrorCode.UNAUTHENTICATED, 200 + i) for i in range(len(gated))),
        )
    )
    return table


def row_counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # type: ignore[index]


def test_only_the_stated_requests_are_open_without_a_session() -> None:
    """The table above assumes exactly these are open; widening the set must fail here."""
    open_rows = {cls for cls, rule in authz.RULES.items() if rule.senders is authz.Senders.ANYONE}
    assert open_rows == OPEN_TO_ANYONE
    assert set(authz.RULES) == set(REQUEST_TYPES)


@pytest.mark.objective("SO-6")
async def test_every_malformed_oversized_or_unauthenticated_frame_gets_a_typed_refusal(
    relay: Relay, database_url: str
) -> None:
    owner = await sign_up(relay.url, "owner")  # something to protect, and a real collab id
    before = await trio.to_thread.run_sync(row_counts, database_url)
    table = cases(owner.collab_id)
    answered: dict[str, list[tuple[wire.ErrorCode, int | None]]] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, open_websocket(relay.url, nursery) as ws:
            frames = FrameReader(ws)
            assert isinstance(await frames.next(), wire.Welcome)
            for case in table:
                await ws.send_message(case.message)
                await ws.send_message(wire.encode(wire.Ping(rid=SENTINEL)))
                errors: list[tuple[wire.ErrorCode, int | None]] = []
                pongs = 0
                while True:
                    reply = await frames.next()
                    if isinstance(reply, wire.Pong):
                        if reply.rid == SENTINEL:
                            break  # the connection is still usable after this frame
                        pongs += 1
                        continue
                    assert isinstance(reply, wire.Error), f"{case.name}: {reply!r}"
                    assert reply.message, f"{case.name}: an error without a message"
                    errors.append((reply.code, reply.rid))
                answered[case.name] = errors
                assert pongs == case.pongs, f"{case.name}: {pongs} inner pings answered"
            await ws.aclose()
    wrong = {c.name: answered[c.name] for c in table if tuple(answered[c.name]) != c.errors}
    assert not wrong, f"refused otherwise than stated: {wrong}"
    assert await trio.to_thread.run_sync(row_counts, database_url) == before, "something was stored"
