"""The MEM_SIZE block list's optional fields, as QEMU's destination reads them.

An entry is ``cstr8 idstr, be64 used_length, [be64 page_size], [be64 mr_addr]``. The page size
is there when postcopy was advised and the block's page size is not the host's; the region
address when x-ignore-shared is on (the CONFIGURATION's capabilities say so). Neither is in
the bytes at that point: a reader given its own blocks decides as QEMU does, and one without
them (``qmig inspect``) must find the single layout the whole list admits.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.errors import MalformedError
from qmig.wire import messages as m
from qmig.wire.reader import END, NEED_DATA, Record, StreamReader
from qmig.wire.schema import schema_for

HOST = 4096
HUGE = 2 << 20
GIB = 1 << 30


def stream(
    version: str,
    blocks: tuple[m.RamBlockInfo, ...],
    *,
    ignore_shared: bool,
    advise: m.PostcopyAdvise | None,
) -> tuple[bytes, m.MemSize]:
    schema = schema_for(version)
    capabilities = ("x-ignore-shared",) if ignore_shared else None
    mem_size = m.MemSize(sum(block.used_length for block in blocks), blocks)
    data = schema.build_opening(m.Configuration("pc", capabilities=capabilities))
    if advise is not None:
        data += schema.build_command(advise)
    data += schema.build_section(m.SectionStart(2, "ram", 0, 4)) + schema.build_mem_size(mem_size)
    data += schema.build_ram_flag("EOS") + schema.build_footer(2) + b"\x00"
    return data, mem_size


def records(reader: StreamReader, data: bytes, chunk: int) -> list[Record]:
    out: list[Record] = []
    for at in range(0, len(data), chunk):
        reader.feed(data[at : at + chunk])
        while (record := reader.next_record()) is not NEED_DATA:
            assert isinstance(record, Record)
            out.append(record)
    reader.feed_eof()
    while (record := reader.next_record()) is not END:
        assert isinstance(record, Record)
        out.append(record)
    return out


def mem_size_of(reader: StreamReader, data: bytes, chunk: int | None = None) -> m.MemSize:
    found = [r.message for r in records(reader, data, chunk or len(data)) if r.name == "MEM_SIZE"]
    assert len(found) == 1
    return found[0]


@st.composite
def block_lists(draw: st.DrawFn, ignore_shared: bool) -> tuple[m.RamBlockInfo, ...]:
    """Blocks as a postcopy source describes them: a page size only where it is not the
    host's; page-aligned region addresses, often ones that look like a page size."""
    count = draw(st.integers(1, 6))
    idstrs = draw(st.lists(qs.names(1, 12), min_size=count, max_size=count, unique=True))
    blocks = []
    for idstr in idstrs:
        huge = draw(st.booleans())
        used = draw(st.integers(1, 64)) * (HUGE if huge else HOST)
        address = None
        if ignore_shared:
            address = draw(
                st.sampled_from([0, HOST, HUGE, 1 << 30, 1 << 32])
                | st.integers(0, (1 << 40) // HOST).map(lambda page: page * HOST)
            )
        blocks.append(m.RamBlockInfo(idstr, used, HUGE if huge else None, address))
    return tuple(blocks)


def advise_for(blocks: tuple[m.RamBlockInfo, ...]) -> m.PostcopyAdvise:
    summary = 0
    for block in blocks:
        summary |= block.page_size or HOST
    return m.PostcopyAdvise(summary, HOST)


@pytest.mark.parametrize("version", ["7.2", "10.0"])
@pytest.mark.parametrize("ignore_shared", [False, True])
@given(data=st.data())
@settings(max_examples=60, deadline=timedelta(seconds=5))
def test_inspect_reads_the_list_without_knowing_the_blocks(
    version: str, ignore_shared: bool, data: st.DataObject
) -> None:
    blocks = data.draw(block_lists(ignore_shared))
    raw, mem_size = stream(version, blocks, ignore_shared=ignore_shared, advise=advise_for(blocks))
    chunk = data.draw(st.sampled_from([len(raw), 1, 7, 64]))
    assert mem_size_of(StreamReader(version), raw, chunk) == mem_size


@pytest.mark.parametrize("version", ["7.2", "10.0"])
@given(data=st.data())
@settings(max_examples=30, deadline=timedelta(seconds=5))
def test_a_destination_reads_the_list_by_its_own_blocks(version: str, data: st.DataObject) -> None:
    blocks = data.draw(block_lists(ignore_shared=True))
    raw, mem_size = stream(version, blocks, ignore_shared=True, advise=advise_for(blocks))
    local = {block.idstr: block.page_size or HOST for block in blocks}
    assert mem_size_of(StreamReader(version, local_page_sizes=local), raw) == mem_size


def test_a_region_address_that_looks_like_a_page_size_is_read_as_an_address() -> None:
    blocks = (
        m.RamBlockInfo("pc.ram", 0x10000, None, HUGE),
        m.RamBlockInfo("mem", HUGE, HUGE, GIB),
    )
    raw, mem_size = stream("7.2", blocks, ignore_shared=True, advise=advise_for(blocks))
    assert mem_size_of(StreamReader("7.2"), raw) == mem_size


def test_no_page_size_without_a_postcopy_advise() -> None:
    # A 0-byte ADVISE (postcopy-ram off) and no ADVISE at all: the source writes no page size.
    blocks = (m.RamBlockInfo("pc.ram", HUGE, None, HUGE), m.RamBlockInfo("mem", HUGE, None, 0))
    for advise in (None, m.PostcopyAdvise()):
        raw, mem_size = stream("10.0", blocks, ignore_shared=True, advise=advise)
        assert mem_size_of(StreamReader("10.0"), raw) == mem_size


def test_no_region_address_in_2_9() -> None:
    # 2.9 has no x-ignore-shared: a page size is the only optional field.
    blocks = (m.RamBlockInfo("pc.ram", HUGE, None), m.RamBlockInfo("mem", HUGE, HUGE))
    raw, mem_size = stream("2.9", blocks, ignore_shared=False, advise=advise_for(blocks))
    assert mem_size_of(StreamReader("2.9"), raw) == mem_size


def test_a_list_no_layout_fits_is_reported_in_mem_size() -> None:
    # The lengths sum past the total claimed: whichever layout, the list is malformed.
    schema = schema_for("7.2")
    blocks = (m.RamBlockInfo("pc.ram", HUGE, HUGE, HUGE),)
    raw, _ = stream("7.2", blocks, ignore_shared=True, advise=advise_for(blocks))
    header = schema.build_section(m.SectionStart(2, "ram", 0, 4))
    at = raw.index(header) + len(header)
    bad = raw[:at] + schema.build_ram_flag("MEM_SIZE", HOST) + raw[at + 8 :]
    with pytest.raises(MalformedError) as caught:
        records(StreamReader("7.2"), bad, len(bad))
    assert caught.value.what == "MEM_SIZE"
    assert caught.value.offset is not None and at <= caught.value.offset < len(bad)
