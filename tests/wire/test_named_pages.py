"""A ZERO/PAGE record that names its block is read without construct.

``RamSectionReader._read_named_page`` reads such a record as ``Schema.ram_record`` does, and
the C scanner takes one that names the block of the run it is in into that run; the schema
still reads every record it does not take whole. Whichever reads a named record, the reader
must give the same pages in the same order (in fewer runs, where named records join them)
and end with the same error at the same offset: ram
sections of named and CONTINUE page records (blocks known, unknown, with an empty or a
255-byte name; offsets inside a block and past its end), whole, cut anywhere, or with one
byte changed, fed in pieces of any size.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.profiles import available_versions
from qmig.wire.reader import StreamReader
from qmig.wire.reading.ram_section import RamSectionReader
from qmig.wire.schema import Schema, schema_for

VERSIONS = available_versions()
BLOCKS = (("pc.ram", 16), ("vga.vram", 2))  # (name, target pages)
NAMES = [None, "pc.ram", "vga.vram", "", "nope", "n" * 255]  # None: CONTINUE


def page_records(schema: Schema) -> st.SearchStrategy[m.RamPage]:
    """A ZERO or PAGE record naming one of NAMES, at a page inside or past the blocks."""
    page = schema.target_page_size
    offsets = st.integers(0, BLOCKS[0][1]).map(lambda index: index * page)
    zero = st.builds(
        m.RamPage, st.sampled_from(NAMES), offsets, st.just(True), st.binary(min_size=1, max_size=1)
    )
    full = st.builds(
        m.RamPage,
        st.sampled_from(NAMES),
        offsets,
        st.just(False),
        qs.page_contents(schema.profile.name),
    )
    return zero | full


def ram_section(schema: Schema, pages: list[m.RamPage]) -> tuple[bytes, int]:
    """A stream whose ram section holds ``pages``, then EOS, the section's end and the
    stream's; and where the pages start."""
    page = schema.target_page_size
    blocks = tuple(m.RamBlockInfo(name, count * page) for name, count in BLOCKS)
    data = schema.build_opening(m.Configuration("pc"))
    data += schema.build_section(m.SectionStart(2, "ram", 0, 4))
    data += schema.build_mem_size(m.MemSize(sum(b.used_length for b in blocks), blocks))
    start = len(data)
    for record in pages:
        data += schema.build_ram_page(record)
    data += schema.build_ram_flag("EOS")
    if schema.profile.section_footer:
        data += bytes(schema.section_footer.build(m.SectionFooter(2)))
    return data + bytes(schema.eof.build(m.Eof())), start


def read(stream: bytes, version: str, chunk: int, *, fast: bool) -> tuple[list[Any], str | None]:
    """Every record the reader gives for ``stream`` fed ``chunk`` bytes at a time, then EOF,
    and the one-line error it ends with (None: none). Not ``reading.read_outcome``: a page
    run points into the reader's buffer, which it reuses as it reads on, so each record is
    described as it comes."""
    reader = StreamReader(version)
    reader.named_fast_path = fast
    seen: list[Any] = []
    try:
        for at in range(0, len(stream), chunk):
            reader.feed(stream[at : at + chunk])
            seen += [describe(record) for record in reader]
        reader.feed_eof()
        seen += [describe(record) for record in reader]
    except QmigError as error:
        return joined(seen), f"{type(error).__name__}: {error.one_line()}"
    return joined(seen), None


def joined(seen: list[Any]) -> list[Any]:
    """``seen`` with each page run that follows one of its block, byte for byte, joined to
    it: what runs the pages come in is the reader's choice, the pages are not."""
    out: list[Any] = []
    for entry in seen:
        if len(entry) == 4 and out and len(out[-1]) == 4:
            offset, size, block, pages = out[-1]
            if block == entry[2] and offset + size == entry[0]:
                out[-1] = (offset, size + entry[1], block, pages + entry[3])
                continue
        out.append(entry)
    return out


def describe(record: Any) -> Any:
    """A record as comparable values: a page run by its block and pages."""
    message = record.message
    if isinstance(message, m.RamPageRun):
        pages = [(offset, zero, bytes(body)) for offset, zero, body in message.pages()]
        return record.offset, record.size, message.block, pages
    return record.offset, record.size, repr(message)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data(), chunk=st.integers(1, 9000))
@settings(max_examples=60, deadline=None)
def test_named_records_read_as_the_schema_reads_them(
    version: str, data: st.DataObject, chunk: int
) -> None:
    schema = schema_for(version)
    pages = data.draw(st.lists(page_records(schema), min_size=1, max_size=8))
    stream, start = ram_section(schema, pages)
    cut = data.draw(st.sampled_from(["whole", "cut", "changed"]))
    if cut == "cut":
        stream = stream[: data.draw(st.integers(start, len(stream) - 1))]
    elif cut == "changed":
        at = data.draw(st.integers(start, len(stream) - 1))
        stream = stream[:at] + bytes([data.draw(st.integers(0, 255))]) + stream[at + 1 :]
    assert read(stream, version, chunk, fast=True) == read(stream, version, chunk, fast=False)


@pytest.mark.parametrize("version", VERSIONS)
def test_whole_named_records_never_reach_the_schema(version: str) -> None:
    schema = schema_for(version)
    page = schema.target_page_size
    pages = [
        m.RamPage("pc.ram", 3 * page, False, bytes(range(256)) * (page // 256)),
        m.RamPage("vga.vram", page, True, b"\x00"),
        m.RamPage("pc.ram", 0, True, b"\x07"),
    ]
    stream, _start = ram_section(schema, pages)
    refuse = mock.patch.object(
        RamSectionReader, "_read_one_ram_record", side_effect=AssertionError("schema path")
    )
    with refuse:
        seen, error = read(stream, version, len(stream), fast=True)
    assert error is None
    runs = [entry for entry in seen if len(entry) == 4]
    assert [(block, run_pages[0][:2]) for _o, _s, block, run_pages in runs] == [
        ("pc.ram", (3 * page, False)),
        ("vga.vram", (page, True)),
        ("pc.ram", (0, True)),
    ]
    assert runs[0][3][0][2] == pages[0].data


@pytest.mark.parametrize("version", VERSIONS)
def test_records_naming_the_runs_block_join_the_run(version: str) -> None:
    # As postcopy sends them: a requested page, then the background's next, each naming
    # the block again, between runs that CONTINUE it.
    schema = schema_for(version)
    page = schema.target_page_size
    pages = [
        m.RamPage("pc.ram", 0, False, bytes([1]) * page),
        m.RamPage(None, page, True, b"\x00"),
        m.RamPage("pc.ram", 9 * page, False, bytes([2]) * page),
        m.RamPage("pc.ram", 2 * page, True, b"\x03"),
        m.RamPage(None, 3 * page, False, bytes([4]) * page),
        m.RamPage("vga.vram", 0, True, b"\x05"),
        m.RamPage("pc.ram", 4 * page, True, b"\x06"),
    ]
    stream, start = ram_section(schema, pages)
    reader = StreamReader(version)
    reader.feed(stream)
    runs = [
        (record.offset, record.size, record.message.block, record.message.pages())
        for record in reader
        if isinstance(record.message, m.RamPageRun)
    ]
    assert [
        (offset, block, [(at, zero) for at, zero, _body in got]) for offset, _s, block, got in runs
    ] == [
        (
            start,
            "pc.ram",
            [(0, False), (page, True), (9 * page, False), (2 * page, True), (3 * page, False)],
        ),
        (runs[1][0], "vga.vram", [(0, True)]),
        (runs[2][0], "pc.ram", [(4 * page, True)]),
    ]
    assert runs[0][0] + runs[0][1] == runs[1][0] and runs[1][0] + runs[1][1] == runs[2][0]
    assert [body for _at, _zero, body in runs[0][3]] == [
        bytes([1]) * page,
        b"\x00",
        bytes([2]) * page,
        b"\x03",
        bytes([4]) * page,
    ]
