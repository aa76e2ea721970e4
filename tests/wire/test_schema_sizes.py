"""The sizes and offsets the readers delimit records by come from the schemas, and the
profile's rules are taken by name, every value having its case (an unknown one is refused)."""

from __future__ import annotations

import dataclasses

import pytest

from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.profiles import available_versions, load_profile
from qmig.wire.reader import StreamReader, find_trailing_vmdesc
from qmig.wire.schema import Schema, discard_range_offset, schema_for

VERSIONS = available_versions()


@pytest.mark.parametrize("version", VERSIONS)
def test_fixed_sizes_are_those_of_the_built_records(version: str) -> None:
    schema = schema_for(version)
    assert schema.header_size == len(schema.header.build(m.StreamHeader(3)))
    assert schema.command_header_size == len(schema.build_command(m.PostcopyListen()))
    ping = schema.build_command(m.Ping(7))
    at = schema.command_length_at
    assert int.from_bytes(ping[at : at + 2], "big") == len(ping) - schema.command_header_size
    assert schema.footer_size == len(schema.build_footer(9))
    assert schema.ram_header_size == len(schema.build_ram_flag("EOS"))
    pong = schema.build_rp(m.Pong(1))
    assert schema.rp_header_size == len(pong) - len(schema.rp_payloads["PONG"].build(m.Pong(1)))
    description = schema.vmdescription.build(m.VmDescription(b"{}"))
    assert schema.vmdescription_head_size == len(description) - 2
    eof = bytes(schema.eof.build(m.Eof()))
    assert schema.vmdescription_marker == eof + description[: schema.section_type_size]


@pytest.mark.parametrize("index", [0, 1, 5])
@pytest.mark.parametrize("block", ["pc.ram", "0000:00:02.0/vga.vram", "x"])
def test_discard_range_offset_points_at_the_range(block: str, index: int) -> None:
    schema = schema_for("7.2")
    ranges = tuple(m.DiscardRange(n << 12, (n + 1) << 12) for n in range(index + 1))
    command = schema.build_command(m.PostcopyRamDiscard(block, ranges))
    at = schema.discard_range_offset(block, index)
    assert at == schema.command_header_size + discard_range_offset(block, index)
    assert command[at : at + 16] == (index << 12).to_bytes(8, "big") + ((index + 1) << 12).to_bytes(
        8, "big"
    )


def test_find_trailing_vmdesc_finds_the_json_that_ends_the_stream() -> None:
    schema = schema_for("7.2")
    tail = bytes(schema.eof.build(m.Eof())) + schema.vmdescription.build(
        m.VmDescription(b'{"devices": []}')
    )
    data = b"\x00\x06junk" + tail
    assert find_trailing_vmdesc(data, 0, len(data), schema) == b'{"devices": []}'
    assert find_trailing_vmdesc(data, 0, len(data) - 1, schema) is None
    assert find_trailing_vmdesc(tail, 0, len(tail), schema) == b'{"devices": []}'
    assert find_trailing_vmdesc(tail, 1, len(tail), schema) is None  # EOF cut off


@pytest.mark.parametrize(
    ("field", "value"),
    [("mem_size_page_size", "when-it-feels-like-it"), ("mem_size_mr_addr", "sometimes")],
)
def test_an_unknown_mem_size_rule_is_refused_when_the_reader_is_made(
    field: str, value: str
) -> None:
    profile = dataclasses.replace(load_profile("7.2"), **{field: value})
    with pytest.raises(QmigError) as caught:
        StreamReader(schema=Schema(profile))
    assert caught.value.what == "profile"
    assert field in caught.value.detail and repr(value) in caught.value.detail


def test_the_known_mem_size_rules_are_taken() -> None:
    for version in VERSIONS:
        StreamReader(version)  # every profile's values have their case
    never = dataclasses.replace(load_profile("7.2"), mem_size_mr_addr="never")
    reader = StreamReader(schema=Schema(never))
    reader.context.capabilities = ("x-ignore-shared",)
    assert reader._mr_addr_rule() is False


def test_an_unknown_xbzrle_length_rule_is_refused() -> None:
    profile = dataclasses.replace(load_profile("7.2"), max_xbzrle_length="two-pages")
    with pytest.raises(QmigError) as caught:
        Schema(profile)
    assert "max_xbzrle_length" in caught.value.detail


@pytest.mark.parametrize("version", VERSIONS)
def test_the_xbzrle_length_check_is_the_profiles(version: str) -> None:
    schema = schema_for(version)
    limit = 1 << schema.profile.default_target_page_bits  # "target-page" in every profile
    body = schema.ram_bodies[schema.profile.ram_flags["XBZRLE"]]
    assert body.parse(b"\x01" + limit.to_bytes(2, "big") + bytes(limit)).length == limit
    with pytest.raises(Exception, match="overflows a page"):
        body.parse(b"\x01" + (limit + 1).to_bytes(2, "big") + bytes(limit + 1))
