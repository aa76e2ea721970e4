"""Build → parse → build is the identity for every message, and whole streams read back whole.

Messages come from :mod:`qmig.strategies`; each is built with its version's schema, parsed
back, compared with the original and built again byte for byte. Whole generated postcopy
streams must be read with every byte in exactly one record, in order, finding every
message and page the generator put in, whatever the chunk sizes they are fed in.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.inspect import StreamInspection
from qmig.wire import messages as m
from qmig.wire.profiles import available_versions
from qmig.wire.reader import END, Record, ReturnPathReader, StreamReader
from qmig.wire.schema import Schema, mem_size_params, schema_for

VERSIONS = available_versions()
# A whole stream is tens of kilobytes of pages; reading it takes milliseconds, so seconds
# mean the reader has gone quadratic (or worse), not that the machine is busy.
SLOW = timedelta(seconds=5)


def parse_exact(construct: Any, data: bytes, **context: Any) -> Any:
    stream = io.BytesIO(data)
    value = construct.parse_stream(stream, **context)
    assert stream.tell() == len(data), "the parse left bytes over"
    return value


def parse_command(schema: Schema, data: bytes) -> Any:
    header = schema.command_header.parse(data)
    assert header.len == len(data) - 5
    name = schema.profile.command_names[header.cmd]
    return parse_exact(schema.command_payloads[name], data[5:], len=header.len)


def parse_rp(schema: Schema, data: bytes) -> Any:
    """A return-path message, with the bitmap that follows RECV_BITMAP outside its length."""
    header = schema.rp_header.parse(data)
    name = schema.profile.rp_names[header.type]
    end = 4 + header.len
    message = parse_exact(schema.rp_payloads[name], data[4:end], len=header.len)
    if name in schema.rp_trailers:
        trailer = parse_exact(schema.rp_trailers[name], data[end:])
        return dataclasses.replace(message, bitmap=trailer.bitmap)
    assert end == len(data)
    return message


def parse_ram(schema: Schema, data: bytes, page_size: bool, mr_addr: bool) -> Any:
    """One RAM record as a message; the MEM_SIZE fields' presence is not in the bytes."""
    flags = schema.profile.ram_flags
    header = int.from_bytes(data[:8], "big")
    if header & schema.flag_mask == flags["MEM_SIZE"]:
        stream = io.BytesIO(data[8:])
        rules = mem_size_params(lambda ctx: page_size, mr_addr)
        total = remaining = header & ~schema.flag_mask
        blocks = []
        while remaining:
            blocks.append(schema.mem_size_block.parse_stream(stream, rules=rules))
            remaining -= blocks[-1].used_length
        assert stream.tell() == len(data) - 8
        return m.MemSize(total, tuple(blocks))
    record = parse_exact(schema.ram_record, data)
    block = None if record.flags & flags["CONTINUE"] else record.block
    kind = record.kind
    if kind in (flags["ZERO"], flags["PAGE"]):
        zero = kind == flags["ZERO"]
        return m.RamPage(
            block, record.offset, zero, bytes([record.body.fill]) if zero else record.body.data
        )
    if kind == flags["XBZRLE"]:
        return m.RamXbzrle(block, record.offset, record.body.data)
    if kind == flags.get("COMPRESS_PAGE"):
        return m.RamCompressed(block, record.offset, record.body.data)
    if kind == flags["HOOK"]:
        return m.RamHook(record.offset)
    return {flags["EOS"]: m.RamEos(), flags.get("MULTIFD_FLUSH"): m.RamMultifdFlush()}[kind]


# --- single messages ----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
def test_commands_round_trip(version: str, data: st.DataObject) -> None:
    schema = schema_for(version)
    command = data.draw(qs.commands(version))
    wire = schema.build_command(command)
    assert wire[0] == schema.profile.section_types["COMMAND"]
    parsed = parse_command(schema, wire)
    assert parsed == command
    assert schema.build_command(parsed) == wire


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
def test_return_path_messages_round_trip(version: str, data: st.DataObject) -> None:
    schema = schema_for(version)
    message = data.draw(qs.return_path_messages(version))
    wire = schema.build_rp(message)
    parsed = parse_rp(schema, wire)
    assert parsed == message
    assert schema.build_rp(parsed) == wire


@pytest.mark.parametrize("version", ["7.2", "10.0"])
@given(
    block=qs.names(),
    words=st.lists(st.integers(0, (1 << 64) - 1), max_size=40),
    chunk=st.integers(1, 64),
)
def test_recv_bitmap_round_trips_with_its_bitmap(
    version: str, block: str, words: list[int], chunk: int
) -> None:
    schema = schema_for(version)
    bitmap = b"".join(word.to_bytes(8, "little") for word in words)
    message = m.RpRecvBitmap(block, bitmap)
    wire = schema.build_rp(message) + schema.build_rp(m.Pong(7))
    assert parse_rp(schema, schema.build_rp(message)) == message
    reader = ReturnPathReader(version)
    records: list[Record] = []
    for at in range(0, len(wire), chunk):
        reader.feed(wire[at : at + chunk])
        records.extend(reader)
    reader.feed_eof()
    records.extend(reader)
    assert [record.message for record in records] == [message, m.Pong(7)]
    assert records[0].size == len(wire) - 8  # the bitmap is part of the RECV_BITMAP record
    expected = [
        64 * i + bit for i, word in enumerate(words) for bit in range(64) if word >> bit & 1
    ]
    assert message.received_pages() == expected


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
def test_ram_records_round_trip(version: str, data: st.DataObject) -> None:
    schema = schema_for(version)
    record = data.draw(qs.ram_records(version))
    wire = qs.build_ram_record(schema, record)
    parsed = parse_ram(schema, wire, page_size=False, mr_addr=False)
    assert parsed == record
    assert qs.build_ram_record(schema, parsed) == wire


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data(), page_size=st.booleans(), mr_addr=st.booleans())
def test_mem_size_with_optional_fields_round_trips(
    version: str, data: st.DataObject, page_size: bool, mr_addr: bool
) -> None:
    schema = schema_for(version)
    mem_size = data.draw(qs.mem_sizes(version, page_size=page_size, mr_addr=mr_addr))
    wire = schema.build_mem_size(mem_size)
    parsed = parse_ram(schema, wire, page_size, mr_addr)
    assert parsed == mem_size
    assert schema.build_mem_size(parsed) == wire


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
def test_framing_round_trips(version: str, data: st.DataObject) -> None:
    schema = schema_for(version)
    configuration = data.draw(qs.configurations(version, any_page_bits=True))
    header = data.draw(qs.section_headers())
    footer = data.draw(qs.section_footers())
    description = data.draw(qs.vm_descriptions())
    cases: list[tuple[Any, Any, Any]] = [
        (m.StreamHeader(3), schema.header.build, schema.header),
        (configuration, schema.configuration.build, schema.configuration),
        (header, schema.build_section, _section_schema(schema, header)),
        (footer, schema.section_footer.build, schema.section_footer),
        (m.Eof(), schema.eof.build, schema.eof),
        (description, schema.vmdescription.build, schema.vmdescription),
    ]
    for message, build, construct in cases:
        wire = bytes(build(message))
        parsed = parse_exact(construct, wire)
        assert parsed == message
        assert bytes(build(parsed)) == wire


def _section_schema(schema: Schema, header: Any) -> Any:
    return {
        m.SectionStart: schema.section_start,
        m.SectionFull: schema.section_full,
        m.SectionPart: schema.section_part,
        m.SectionEnd: schema.section_end,
    }[type(header)]


# --- whole streams ----------------------------------------------------------------------------


def read_in_chunks(
    version: str, data: bytes, sizes: list[int]
) -> tuple[list[Record], list[qs.ExpectedPage]]:
    """Every record, feeding ``data`` in chunks of ``sizes`` (cycled).

    A page run's bytes are valid only until the reader is fed again, so pages are taken
    out as each run arrives.
    """
    reader = StreamReader(version)
    records: list[Record] = []
    pages: list[qs.ExpectedPage] = []

    def drain() -> None:
        for record in reader:
            records.append(record)
            if isinstance(record.message, m.RamPageRun):
                run = record.message
                for offset, zero, body in run.pages():
                    pages.append(qs.ExpectedPage(run.block, offset, zero, body))
            assert len(records) <= 2 * len(data) + 8, "the reader is not making progress"

    at = 0
    index = 0
    while at < len(data):
        size = sizes[index % len(sizes)]
        reader.feed(data[at : at + size])
        at += size
        index += 1
        drain()
    reader.feed_eof()
    drain()
    assert reader.next_record() is END
    return records, pages


def check_stream(stream: qs.GeneratedStream, records: list[Record], pages: list[Any]) -> None:
    # Every byte in exactly one record, in order.
    assert records[0].offset == 0
    for before, after in itertools.pairwise(records):
        assert after.offset == before.offset + before.size
    assert sum(record.size for record in records) == len(stream.data)
    # The generator's facts.
    found = [
        qs.ExpectedRecord(record.message, record.depth)
        for record in records
        if not isinstance(record.message, m.RamPageRun)
    ]
    assert found == list(stream.records)
    assert pages == list(stream.pages)
    runs = [r.message for r in records if isinstance(r.message, m.RamPageRun)]
    assert sum(run.count for run in runs) == len(stream.pages)
    assert Counter({b: n for b, n in _run_counts(runs, zeros=True).items() if n}) == (
        stream.zero_records()
    )


def _run_counts(runs: list[m.RamPageRun], zeros: bool) -> Counter[str]:
    counts: Counter[str] = Counter()
    for run in runs:
        counts[run.block] += run.zero_count if zeros else run.count
    return counts


@pytest.mark.parametrize("version", VERSIONS)
@given(stream=st.data())
@settings(deadline=SLOW)
def test_generated_streams_read_back_whole(version: str, stream: st.DataObject) -> None:
    generated = stream.draw(qs.postcopy_streams(version))
    records, pages = read_in_chunks(version, generated.data, [len(generated.data)])
    check_stream(generated, records, pages)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=20, deadline=SLOW)
def test_generated_streams_read_back_whole_in_any_chunks(version: str, data: st.DataObject) -> None:
    generated = data.draw(qs.postcopy_streams(version, max_pages_per_section=2))
    sizes = data.draw(
        st.lists(
            st.one_of(st.integers(1, 16), st.integers(1, 9000)),
            min_size=1,
            max_size=8,
        )
    )
    records, pages = read_in_chunks(version, generated.data, sizes)
    check_stream(generated, records, pages)


@given(
    qs.postcopy_streams(
        "7.2", max_pages_per_section=2, max_precopy_sections=1, max_postcopy_sections=1
    )
)
@settings(max_examples=10, deadline=SLOW)
def test_byte_at_a_time_reads_the_same_records(stream: qs.GeneratedStream) -> None:
    whole, _ = read_in_chunks(stream.version, stream.data, [len(stream.data)])
    single, pages = read_in_chunks(stream.version, stream.data, [1])
    assert pages == list(stream.pages)
    # Chunking may split page runs differently, nothing else.
    assert [r for r in single if r.name != "RAM"] == [r for r in whole if r.name != "RAM"]


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=25, deadline=SLOW)
def test_inspection_counts_match_the_generator(version: str, data: st.DataObject) -> None:
    generated = data.draw(qs.postcopy_streams(version))
    reader = StreamReader(version)
    inspection = StreamInspection(reader)
    reader.feed(generated.data)
    reader.feed_eof()
    for record in reader:
        inspection.add(record)
    report = inspection.as_json()
    assert report["bytes"] == len(generated.data)
    for info in generated.blocks:
        figures = report["ram_blocks"][info.idstr]
        assert figures["used_length"] == info.used_length
        assert figures["page_records"] == generated.page_records()[info.idstr]
        assert figures["zero_records"] == generated.zero_records()[info.idstr]
    names = Counter(
        r.message.NAME for r in generated.records if not isinstance(r.message, m.PackageEnd)
    )
    for name in ("PING", "POSTCOPY_RAM_DISCARD", "SECTION_FULL", "SECTION_PART", "EOF"):
        assert report["counts"].get(name, 0) == names[name]


@given(qs.postcopy_streams("7.2"))
@settings(deadline=SLOW)
def test_generated_discards_follow_qemus_rules(stream: qs.GeneratedStream) -> None:
    blocks = {info.idstr: info for info in stream.blocks}
    discards = [msg for msg in stream.messages if isinstance(msg, m.PostcopyRamDiscard)]
    for discard in discards:
        info = blocks[discard.block]
        page_size = info.page_size or schema_for("7.2").target_page_size
        assert 1 <= len(discard.ranges) <= 12
        for piece in discard.ranges:
            assert piece.start % page_size == 0 and piece.length % page_size == 0
            assert piece.length > 0 and piece.start + piece.length <= info.used_length
