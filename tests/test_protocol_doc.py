"""docs/protocol.md is executable: every frame it shows is built from its own description,
encoded as it says (a msgpack map, nested shapes as written) and decoded by the real decoder.

And the page and the code name the same things, both ways: frame types, fields with their
types and defaults, error codes, close codes, the management-proof shapes, the event body, the
domain labels and the size limits. A frame added to `model/wire.py` fails here until its row is
added to the page's table (one line; a new nested struct adds one row to "Named types").

Grammar of a frame table row: the second column holds one code span per field, written
`name: type` or `name: type = default`; types are `str`, `int`, `bool`, `bin`, `bin(N)`, `nil`,
`A | B` (written `A \\| B` inside the table), `[T]`, `{str: T}`, `{name: T, …}`, a quoted string,
or a name from the "Named types" table.
"""

from __future__ import annotations

import ast
import importlib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect as mi
import pytest
import trio

from clientkit._transport import open_websocket
from model import envelope, membership, protocol, wire

if TYPE_CHECKING:
    from relay._server import Relay

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "protocol.md").read_text()

# --- reading the page -----------------------------------------------------------------------


def section(title: str) -> str:
    """The text under the heading `title` (any level), up to the next heading of its level or
    above."""
    match = re.search(rf"^(#+) {re.escape(title)}\s*$", DOC, re.MULTILINE)
    assert match, f"docs/protocol.md has no section {title!r}"
    level = len(match.group(1))
    rest = DOC[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def table(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in `text`, cells stripped, `\\|` unescaped."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append(cells)
    assert len(rows) > 2, "no table found"
    return rows[2:]  # header and separator


def spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def split_top(text: str, sep: str) -> list[str]:
    """`text` split on `sep` outside brackets, braces, parentheses and quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "[{(":
            depth += 1
        elif not quoted and ch in "]})":
            depth -= 1
        elif not quoted and depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
    parts.append(text[start:])
    return [p.strip() for p in parts]


# --- the type notation ----------------------------------------------------------------------

Type = tuple[Any, ...]  # ("str",), ("bin", n), ("union", arms), ("list", t), ("map", t),
# ("fields", ((name, t), …)), ("array", ((name, t), …)), ("lit", s), ("named", name)


def parse_type(text: str) -> Type:
    arms = split_top(text, "|")
    if len(arms) > 1:
        return ("union", tuple(parse_type(a) for a in arms))
    t = arms[0]
    if t in ("str", "int", "bool", "bin", "nil"):
        return (t,)
    if m := re.fullmatch(r"bin\((\d+)\)", t):
        return ("bin", int(m.group(1)))
    if m := re.fullmatch(r'"([^"]*)"', t):
        return ("lit", m.group(1))
    if t.startswith("[") and t.endswith("]"):
        inner = t[1:-1].strip()
        if ":" in split_top(inner, ",")[0]:
            return ("array", _named_fields(inner))
        return ("list", parse_type(inner))
    if t.startswith("{") and t.endswith("}"):
        inner = t[1:-1].strip()
        if m := re.fullmatch(r"str: (.+)", inner):
            return ("map", parse_type(m.group(1)))
        return ("fields", _named_fields(inner))
    assert re.fullmatch(r"[A-Za-z]\w*", t), f"cannot read the type {t!r}"
    return ("named", t)


def _named_fields(text: str) -> tuple[tuple[str, Type], ...]:
    out = []
    for part in split_top(text, ","):
        if part == "…":
            continue
        name, _, tp = part.partition(": ")
        out.append((name.strip(), parse_type(tp)))
    return tuple(out)


def parse_default(text: str) -> object:
    words: dict[str, object] = {"nil": None, "true": True, "false": False, "{}": {}, "[]": []}
    return words[text] if text in words else ast.literal_eval(text)


@dataclass(frozen=True)
class DocField:
    name: str
    type: Type
    default: object
    has_default: bool


def parse_field(span: str) -> DocField:
    m = re.fullmatch(r"(\w+): (.+?)(?: = (.+))?", span)
    assert m, f"a field must be written `name: type` or `name: type = default`, got `{span}`"
    default_text = m.group(3)
    return DocField(
        m.group(1),
        parse_type(m.group(2)),
        parse_default(default_text) if default_text is not None else None,
        default_text is not None,
    )


NAMED = {row[0].strip("`"): parse_type(spans(row[1])[0]) for row in table(section("Named types"))}
ERROR_CODES = [spans(row[0])[0] for row in table(section("Errors"))]


def frame_rows(title: str) -> dict[str, list[DocField]]:
    rows = {}
    for row in table(section(title)):
        [tag] = spans(row[0])
        assert tag not in rows, f"frame {tag!r} is listed twice under {title!r}"
        rows[tag] = [parse_field(s) for s in spans(row[1])]
    return rows


REQUESTS = frame_rows("Client → relay (requests)")
REPLIES = frame_rows("Relay → client")


def classes(union: object) -> dict[str, type[msgspec.Struct]]:
    return {c.__struct_config__.tag: c for c in typing.get_args(union)}


DIRECTIONS = {
    "request": (REQUESTS, classes(wire.Request), wire.decode_request),
    "reply": (REPLIES, classes(wire.Reply), wire.decode_reply),
}
FRAMES = [(d, tag) for d, (rows, _, _) in DIRECTIONS.items() for tag in rows]


# --- comparing the page's types with the code's ---------------------------------------------


def doc_canon(t: Type) -> str:
    """One spelling per type, comparable with `code_canon` (sizes of `bin(N)` are advice)."""
    kind = t[0]
    if kind == "union":
        return " | ".join(sorted({doc_canon(a) for a in t[1]}))
    if kind == "bin":
        return "bin"
    if kind == "lit":
        return repr(t[1])
    if kind == "list":
        return f"[{doc_canon(t[1])}]"
    if kind == "map":
        return f"{{str: {doc_canon(t[1])}}}"
    if kind in ("fields", "array"):
        inner = ", ".join(f"{n}: {doc_canon(ft)}" for n, ft in t[1])
        return f"[{inner}]" if kind == "array" else f"{{{inner}}}"
    if kind == "named":
        return str(t[1])
    return str(kind)


def code_canon(t: mi.Type) -> str:
    match t:
        case mi.StrType():
            return "str"
        case mi.IntType():
            return "int"
        case mi.BoolType():
            return "bool"
        case mi.BytesType():
            return "bin"
        case mi.NoneType():
            return "nil"
        case mi.RawType():
            return "frame"
        case mi.UnionType():
            return " | ".join(sorted({p for a in t.types for p in code_canon(a).split(" | ")}))
        case mi.ListType() | mi.VarTupleType():
            return f"[{code_canon(t.item_type)}]"
        case mi.DictType():
            assert isinstance(t.key_type, mi.StrType)
            return f"{{str: {code_canon(t.value_type)}}}"
        case mi.EnumType() if t.cls.__name__ in NAMED:
            return t.cls.__name__
        case mi.EnumType():
            return " | ".join(sorted(repr(m.value) for m in t.cls))
        case mi.StructType() if t.cls.__name__ in NAMED:
            return t.cls.__name__
        case mi.StructType():
            return struct_canon(t)
    raise AssertionError(f"no spelling for {t!r}: extend the notation (and this test)")


def struct_canon(t: mi.StructType) -> str:
    inner = ", ".join(f"{f.name}: {code_canon(f.type)}" for f in t.fields)
    return f"[{inner}]" if t.array_like else f"{{{inner}}}"


# --- building frames from the page ----------------------------------------------------------


def value_of(t: Type) -> object:
    """A value of the documented type, as msgpack will carry it (first arm of a union)."""
    kind = t[0]
    if kind == "union":
        return value_of(t[1][0])
    if kind == "named":
        if t[1] == "ErrorCode":
            return ERROR_CODES[0]
        if t[1] == "frame":
            return {"t": "ping", "rid": 1}
        return value_of(NAMED[t[1]])
    if kind == "bin":
        return bytes(range(t[1])) if len(t) > 1 else b"\x01\x02\x03"
    if kind == "list":
        return [value_of(t[1])]
    if kind == "map":
        return {"k": value_of(t[1])}
    if kind == "fields":
        return {n: value_of(ft) for n, ft in t[1]}
    if kind == "array":
        return [value_of(ft) for _, ft in t[1]]
    scalars: dict[str, object] = {"str": "s", "int": 7, "bool": True, "nil": None}
    return t[1] if kind == "lit" else scalars[kind]


def alternatives(t: Type) -> list[object]:
    """Every other value the page allows for a field: the other arms of a union, every error
    code for `ErrorCode`."""
    if t[0] == "union":
        return [value_of(a) for a in t[1][1:]]
    if t == ("named", "ErrorCode"):
        return list(ERROR_CODES[1:])
    return []


def build(tag: str, fields: list[DocField]) -> dict[str, object]:
    return {"t": tag, **{f.name: value_of(f.type) for f in fields}}


def decoded_builtins(frame: msgspec.Struct) -> object:
    return msgspec.to_builtins(frame, builtin_types=(bytes,))


# --- frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_the_page_lists_exactly_the_frames_the_code_has(direction: str) -> None:
    rows, code, _ = DIRECTIONS[direction]
    assert not set(code) - set(rows), (
        f"frames missing from docs/protocol.md: {set(code) - set(rows)}"
    )
    assert not set(rows) - set(code), f"documented frames the code lacks: {set(rows) - set(code)}"


@pytest.mark.parametrize(("direction", "tag"), FRAMES)
def test_each_documented_field_has_the_codes_name_type_and_default(
    direction: str, tag: str
) -> None:
    rows, code, _ = DIRECTIONS[direction]
    doc = {f.name: f for f in rows[tag]}
    info = mi.type_info(code[tag])
    assert isinstance(info, mi.StructType)
    fields = {f.name: f for f in info.fields}
    assert not set(fields) - set(doc), (
        f"{tag}: fields missing from the page: {set(fields) - set(doc)}"
    )
    assert not set(doc) - set(fields), (
        f"{tag}: documented fields the code lacks: {set(doc) - set(fields)}"
    )
    for name, f in fields.items():
        assert doc_canon(doc[name].type) == code_canon(f.type), f"{tag}.{name}: type differs"
        assert doc[name].has_default == (not f.required), f"{tag}.{name}: default or not differs"
        if not f.required:
            default = f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory()
            assert msgspec.to_builtins(default, builtin_types=(bytes,)) == doc[name].default, (
                f"{tag}.{name}: documented default {doc[name].default!r}, code's {default!r}"
            )


@pytest.mark.parametrize(("direction", "tag"), [(d, t) for d, t in FRAMES if t != "batch"])
def test_every_documented_frame_decodes_with_the_real_decoder(direction: str, tag: str) -> None:
    rows, code, decode = DIRECTIONS[direction]
    fields = rows[tag]
    full = build(tag, fields)
    variants = [full]
    for f in fields:
        variants += [{**full, f.name: alt} for alt in alternatives(f.type)]
    for frame in variants:
        decoded = decode(msgspec.msgpack.encode(frame))
        assert type(decoded) is code[tag]
        assert decoded_builtins(decoded) == frame
    # Fields with a default may be left out, and then hold it; the others may not.
    required = {k: v for k, v in full.items() if k == "t" or not _has_default(fields, k)}
    decoded = decode(msgspec.msgpack.encode(required))
    assert decoded_builtins(decoded) == {
        **required,
        **{f.name: f.default for f in fields if f.has_default},
    }
    for name in required.keys() - {"t"}:
        with pytest.raises(wire.MalformedFrame):
            decode(msgspec.msgpack.encode({k: v for k, v in full.items() if k != name}))
    # Unknown keys are refused.
    with pytest.raises(wire.MalformedFrame):
        decode(msgspec.msgpack.encode({**full, "not_a_field": 1}))


def _has_default(fields: list[DocField], name: str) -> bool:
    return next(f for f in fields if f.name == name).has_default


# --- batches --------------------------------------------------------------------------------


def test_batch_elements_are_frames_inline_as_the_page_says() -> None:
    assert (
        REQUESTS["batch"]
        == REPLIES["batch"]
        == [DocField("frames", ("list", ("named", "frame")), None, False)]
    )
    assert NAMED["frame"][0] == "fields"  # a map, not bin
    ping, pong = build("ping", REQUESTS["ping"]), build("pong", REPLIES["pong"])
    caught_up = build("caught_up", REPLIES["caught_up"])

    # A client's batch, as the page describes it, runs through the relay's own decoder.
    outer = wire.decode_request(msgspec.msgpack.encode({"t": "batch", "frames": [ping, ping]}))
    assert isinstance(outer, wire.Batch)
    assert [wire.decode_request(bytes(raw)) for raw in outer.frames] == [wire.Ping(rid=7)] * 2

    # The relay's batch, as the page describes it, is what a client reads...
    message = msgspec.msgpack.encode({"t": "batch", "frames": [pong, caught_up]})
    assert [decoded_builtins(f) for f in wire.unbatch_replies(message)] == [pong, caught_up]
    # ...and exactly what the relay's encoder (`wire.batch`, used by fan-out and every
    # connection's writer) produces.
    as_built = msgspec.convert(caught_up, wire.CaughtUp)
    sent = wire.batch([wire.encode(wire.Pong(rid=7)), wire.encode(as_built)])
    assert sent == message
    assert msgspec.msgpack.decode(sent) == {"t": "batch", "frames": [pong, caught_up]}

    # Elements wrapped in bin (what this page once said) are not frames.
    wrapped = msgspec.msgpack.encode(
        {"t": "batch", "frames": [msgspec.msgpack.encode(pong), msgspec.msgpack.encode(caught_up)]}
    )
    with pytest.raises(wire.MalformedFrame):
        wire.unbatch_replies(wrapped)


async def test_the_relay_sends_batches_of_inline_frames(relay: Relay) -> None:
    """What a real relay's writer coalesces is a map whose `frames` are maps, as the page says."""
    n = 64
    batches = 0
    async with trio.open_nursery() as nursery:
        async with open_websocket(relay.url, nursery) as ws:
            with trio.fail_after(30):
                assert _read(await ws.get_message())["t"] == "welcome"
                for _ in range(20):  # the writer coalesces what is queued: almost always at once
                    pings = [{**build("ping", REQUESTS["ping"]), "rid": i} for i in range(n)]
                    await ws.send_message(msgspec.msgpack.encode({"t": "batch", "frames": pings}))
                    seen: list[object] = []
                    while len(seen) < n:
                        message = _read(await ws.get_message())
                        if message["t"] == "batch":
                            batches += 1
                            seen += message["frames"]
                        else:
                            seen.append(message)
                    assert seen == [{"t": "pong", "rid": i} for i in range(n)]
                    if batches:
                        break
        nursery.cancel_scope.cancel()
    assert batches, "the relay never coalesced 64 queued replies into a batch"


def _read(message: str | bytes) -> dict[str, Any]:
    assert isinstance(message, bytes), "the relay sent a text message"
    value = msgspec.msgpack.decode(message)
    assert isinstance(value, dict)
    return value


# --- named types ----------------------------------------------------------------------------


def test_named_types_have_the_codes_shape() -> None:
    structs: dict[str, mi.StructType] = {}

    def collect(t: mi.Type) -> None:
        match t:
            case mi.StructType():
                structs[t.cls.__name__] = t
            case mi.UnionType():
                for a in t.types:
                    collect(a)
            case mi.ListType() | mi.VarTupleType():
                collect(t.item_type)
            case mi.DictType():
                collect(t.value_type)

    for _, code, _ in DIRECTIONS.values():
        for cls in code.values():
            for f in mi.type_info(cls).fields:  # type: ignore[attr-defined]
                collect(f.type)
    assert set(structs) <= set(NAMED), (
        f"nested structs missing from Named types: {set(structs) - set(NAMED)}"
    )
    for name, shape in NAMED.items():
        if name in structs:
            assert doc_canon(shape) == struct_canon(structs[name]), name
    assert NAMED["ErrorCode"] == ("str",)
    assert set(NAMED) - set(structs) == {"ErrorCode", "frame"}, "a named type nothing uses"


# --- errors and close codes -----------------------------------------------------------------


def test_the_page_lists_exactly_the_error_codes() -> None:
    code = {c.value for c in wire.ErrorCode}
    assert len(ERROR_CODES) == len(set(ERROR_CODES))
    assert not code - set(ERROR_CODES), (
        f"error codes missing from the page: {code - set(ERROR_CODES)}"
    )
    assert not set(ERROR_CODES) - code, (
        f"documented codes the code lacks: {set(ERROR_CODES) - code}"
    )


def test_the_page_lists_exactly_the_close_codes() -> None:
    rows = table(section("Close codes"))
    documented = {int(row[0]): spans(row[1])[0] for row in rows}
    assert documented == {c.value: c.name for c in protocol.CloseCode}
    # Wherever the page names a close code, it is one of them.
    pattern = r"\*\*(\d{4})\*\*|(?:code|with|closed) (\d{4})\b"
    mentioned = {int(bold or plain) for bold, plain in re.findall(pattern, DOC)}
    assert mentioned, "the close-code scan found nothing: has the wording changed?"
    assert mentioned <= set(documented), (
        f"close codes named but not listed: {mentioned - set(documented)}"
    )


def test_close_codes_are_sent_only_by_their_names() -> None:
    """A close code written as a number in relay/, fanout/ or clientkit/ would escape the table."""
    literal = re.compile(r"\b(?:aclose|disconnect|close_gracefully)\(\s*\d")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for pkg in ("relay", "fanout", "clientkit")
        for path in sorted((ROOT / pkg).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert not offenders, f"use model.protocol.CloseCode: {offenders}"


# --- what sits inside frames ----------------------------------------------------------------


def _proof_block() -> str:
    [block] = [b for b in re.findall(r"```\n(.*?)```", DOC, re.DOTALL) if "Proof = [" in b]
    return "\n".join(line.split("#")[0] for line in block.splitlines())


def _bracketed(text: str, start: str) -> str:
    i = text.index(start) + len(start) - 1
    depth = 0
    for j in range(i, len(text)):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    raise AssertionError(f"unclosed {start}")


def _names(text: str) -> list[str]:
    return [re.match(r"\w+", part).group(0) for part in split_top(" ".join(text.split()), ",")]  # type: ignore[union-attr]


def test_the_management_proof_shapes_match_the_code() -> None:
    block = _proof_block()
    field_names = [f.name for f in msgspec.structs.fields(membership.Proof)]
    assert _names(_bracketed(block, "Proof = [")) == field_names
    member_names = [f.name for f in msgspec.structs.fields(membership.Member)]
    assert _names(_bracketed(block, "Member = [")) == member_names, "Member's elements differ"
    ops = {
        m.group(1): _names(m.group(2)) for m in re.finditer(r'\{"type": "(\w+)", ([^}]*)\}', block)
    }
    code = {
        c.__struct_config__.tag: [f.name for f in msgspec.structs.fields(c)]
        for c in typing.get_args(membership.Operation)
    }
    assert ops == code


def test_the_event_body_table_matches_the_code() -> None:
    rows = table(section("The event envelope"))
    assert [(int(r[0]), spans(r[1])[0]) for r in rows] == list(
        enumerate(f.name for f in msgspec.structs.fields(envelope.EventBody))
    )


def test_the_domain_labels_match_the_code() -> None:
    rows = table(section("Canonical signing bytes and domain labels"))
    documented = {}
    for row in rows:
        name, value, where = spans(row[0])[0], spans(row[1])[0], spans(row[2])[0]
        module = importlib.import_module(where.removesuffix(".py").replace("/", "."))
        assert getattr(module, name) == ast.literal_eval(value), name
        documented[name] = value
    in_code = {
        name
        for path in sorted((ROOT / "model").glob("*.py"))
        for name in re.findall(
            r"^(DOMAIN_\w+): Final = b\"cozylabs/", path.read_text(), re.MULTILINE
        )
    }
    assert in_code <= set(documented), (
        f"domain labels missing from the page: {in_code - set(documented)}"
    )


def test_the_size_limits_match_the_code() -> None:
    modules = [wire, envelope, importlib.import_module("model.content")]
    for row in table(section("Size limits")):
        names = spans(row[0])
        numbers = re.findall(r"\(([\d ]+)\)", row[1]) or row[1].split(" / ")
        assert len(names) == len(numbers), row
        for name, number in zip(names, numbers, strict=True):
            value = next(getattr(m, name) for m in modules if hasattr(m, name))
            assert value == int(number.replace(" ", "").replace("\u202f", "")), name


def test_the_page_is_about_the_protocol_the_code_speaks() -> None:
    assert DOC.splitlines()[0] == f"# The CozyLabs wire protocol (`{wire.PROTOCOL}`)"
    assert f'`protocol` is `"{wire.PROTOCOL}"`' in section("Relay → client")
