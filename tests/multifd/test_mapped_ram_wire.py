"""The mapped-ram header and layout: round trips, QEMU's placement rule, and one error line
(offset and field) for offsets outside the file."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.errors import MalformedError, QmigError
from qmig.wire.mapped_ram import MappedRamHeader, mapped_ram_schema

PAGE = 4096


def test_header_is_28_packed_bytes() -> None:
    schema = mapped_ram_schema("10.0")
    data = schema.build_header(MappedRamHeader(1, PAGE, 0x1234, 0x100000))
    assert data == (
        (1).to_bytes(4, "big") + PAGE.to_bytes(8, "big") + (0x1234).to_bytes(8, "big")
    ) + (0x100000).to_bytes(8, "big")


def test_no_mapped_ram_before_9_0() -> None:
    with pytest.raises(QmigError, match="no mapped-ram format"):
        mapped_ram_schema("7.2")


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_header_round_trip_and_layout(data: st.DataObject) -> None:
    used = data.draw(st.integers(1, 4096)) * PAGE
    header, file_size = data.draw(qs.mapped_ram_headers("10.0", used_length=used))
    schema = mapped_ram_schema("10.0")
    assert schema.parse_header(schema.build_header(header), 0) == header
    layout = schema.layout("pc.ram", used, header, file_size, 0, PAGE)
    assert layout.stream_resumes_at == file_size
    assert header.pages_offset % 0x100000 == 0
    assert header.pages_offset >= header.bitmap_offset + layout.bitmap_size


@settings(max_examples=50, deadline=None)
@given(pages=st.integers(1, 300), data=st.data())
def test_bitmap_runs_round_trip(pages: int, data: st.DataObject) -> None:
    present = data.draw(st.sets(st.integers(0, pages - 1)))
    schema = mapped_ram_schema("10.0")
    bitmap = schema.build_bitmap(present, pages)
    assert len(bitmap) == schema.bitmap_size(pages * PAGE, PAGE)
    found = {
        p for start, count in schema.page_runs(bitmap, pages) for p in range(start, start + count)
    }
    assert found == present


def test_bitmap_is_host_unsigned_longs() -> None:
    # page 0 is bit 0 of the first little-endian 64-bit word; page 64 starts the second word
    bitmap = mapped_ram_schema("10.0").build_bitmap([0, 9, 64], 65)
    assert bitmap == bytes([1, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])


def test_hostile_headers_are_one_line_with_offset_and_field() -> None:
    schema = mapped_ram_schema("10.0")
    used = 16 * PAGE
    good = MappedRamHeader(1, PAGE, 1000, 0x100000)
    size = 0x100000 + used

    def refused(header: MappedRamHeader, file_size: int = size) -> MalformedError:
        with pytest.raises(MalformedError) as caught:
            schema.layout("pc.ram", used, header, file_size, 500, PAGE)
        assert "\n" not in str(caught.value)
        return caught.value

    schema.layout("pc.ram", used, good, size, 500, PAGE)
    bad = refused(MappedRamHeader(1, PAGE, 2**64 - 1, 0x100000))
    assert bad.offset == 512 and bad.detail.startswith("bitmap_offset:")
    bad = refused(MappedRamHeader(1, PAGE, 1000, size))
    assert bad.offset == 520 and bad.detail.startswith("pages_offset:")
    bad = refused(good, size - 1)
    assert "pages_offset" in bad.detail
    bad = refused(MappedRamHeader(1, 65536, 1000, 0x100000))
    assert bad.offset == 504 and "page_size: 65536" in bad.detail
    with pytest.raises(MalformedError, match="version: 2 is newer than 1") as caught:
        schema.parse_header(schema.build_header(MappedRamHeader(2, PAGE, 0, 0)), 77)
    assert caught.value.offset == 77
    with pytest.raises(MalformedError, match="runs past the end"):
        schema.parse_header(b"\0" * 27, 0)


def test_an_ignored_block_has_no_page_area() -> None:
    # x-ignore-shared: both offsets 0, the stream goes on right after the header
    schema = mapped_ram_schema("10.0")
    layout = schema.layout("mem", 1 << 40, MappedRamHeader(1, PAGE, 0, 0), 1000, 300, PAGE)
    assert layout.ignored and layout.pages == 0
    assert layout.stream_resumes_at == 300 + schema.header_size


@settings(max_examples=50, deadline=None)
@given(pages=st.integers(1, 700), data=st.data())
def test_bitmap_read_in_pieces_gives_the_same_runs(pages: int, data: st.DataObject) -> None:
    present = data.draw(st.sets(st.integers(0, pages - 1)))
    schema = mapped_ram_schema("10.0")
    bitmap = schema.build_bitmap(present, pages)
    step = data.draw(st.integers(1, 4)) * 8
    pieces = [bitmap[i : i + step] for i in range(0, len(bitmap), step)]
    assert list(schema.page_runs_in(pieces, pages)) == list(schema.page_runs(bitmap, pages))
