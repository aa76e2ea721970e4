"""The C fast path for page records decodes exactly what ``Schema.ram_record`` decodes.

Random runs of CONTINUE ZERO/PAGE records are followed by what ends a run: the end of the
buffer, a record cut short, a record of another kind, a record whose offset is outside the
block, or a full output array. ``RamScanner.scan`` must take exactly the run's records,
report the right stop reason, and give for each record the header and body position at
which the schema, parsing the record on its own, finds the same values. The reader's
``RamPageRun`` records must agree in the same way, and ``RamScanner.account`` must leave
each page's last contents in the image file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.errors import MalformedError
from qmig.wire import messages as m
from qmig.wire.profiles import available_versions
from qmig.wire.ramscan import RamScanner, Stop
from qmig.wire.reader import StreamReader
from qmig.wire.schema import Schema, schema_for

VERSIONS = available_versions()
BLOCK_PAGES = 64
SLOW = timedelta(seconds=5)
ENDINGS = ["end", "truncated", "other", "range", "full"]


@dataclass(frozen=True)
class Run:
    """A buffer holding a run of page records at ``start``, and what must stop the scan."""

    data: bytes
    start: int
    records: list[tuple[int, int]]  # (position, size) of each record of the run
    ending: str
    max_run: int

    @property
    def expected_count(self) -> int:
        return min(len(self.records), self.max_run)


def continue_pages(schema: Schema, fills: bytes | None = None) -> st.SearchStrategy[m.RamPage]:
    """CONTINUE ZERO/PAGE records inside a block of BLOCK_PAGES target pages.

    ZERO records carry any fill byte, or one of ``fills``.
    """
    page = schema.target_page_size
    offsets = st.integers(0, BLOCK_PAGES - 1).map(lambda index: index * page)
    fill = (
        st.binary(min_size=1, max_size=1)
        if fills is None
        else st.sampled_from([bytes([value]) for value in fills])
    )
    zero = st.builds(m.RamPage, st.none(), offsets, st.just(True), fill)
    full = st.builds(
        m.RamPage, st.none(), offsets, st.just(False), qs.page_contents(schema.profile.name)
    )
    return zero | full


@st.composite
def other_records(draw: st.DrawFn, schema: Schema) -> bytes:
    """A complete record that is not a CONTINUE ZERO/PAGE: the schema's to decode."""
    page = schema.target_page_size
    flags = schema.profile.ram_flags
    choices = [
        schema.build_ram_flag("EOS"),
        schema.build_ram_page(m.RamPage("pc.ram", page, True, b"\x00")),
        schema.build_ram_page(m.RamPage("pc.ram", 0, False, bytes(page))),
        schema.build_ram_xbzrle(m.RamXbzrle(None, page, b"\x01\x02")),
        schema.build_ram_xbzrle(m.RamXbzrle("pc.ram", page, b"")),
        schema.build_mem_size(m.MemSize(page, (m.RamBlockInfo("pc.ram", page),))),
        (page | flags["CONTINUE"]).to_bytes(8, "big"),  # CONTINUE alone: an unknown kind
        (page | flags["ZERO"] | flags["PAGE"] | flags["CONTINUE"]).to_bytes(8, "big") + b"\0",
    ]
    if "COMPRESS_PAGE" in flags:
        choices.append(schema.build_ram_compressed(m.RamCompressed(None, 0, b"x")))
    if "MULTIFD_FLUSH" in flags:
        choices.append(schema.build_ram_flag("MULTIFD_FLUSH"))
    return draw(st.sampled_from(choices))


@st.composite
def runs(draw: st.DrawFn, version: str) -> Run:
    schema = schema_for(version)
    page = schema.target_page_size
    lead = draw(st.binary(max_size=16))
    pages = draw(st.lists(continue_pages(schema), max_size=24))
    ending = draw(st.sampled_from(ENDINGS if pages else ENDINGS[:-1]))
    data = bytearray(lead)
    records = []
    for record in pages:
        encoded = schema.build_ram_page(record)
        records.append((len(data), len(encoded)))
        data += encoded
    max_run = 8192
    if ending == "truncated":
        cut = schema.build_ram_page(draw(continue_pages(schema)))
        data += cut[: draw(st.integers(0, len(cut) - 1))]
    elif ending == "other":
        data += draw(other_records(schema))
    elif ending == "range":
        outside = draw(st.integers(BLOCK_PAGES, 1 << 40)) * page
        zero = draw(st.booleans())
        body = b"\x00" if zero else bytes(page)
        data += schema.build_ram_page(m.RamPage(None, outside, zero, body))
    elif ending == "full":
        # The output arrays fill up at or before the last record of the run.
        max_run = draw(st.integers(1, len(pages)))
    return Run(bytes(data), len(lead), records, ending, max_run)


STOPS = {
    "end": Stop.SHORT,
    "truncated": Stop.SHORT,
    "other": Stop.OTHER,
    "range": Stop.RANGE,
    "full": Stop.FULL,
}


def schema_view(schema: Schema, data: bytes, position: int) -> tuple[int, bytes]:
    """(header, body) of the record at ``position``, as the schema parses it alone."""
    parsed = schema.ram_record.parse(data[position:])
    assert parsed.block is None and parsed.flags & schema.profile.ram_flags["CONTINUE"]
    body = parsed.body.data if "data" in parsed.body else bytes([parsed.body.fill])
    return parsed.header, body


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data(), base=st.integers(0, 1 << 48))
@settings(deadline=SLOW)
def test_scan_agrees_with_the_schema(version: str, data: st.DataObject, base: int) -> None:
    run = data.draw(runs(version))
    schema = schema_for(version)
    scanner = RamScanner(schema, max_run=run.max_run)
    block_length = BLOCK_PAGES * schema.target_page_size
    result = scanner.scan(run.data, run.start, base, block_length)

    count = run.expected_count
    assert result.count == count
    assert result.stop is STOPS[run.ending]
    taken = run.records[:count]
    assert result.next_pos == (taken[-1][0] + taken[-1][1] if taken else run.start)
    zeros = 0
    for (position, size), header, body in zip(taken, result.headers, result.bodies, strict=True):
        schema_header, schema_body = schema_view(schema, run.data, position)
        assert header == schema_header
        # The body starts after the 8-byte header; the scanner reports it absolutely.
        assert body == base + position + 8
        at = body - base
        assert run.data[at : at + len(schema_body)] == schema_body
        assert at + len(schema_body) == position + size
        zeros += len(schema_body) == 1
    assert result.zero_count == zeros


@pytest.mark.parametrize("version", VERSIONS)
def test_scan_of_a_cut_header_or_body_is_short(version: str) -> None:
    schema = schema_for(version)
    scanner = RamScanner(schema)
    record = schema.build_ram_page(m.RamPage(None, 0, False, b"\xab" * schema.target_page_size))
    for cut in range(len(record)):
        result = scanner.scan(record[:cut], 0, 0, 1 << 20)
        assert (result.count, result.stop, result.next_pos) == (0, Stop.SHORT, 0)
    assert scanner.scan(record, 0, 0, 1 << 20).count == 1


# --- records that name the run's block -------------------------------------------------------

NAMED_ENDINGS = ["end", "truncated", "other block", "same length", "range"]


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data(), base=st.integers(0, 1 << 48))
@settings(deadline=SLOW)
def test_records_naming_the_block_join_the_run(
    version: str, data: st.DataObject, base: int
) -> None:
    # Given the block's name, a record naming it is taken as a CONTINUE one is, its body
    # after the name; one naming another block (of the same name length, too) stops the
    # scan for the schema, as does one cut short anywhere or outside the block.
    schema = schema_for(version)
    page = schema.target_page_size
    named = continue_pages(schema).map(lambda p: m.RamPage("pc.ram", p.offset, p.zero, p.data))
    pages = data.draw(st.lists(continue_pages(schema) | named, max_size=16))
    ending = data.draw(st.sampled_from(NAMED_ENDINGS))
    buffer = bytearray(data.draw(st.binary(max_size=16)))
    start = len(buffer)
    records = []
    for record in pages:
        encoded = schema.build_ram_page(record)
        records.append((len(buffer), len(encoded), record))
        buffer += encoded
    if ending == "truncated":
        cut = schema.build_ram_page(data.draw(named))
        buffer += cut[: data.draw(st.integers(0, len(cut) - 1))]
    elif ending in ("other block", "same length"):
        name = "vga.vram" if ending == "other block" else "pc.rom"
        buffer += schema.build_ram_page(m.RamPage(name, 0, True, b"\x00"))
    elif ending == "range":
        buffer += schema.build_ram_page(m.RamPage("pc.ram", BLOCK_PAGES * page, True, b"\x00"))
    result = RamScanner(schema).scan(bytes(buffer), start, base, BLOCK_PAGES * page, b"pc.ram")

    stops = {"end": Stop.SHORT, "truncated": Stop.SHORT, "range": Stop.RANGE}
    assert (result.count, result.stop) == (len(pages), stops.get(ending, Stop.OTHER))
    assert result.next_pos == (records[-1][0] + records[-1][1] if records else start)
    assert result.zero_count == sum(record.zero for _p, _s, record in records)
    for (position, size, record), header, body in zip(
        records, result.headers, result.bodies, strict=True
    ):
        parsed = schema.ram_record.parse(bytes(buffer[position:]))
        assert parsed.block == record.block
        assert header == parsed.header
        body_size = 1 if record.zero else page
        assert body == base + position + size - body_size
        at = body - base
        assert bytes(buffer[at : at + body_size]) == record.data


@pytest.mark.parametrize("version", VERSIONS)
def test_without_the_name_a_record_naming_its_block_stops_the_scan(version: str) -> None:
    schema = schema_for(version)
    record = schema.build_ram_page(m.RamPage("pc.ram", 0, True, b"\x00"))
    result = RamScanner(schema).scan(record, 0, 0, 1 << 20)
    assert (result.count, result.stop) == (0, Stop.OTHER)
    assert RamScanner(schema).scan(record, 0, 0, 1 << 20, b"pc.ram").count == 1


# --- through the reader -----------------------------------------------------------------------


def stream_around(schema: Schema, run: Run) -> tuple[bytes, int]:
    """A stream whose ram section holds ``run``'s records; and where the run starts in it."""
    block = m.RamBlockInfo("pc.ram", BLOCK_PAGES * schema.target_page_size)
    data = schema.build_opening(m.Configuration("pc"))
    data += schema.build_section(m.SectionStart(2, "ram", 0, 4))
    data += schema.build_mem_size(m.MemSize(block.used_length, (block,)))
    data += schema.build_ram_page(m.RamPage("pc.ram", 0, True, b"\x00"))
    return data + run.data[run.start :], len(data) - run.start


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data(), chunk=st.integers(1, 9000))
@settings(deadline=SLOW)
def test_reader_page_runs_agree_with_the_schema(
    version: str, data: st.DataObject, chunk: int
) -> None:
    run = data.draw(runs(version))
    schema = schema_for(version)
    stream, shift = stream_around(schema, run)
    first_run_start = shift + run.start
    reader = StreamReader(version)
    seen: list[tuple[int, int, bool, bytes]] = []
    error = None
    try:
        for at in range(0, len(stream), chunk):
            reader.feed(stream[at : at + chunk])
            _collect(reader, seen)
        reader.feed_eof()
        _collect(reader, seen)
    except MalformedError as caught:
        error = caught
    # Every record of the run, as the schema reads it, in order (after the named first one).
    expected = []
    for position, _size in run.records:
        header, body = schema_view(schema, run.data, position)
        zero = len(body) == 1
        expected.append((shift + position, header & ~schema.flag_mask, zero, body))
    run_pages = [page for page in seen if page[0] >= first_run_start]
    assert run_pages[: len(expected)] == expected
    if run.ending == "range":
        assert error is not None and error.what == "RAM"
        assert error.offset == shift + (
            run.records[-1][0] + run.records[-1][1] if run.records else run.start
        )
    elif run.ending in ("end", "truncated", "full"):
        # No EOS: the input ends inside the section (or inside a record).
        assert error is not None


def _collect(reader: StreamReader, seen: list[tuple[int, int, bool, bytes]]) -> None:
    """Each page as (record offset, offset in block, is_zero, body), taken at once."""
    for record in reader:
        if isinstance(record.message, m.RamPageRun):
            run = record.message
            for (offset, zero, body), body_at in zip(run.pages(), run.bodies, strict=True):
                seen.append((body_at - 8, offset, zero, body))


# --- accounting ---------------------------------------------------------------------------


def check_account(schema: Schema, pages: list[m.RamPage]) -> None:
    page = schema.target_page_size
    buffer = b"".join(schema.build_ram_page(record) for record in pages)
    scanner = RamScanner(schema)
    result = scanner.scan(buffer, 0, 0, BLOCK_PAGES * page)
    assert result.count == len(pages)
    image = bytearray(BLOCK_PAGES * page)
    kinds = bytearray(BLOCK_PAGES)
    for record in pages:
        index = record.offset // page
        image[record.offset : record.offset + page] = (
            record.data * page if record.zero else record.data
        )
        kinds[index] = 2 if record.zero else 1
    state = bytearray(BLOCK_PAGES)
    with tempfile.TemporaryFile() as file:
        os.ftruncate(file.fileno(), len(image))
        scanner.account(buffer, 0, result.headers, result.bodies, state, file.fileno())
        file.seek(0)
        # Not a plain ==: pytest's diff of two 256 KiB images takes a minute.
        assert first_difference(file.read(), bytes(image)) is None
    assert state == kinds


def first_difference(actual: bytes, expected: bytes) -> int | None:
    if actual == expected:
        return None
    return next(
        (i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b),
        min(len(actual), len(expected)),
    )


@given(data=st.data())
@settings(max_examples=50, deadline=SLOW)
def test_account_leaves_each_pages_last_contents(data: st.DataObject) -> None:
    # Zero pages as QEMU 7.2 sends them (fill 0); other fills: see the test below.
    schema = schema_for("7.2")
    check_account(schema, data.draw(st.lists(continue_pages(schema, b"\x00"), max_size=24)))


def test_account_zero_page_after_a_same_byte_page() -> None:
    schema = schema_for("2.9")
    check_account(schema, [m.RamPage(None, 0, True, b"\x01"), m.RamPage(None, 0, True, b"\x00")])
