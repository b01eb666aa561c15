"""Wire frames: every frame round-trips, and hostile bytes only ever produce `MalformedFrame`."""

from __future__ import annotations

import types
import typing

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import wire
from model.envelope import SignedEvent, verify_event
from model.ids import new_id
from model.membership import MemberKind
from tests.helpers import make_event, new_actor, new_collab_key

# Batch is the one container frame; it has its own tests below.
REQUEST_TYPES: tuple[type[msgspec.Struct], ...] = tuple(
    c for c in typing.get_args(wire.Request) if c is not wire.Batch
)
REPLY_TYPES: tuple[type[msgspec.Struct], ...] = tuple(
    c for c in typing.get_args(wire.Reply) if c is not wire.Batch
)

# msgpack integers span int64 min .. uint64 max; the strategies cover the whole range.
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
blobs = st.binary(max_size=80)
signed_events = st.builds(SignedEvent, body=st.binary(max_size=200), sig=st.binary(max_size=64))

_SCALARS: dict[object, st.SearchStrategy[typing.Any]] = {
    int: ints,
    str: texts,
    bytes: blobs,
    bool: st.booleans(),
    wire.ErrorCode: st.sampled_from(wire.ErrorCode),
    MemberKind: st.sampled_from(MemberKind),
    SignedEvent: signed_events,
    dict[str, str]: st.dictionaries(texts, texts, max_size=4),
    list[str]: st.lists(texts, max_size=4),
    list[bytes]: st.lists(blobs, max_size=4),
    list[wire.AgentInfo]: st.lists(
        st.builds(
            wire.AgentInfo, account_id=texts, handle=texts, created_at=ints, revoked=st.booleans()
        ),
        max_size=3,
    ),
}


def strategy_for(tp: object) -> st.SearchStrategy[typing.Any]:
    """A strategy for a frame field's type. Fails loudly for a type the tests do not know, so
    a new frame with a new kind of field forces a decision here."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    if isinstance(tp, types.UnionType):
        return st.one_of([strategy_for(arm) for arm in typing.get_args(tp)])
    if tp is type(None):
        return st.none()
    raise AssertionError(f"no strategy for frame field type {tp!r}; add one to _SCALARS")


def frames_of(cls: type[msgspec.Struct]) -> st.SearchStrategy[typing.Any]:
    fields = msgspec.structs.fields(cls)
    return st.builds(cls, **{f.name: strategy_for(f.type) for f in fields})


# msgspec raises UnicodeDecodeError for invalid UTF-8 and RecursionError for deep nesting, which
# are not msgspec.DecodeError (msgspec issue #714); model.wire catches them too, and the fuzz
# tests below accept nothing but MalformedFrame.


def decodes_or_malformed(decode: typing.Callable[[bytes], object], data: bytes) -> None:
    """Decode `data`; the only acceptable failure is `MalformedFrame`.

    A recovered rid must be the integer the frame really carries under ``rid``.
    """
    rid: int | None = None
    try:
        decode(data)
    except wire.MalformedFrame as exc:
        rid = exc.rid
    if rid is not None:
        assert type(rid) is int
        probed = msgspec.msgpack.decode(data)
        assert isinstance(probed, dict)
        assert probed["rid"] == rid


requests = st.one_of([frames_of(cls) for cls in REQUEST_TYPES])
replies = st.one_of([frames_of(cls) for cls in REPLY_TYPES])


def _tag(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


# --- round trips ----------------------------------------------------------------------------


def test_every_frame_type_has_a_distinct_tag() -> None:
    tags = [_tag(cls) for cls in (*REQUEST_TYPES, *REPLY_TYPES)]
    assert len(tags) == len(set(tags)), "a tag is shared between frame types"
    assert len(REQUEST_TYPES) == 21
    assert len(REPLY_TYPES) == 29


@pytest.mark.parametrize("cls", REQUEST_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_request_round_trips(cls: type[msgspec.Struct], data: st.DataObject) -> None:
    frame = data.draw(frames_of(cls))
    encoded = wire.encode(frame)
    assert wire.decode_request(encoded) == frame
    assert type(wire.decode_request(encoded)) is cls
    # Requests and replies are separate unions: one is never mistaken for the other.
    with pytest.raises(wire.MalformedFrame):
        wire.decode_reply(encoded)


@pytest.mark.parametrize("cls", REPLY_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_reply_round_trips(cls: type[msgspec.Struct], data: st.DataObject) -> None:
    frame = data.draw(frames_of(cls))
    encoded = wire.encode(frame)
    assert wire.decode_reply(encoded) == frame
    assert type(wire.decode_reply(encoded)) is cls
    with pytest.raises(wire.MalformedFrame):
        wire.decode_request(encoded)


def test_frames_are_maps_tagged_by_t() -> None:
    decoded = msgspec.msgpack.decode(wire.encode(wire.Ping(rid=3)))
    assert decoded == {"t": "ping", "rid": 3}


def test_optional_fields_take_their_defaults() -> None:
    # Schema evolution: a peer that omits fields added later still decodes.
    collab = new_id("c")
    frame = wire.decode_request(
        msgspec.msgpack.encode({"t": "subscribe", "rid": 1, "collab_id": collab})
    )
    assert frame == wire.Subscribe(rid=1, collab_id=collab, from_seq=1, follow=True)
    frame = wire.decode_request(msgspec.msgpack.encode({"t": "get_account", "rid": 2}))
    assert frame == wire.GetAccount(rid=2, account_id=None, handle=None)
    appended = {"t": "appended", "rid": 3, "collab_id": collab, "seq": 1, "event_id": b"e",
                "chain": b"c"}  # fmt: skip
    reply = wire.decode_reply(msgspec.msgpack.encode(appended))
    assert isinstance(reply, wire.Appended)
    assert reply.duplicate is False


@pytest.mark.objective("SO-3")
def test_signed_event_bytes_cross_the_wire_exactly() -> None:
    # The relay and every client verify the author's signature over the bytes they received,
    # so framing must carry body and sig through unchanged.
    alice = new_actor()
    collab = new_id("c")
    signed = make_event(alice, collab, new_collab_key(), content=b"hello")
    request = wire.decode_request(wire.encode(wire.Append(rid=9, event=signed)))
    assert isinstance(request, wire.Append)
    assert request.event.body == signed.body
    assert verify_event(request.event, alice.sign_pk)
    push = wire.decode_reply(
        wire.encode(wire.Event(collab_id=collab, seq=1, event=request.event, chain=bytes(32)))
    )
    assert isinstance(push, wire.Event)
    assert verify_event(push.event, alice.sign_pk)


def test_secrets_are_redacted_from_reprs() -> None:
    frames = [
        wire.Signup(
            rid=1, account_id="a", handle="al", password="hunter2-secret", sign_pk=b"", box_pk=b""
        ),
        wire.Login(rid=1, handle="al", password="hunter2-secret"),
        wire.Authenticate(rid=1, token="tok-secret-value"),
        wire.LoggedIn(rid=1, account_id="a", token="tok-secret-value", expires_at=0),
    ]
    for frame in frames:
        text = repr(frame)
        assert "hunter2" not in text
        assert "tok-secret" not in text
        assert "redacted" in text


# --- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "rid"),
    [
        ({"t": "ping", "rid": 5, "extra": 1}, 5),
        ({"t": "no_such_frame", "rid": 6}, 6),
        ({"t": "welcome", "rid": 7}, 7),  # a reply tag sent as a request
        ({"t": "subscribe", "rid": 8}, 8),  # missing collab_id
        ({"t": "subscribe", "rid": 9, "collab_id": 42}, 9),  # wrong type
        ({"t": "append", "rid": 10, "event": [b"body"]}, 10),  # event missing sig
        ({"t": "append", "rid": 11, "event": {"body": b"", "sig": b""}}, 11),  # event not array
        ({"rid": 12}, 12),  # no tag at all
        ({"t": "ping", "rid": True}, None),  # bool is not a rid
        ({"t": "ping", "rid": "13"}, None),
        ({"t": "ping", "rid": 1.5}, None),
        ({"t": "ping"}, None),
        ([1, 2, 3], None),
        ("ping", None),
        (None, None),
    ],
)
def test_malformed_frame_carries_rid_when_recoverable(obj: object, rid: int | None) -> None:
    with pytest.raises(wire.MalformedFrame) as info:
        wire.decode_request(msgspec.msgpack.encode(obj))
    assert info.value.rid == rid
    assert "docs/protocol.md" in str(info.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x81", b"\x82\xa1t\xa4ping", b"\x82\xa1t\xa4ping\xa3rid\x01\x00", b"\xff" * 8],
    ids=["empty", "reserved-byte", "truncated-map", "truncated-frame", "trailing-bytes", "junk"],
)
def test_unreadable_bytes_are_malformed_without_rid(data: bytes) -> None:
    with pytest.raises(wire.MalformedFrame) as info:
        wire.decode_request(data)
    assert info.value.rid is None
    with pytest.raises(wire.MalformedFrame):
        wire.decode_reply(data)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_only_ever_raise_malformed_frame(data: bytes) -> None:
    decodes_or_malformed(wire.decode_request, data)
    decodes_or_malformed(wire.decode_reply, data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | texts | blobs,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["t", "rid", "event", "collab_id", "x"]) | texts, children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    obj=st.dictionaries(
        st.sampled_from(["t", "rid", "collab_id", "handle", "event", "from_seq", "follow", "zz"]),
        msgpack_values | st.sampled_from([_tag(c) for c in (*REQUEST_TYPES, *REPLY_TYPES)]),
        max_size=6,
    )
    | msgpack_values
)
def test_structured_garbage_only_ever_raises_malformed_frame(obj: object) -> None:
    # Well-formed msgpack that looks almost like a frame gets much deeper into the decoder than
    # random bytes do.
    data = msgspec.msgpack.encode(obj)
    decodes_or_malformed(wire.decode_request, data)
    decodes_or_malformed(wire.decode_reply, data)


@settings(max_examples=300, deadline=None)
@given(frame=requests | replies, data=st.data())
def test_mutated_frames_only_ever_raise_malformed_frame(frame: object, data: st.DataObject) -> None:
    encoded = bytearray(wire.encode(frame))  # type: ignore[arg-type]
    action = data.draw(st.sampled_from(["flip", "truncate", "insert"]), label="action")
    pos = data.draw(st.integers(0, len(encoded) - 1), label="pos")
    if action == "flip":
        encoded[pos] ^= data.draw(st.integers(1, 255), label="mask")
    elif action == "truncate":
        del encoded[pos:]
    else:
        encoded[pos:pos] = data.draw(st.binary(min_size=1, max_size=4), label="inserted")
    decodes_or_malformed(wire.decode_request, bytes(encoded))
    decodes_or_malformed(wire.decode_reply, bytes(encoded))


@pytest.mark.parametrize(
    "decode", [wire.decode_request, wire.decode_reply], ids=["request", "reply"]
)
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x82\xa3rid\x07\xa1x" + b"\x91" * 2000 + b"\xc0", id="nested-2000"),
        pytest.param(b"\x82\xa1t\xa4pin\xff\xa3rid\x07", id="bad-utf8-tag"),
        pytest.param(b"\x82\xa3rid\x07\xa1t\xa4pin\xff", id="bad-utf8-tag-rid-first"),
    ],
)
def test_hostile_small_frames_are_malformed_not_a_crash(
    decode: typing.Callable[[bytes], object], data: bytes
) -> None:
    assert len(data) < wire.MAX_FRAME_BYTES
    with pytest.raises(wire.MalformedFrame):
        decode(data)


# --- batches ------------------------------------------------------------------------------------


@given(frames=st.lists(replies, min_size=1, max_size=20))
def test_a_batch_of_replies_unpacks_to_the_same_frames_in_order(frames: list[object]) -> None:
    encoded = [wire.encode(f) for f in frames]  # type: ignore[arg-type]
    assert wire.unbatch_replies(wire.batch(encoded)) == frames


def test_a_single_frame_is_sent_unwrapped() -> None:
    only = wire.encode(wire.Pong(rid=1))
    assert wire.batch([only]) == only


@given(frames=st.lists(requests, min_size=2, max_size=10))
def test_a_batch_of_requests_decodes_to_raw_frames_that_decode_alone(frames: list[object]) -> None:
    decoded = wire.decode_request(wire.batch([wire.encode(f) for f in frames]))  # type: ignore[arg-type]
    assert isinstance(decoded, wire.Batch)
    assert [wire.decode_request(bytes(r)) for r in decoded.frames] == frames


def test_nested_batches_are_malformed() -> None:
    inner = wire.batch([wire.encode(wire.Pong(rid=1)), wire.encode(wire.Pong(rid=2))])
    outer = wire.batch([inner, wire.encode(wire.Pong(rid=3))])
    with pytest.raises(wire.MalformedFrame):
        wire.unbatch_replies(outer)
