"""Every hex example in ``formats/reference.md`` is true for every version it names.

A valid example is parsed with its version's schema, compared with the value it states,
built again from that value and compared byte for byte. An error example is fed to the
readers behind a valid prefix and must fail with exactly the line it states. The notation
is described in §1 of the document.
"""

from __future__ import annotations

import dataclasses
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.profiles import available_versions
from qmig.wire.reader import Record, ReturnPathReader, StreamReader
from qmig.wire.schema import Schema, mem_size_params, schema_for

REFERENCE = Path(__file__).resolve().parents[2] / "formats" / "reference.md"
KINDS = {
    "header",
    "configuration",
    "section",
    "footer",
    "eof",
    "vmdescription",
    "command",
    "commands",
    "rp",
    "ram",
}
# Every message the reference must show at least once as a valid example.
REQUIRED = {
    "HEADER",
    "CONFIGURATION",
    "SECTION_START",
    "SECTION_PART",
    "SECTION_END",
    "SECTION_FULL",
    "SECTION_FOOTER",
    "EOF",
    "VMDESCRIPTION",
    "OPEN_RETURN_PATH",
    "PING",
    "POSTCOPY_ADVISE",
    "POSTCOPY_LISTEN",
    "POSTCOPY_RUN",
    "POSTCOPY_RAM_DISCARD",
    "PACKAGED",
    "ENABLE_COLO",
    "POSTCOPY_RESUME",
    "RECV_BITMAP",
    "SWITCHOVER_START",
    "SHUT",
    "PONG",
    "REQ_PAGES_ID",
    "REQ_PAGES",
    "RESUME_ACK",
    "SWITCHOVER_ACK",
    "MEM_SIZE",
    "ZERO",
    "PAGE",
    "CONTINUE",
    "EOS",
    "XBZRLE",
    "COMPRESS_PAGE",
    "MULTIFD_FLUSH",
}
RAM_PREFIX_BLOCK = m.RamBlockInfo("pc.ram", 1 << 20)

FENCE = re.compile(r"^```hex(?P<info>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
ATTRIBUTE = re.compile(r'([\w-]+)="([^"]*)"')
TOKEN = re.compile(
    r'\s*(?:(?P<hex>[0-9a-fA-F]+)|"(?P<text>[^"]*)"|<(?P<count>\d+)\s*[×x]\s*(?P<fill>[0-9a-fA-F]{2})>)'
)


@dataclass(frozen=True)
class Example:
    line: int
    attributes: dict[str, str]
    data: bytes
    value_source: str | None

    @property
    def name(self) -> str:
        return self.attributes["example"]

    @property
    def kind(self) -> str:
        return self.attributes["kind"]

    @property
    def versions(self) -> list[str]:
        return self.attributes["versions"].split()

    @property
    def error(self) -> str | None:
        return self.attributes.get("error")

    @property
    def fields(self) -> set[str]:
        return set(self.attributes.get("fields", "").split())

    def __str__(self) -> str:
        return f"{self.name}@{self.line}"


def parse_hex(body: str) -> tuple[bytes, str | None]:
    """The bytes of an example block and its ``#=>`` value (``None`` if it states none)."""
    data = bytearray()
    value_lines = []
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith("#=>"):
            value_lines.append(stripped[3:].strip())
            continue
        code = line.split("#", 1)[0] if '"' not in line else _strip_comment(line)
        position = 0
        while position < len(code):
            if not code[position:].strip():
                break
            match = TOKEN.match(code, position)
            if match is None:
                raise ValueError(f"cannot read {code[position:]!r}")
            if match["hex"] is not None:
                if len(match["hex"]) % 2:
                    raise ValueError(f"odd number of hex digits in {match['hex']!r}")
                data += bytes.fromhex(match["hex"])
            elif match["text"] is not None:
                data += match["text"].encode("ascii")
            else:
                data += bytes([int(match["fill"], 16)]) * int(match["count"])
            position = match.end()
    return bytes(data), " ".join(value_lines) or None


def _strip_comment(line: str) -> str:
    """The line up to a ``#`` that is not inside a quoted string."""
    quoted = False
    for index, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted:
            return line[:index]
    return line


def load_examples(text: str) -> list[Example]:
    examples = []
    for match in FENCE.finditer(text):
        data, value = parse_hex(match["body"])
        line = text.count("\n", 0, match.start()) + 1
        examples.append(Example(line, dict(ATTRIBUTE.findall(match["info"])), data, value))
    return examples


EXAMPLES = load_examples(REFERENCE.read_text(encoding="utf-8"))
CASES = [(example, version) for example in EXAMPLES for version in example.versions]

NAMESPACE: dict[str, Any] = {
    name: getattr(m, name) for name in dir(m) if not name.startswith("_")
} | {"bytes": bytes, "range": range, "__builtins__": {}}


def expected_value(example: Example) -> Any:
    assert example.value_source is not None, f"{example} states no decoded value"
    return eval(example.value_source, NAMESPACE)


# --- decoding and building by kind ----------------------------------------------------


def _parse_exact(construct: Any, data: bytes, **context: Any) -> Any:
    stream = io.BytesIO(data)
    value = construct.parse_stream(stream, **context)
    assert stream.tell() == len(data), f"{len(data) - stream.tell()} bytes not consumed"
    return value


def decode(schema: Schema, example: Example) -> Any:
    data = example.data
    kind = example.kind
    if kind == "header":
        return _parse_exact(schema.header, data)
    if kind == "configuration":
        return _parse_exact(schema.configuration, data)
    if kind == "section":
        name = schema.profile.section_type_names[data[0]]
        construct = {
            "SECTION_START": schema.section_start,
            "SECTION_FULL": schema.section_full,
            "SECTION_PART": schema.section_part,
            "SECTION_END": schema.section_end,
        }[name]
        return _parse_exact(construct, data)
    if kind == "footer":
        return _parse_exact(schema.section_footer, data)
    if kind == "eof":
        return _parse_exact(schema.eof, data)
    if kind == "vmdescription":
        return _parse_exact(schema.vmdescription, data)
    if kind == "command":
        header = schema.command_header.parse(data[:5])
        assert len(data) == 5 + header.len, "command length does not match its bytes"
        name = schema.profile.command_names[header.cmd]
        return _parse_exact(schema.command_payloads[name], data[5:], len=header.len)
    if kind == "rp":
        header = schema.rp_header.parse(data[:4])
        name = schema.profile.rp_names[header.type]
        end = 4 + header.len
        message = _parse_exact(schema.rp_payloads[name], data[4:end], len=header.len)
        if name in schema.rp_trailers:  # the bitmap after RECV_BITMAP, outside its length
            trailer = _parse_exact(schema.rp_trailers[name], data[end:])
            return dataclasses.replace(message, bitmap=trailer.bitmap)
        assert len(data) == end, "message length does not match its bytes"
        return message
    if kind == "ram":
        return decode_ram(schema, data, example.fields)
    if kind == "commands":
        return [record.message for record in read_behind_prefix(schema, example)]
    raise AssertionError(f"unknown kind {kind!r}")


def decode_ram(schema: Schema, data: bytes, fields: set[str]) -> Any:
    flags = schema.profile.ram_flags
    header = int.from_bytes(data[:8], "big")
    if header & schema.flag_mask == flags["MEM_SIZE"]:
        total = header & ~schema.flag_mask
        rules = mem_size_params(lambda ctx: "page_size" in fields, "mr_addr" in fields)
        stream = io.BytesIO(data[8:])
        blocks = []
        remaining = total
        while remaining > 0:
            block = schema.mem_size_block.parse_stream(stream, rules=rules)
            remaining -= block.used_length
            blocks.append(block)
        assert remaining == 0 and stream.tell() == len(data) - 8
        return m.MemSize(total, tuple(blocks))
    record = _parse_exact(schema.ram_record, data)
    block = None if record.flags & flags["CONTINUE"] else record.block
    kind = record.kind
    if kind == flags["ZERO"]:
        return m.RamPage(block, record.offset, True, bytes([record.body.fill]))
    if kind == flags["PAGE"]:
        return m.RamPage(block, record.offset, False, record.body.data)
    if kind == flags["XBZRLE"]:
        return m.RamXbzrle(block, record.offset, record.body.data)
    if kind == flags.get("COMPRESS_PAGE"):
        return m.RamCompressed(block, record.offset, record.body.data)
    if kind == flags["EOS"]:
        return m.RamEos()
    if kind == flags.get("MULTIFD_FLUSH"):
        return m.RamMultifdFlush()
    if kind == flags["HOOK"]:
        return m.RamHook(record.offset)
    raise AssertionError(f"no RAM record kind {kind:#x} in this profile")


def build(schema: Schema, kind: str, value: Any) -> bytes:
    if kind == "header":
        return bytes(schema.header.build(value))
    if kind == "configuration":
        return bytes(schema.configuration.build(value))
    if kind == "section":
        return schema.build_section(value)
    if kind == "footer":
        return schema.build_footer(value.section_id)
    if kind == "eof":
        return bytes(schema.eof.build(value))
    if kind == "vmdescription":
        return bytes(schema.vmdescription.build(value))
    if kind == "command":
        return schema.build_command(value)
    if kind == "commands":
        return b"".join(
            schema.build_command(message)
            for message in value
            if not isinstance(message, m.PackageEnd)
        )
    if kind == "rp":
        return schema.build_rp(value)
    if kind == "ram":
        return build_ram(schema, value)
    raise AssertionError(f"unknown kind {kind!r}")


def build_ram(schema: Schema, value: Any) -> bytes:
    match value:
        case m.MemSize():
            return schema.build_mem_size(value)
        case m.RamPage():
            return schema.build_ram_page(value)
        case m.RamXbzrle():
            return schema.build_ram_xbzrle(value)
        case m.RamCompressed():
            return schema.build_ram_compressed(value)
        case m.RamEos():
            return schema.build_ram_flag("EOS")
        case m.RamMultifdFlush():
            return schema.build_ram_flag("MULTIFD_FLUSH")
        case m.RamHook(offset=offset):
            return schema.build_ram_flag("HOOK", offset)
    raise AssertionError(f"cannot build {value!r}")


# --- reading behind a valid prefix --------------------------------------------------------


def prefix_for(schema: Schema, kind: str) -> bytes:
    """The bytes that put a reader where an example of ``kind`` may appear."""
    if kind in ("header", "rp"):
        return b""
    prefix = bytes(schema.header.build(m.StreamHeader(3)))
    if kind == "configuration":
        return prefix
    prefix += bytes(schema.configuration.build(m.Configuration("pc-i440fx-7.2")))
    if kind == "ram":
        prefix += schema.build_section(m.SectionStart(2, "ram", 0, 4))
        prefix += schema.build_mem_size(
            m.MemSize(RAM_PREFIX_BLOCK.used_length, (RAM_PREFIX_BLOCK,))
        )
    return prefix


def read_behind_prefix(schema: Schema, example: Example) -> list[Record]:
    """The example's records, read by the stream or return-path reader.

    A valid example is not a whole stream (no EOF), so its input is not closed: every
    byte must then be taken by a record. An error example's input is closed, so that a
    record cut short counts as an error too.
    """
    prefix = prefix_for(schema, example.kind)
    version = schema.profile.name
    reader = ReturnPathReader(version) if example.kind == "rp" else StreamReader(version)
    reader.feed(prefix + example.data)
    if example.error is not None:
        reader.feed_eof()
    records = [record for record in reader if record.offset >= len(prefix)]
    assert sum(record.size for record in records) == len(example.data)
    # The document's offsets count from the example's first byte.
    return [Record(r.offset - len(prefix), r.size, r.message, r.depth, r.section) for r in records]


def error_line(schema: Schema, example: Example) -> str:
    prefix = len(prefix_for(schema, example.kind))
    with pytest.raises(QmigError) as caught:
        read_behind_prefix(schema, example)
    error = caught.value
    if error.offset is not None:
        error = error.at(error.offset - prefix)
    return f"qmig: error: {error.one_line()}"


def check(example: Example, version: str) -> None:
    """Fail unless ``example`` is true for ``version`` (also used on broken copies)."""
    schema = schema_for(version)
    if example.error is not None:
        assert error_line(schema, example) == example.error
        return
    expected = expected_value(example)
    assert decode(schema, example) == expected
    assert build(schema, example.kind, expected) == example.data


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize(("example", "version"), CASES, ids=[f"{e}-{v}" for e, v in CASES])
def test_example_holds(example: Example, version: str) -> None:
    check(example, version)


def test_every_hex_block_is_a_complete_example() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    assert text.count("```hex") == len(EXAMPLES)
    versions = set(available_versions())
    for example in EXAMPLES:
        assert {"example", "versions", "kind"} <= example.attributes.keys(), example
        assert example.kind in KINDS, example
        assert example.versions and set(example.versions) <= versions, example
        assert example.data, example
        # An example states either the value it decodes to or the error it raises.
        assert (example.error is None) == (example.value_source is not None), example


def test_every_message_has_a_valid_example() -> None:
    shown = {example.name for example in EXAMPLES if example.error is None}
    assert REQUIRED - shown == set()


def test_the_variants_the_brief_names_are_shown() -> None:
    valid = [e for e in EXAMPLES if e.error is None]
    configurations = [expected_value(e) for e in valid if e.name == "CONFIGURATION"]
    assert any(c.target_page_bits is None and c.capabilities is None for c in configurations)
    assert any(c.capabilities is not None and c.uuid is not None for c in configurations)
    advises = [expected_value(e) for e in valid if e.name == "POSTCOPY_ADVISE"]
    assert {a.ram_postcopy for a in advises} == {True, False}
    mem_size_fields = [e.fields for e in valid if e.name == "MEM_SIZE"]
    assert set() in mem_size_fields and {"page_size", "mr_addr"} in mem_size_fields
    # Every profile appears, and every version difference has an error example.
    assert {v for e in EXAMPLES for v in e.versions} == set(available_versions())


def _corrupted(example: Example) -> list[Example]:
    """Copies of ``example`` that state something false.

    In a valid example every byte is part of the value, so any flipped byte must be caught.
    An error example's bytes after the failing field do not matter; its stated error does.
    """
    if example.error is not None:
        attributes = example.attributes | {"error": example.error.replace("at byte", "at byte 1")}
        return [Example(example.line, attributes, example.data, None)]
    copies = []
    for index in {0, len(example.data) // 2, len(example.data) - 1}:
        data = bytearray(example.data)
        data[index] ^= 0x01
        copies.append(Example(example.line, example.attributes, bytes(data), example.value_source))
    assert example.value_source is not None
    changed = re.sub(r"\d+", lambda n: str(int(n[0]) + 1), example.value_source, count=1)
    if changed != example.value_source:
        copies.append(Example(example.line, example.attributes, example.data, changed))
    return copies


@pytest.mark.parametrize(("example", "version"), CASES, ids=[f"{e}-{v}" for e, v in CASES])
def test_a_wrongly_edited_example_is_caught(example: Example, version: str) -> None:
    for broken in _corrupted(example):
        with pytest.raises(Exception):  # noqa: B017 - any failure of the check will do
            check(broken, version)


def test_hex_notation() -> None:
    data, value = parse_hex('01 0203 # a comment "x"\n"ab" <3 × ff> <2 x 00>\n#=> Eof()\n')
    assert data == bytes.fromhex("010203") + b"ab" + b"\xff" * 3 + b"\x00" * 2
    assert value == "Eof()"
    assert parse_hex('"a#b" 00')[0] == b"a#b\x00"
    with pytest.raises(ValueError):
        parse_hex("012")
    with pytest.raises(ValueError):
        parse_hex("zz")
