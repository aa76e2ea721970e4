"""Whole streams: what a QEMU source sends for a postcopy migration, with the facts to check."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from qmig.strategies.basics import LARGE_PAGE, _schema, names, page_contents, uints
from qmig.strategies.framing import configurations
from qmig.wire import messages as m
from qmig.wire.schema import Schema


@dataclass(frozen=True)
class ExpectedRecord:
    """A record a reader must yield (page records are in :attr:`GeneratedStream.pages`)."""

    message: Any
    depth: int = 0


@dataclass(frozen=True)
class ExpectedPage:
    """One ZERO or PAGE record, in the shape of ``RamPageRun.pages()``."""

    block: str
    offset: int
    zero: bool
    body: bytes  # the fill byte, or the page


@dataclass(frozen=True, repr=False)
class GeneratedStream:
    """A generated stream and what reading it must find."""

    version: str
    data: bytes = field(repr=False)
    records: tuple[ExpectedRecord, ...]  # every record except page records, in order
    pages: tuple[ExpectedPage, ...] = field(repr=False)  # every page record, in order
    blocks: tuple[m.RamBlockInfo, ...]
    ram_section_id: int

    def __repr__(self) -> str:
        # Falsifying examples print this: the facts, not tens of kilobytes of pages.
        names = " ".join(record.message.NAME for record in self.records)
        return (
            f"GeneratedStream(version={self.version!r}, {len(self.data)} bytes, "
            f"{len(self.pages)} page records, blocks={self.blocks!r}, records: {names})"
        )

    @property
    def messages(self) -> tuple[Any, ...]:
        return tuple(record.message for record in self.records)

    def page_records(self) -> Counter[str]:
        return Counter(page.block for page in self.pages)

    def zero_records(self) -> Counter[str]:
        return Counter(page.block for page in self.pages if page.zero)


class _Writer:
    """Collects bytes and the records they must read back as."""

    def __init__(self, schema: Schema, depth: int = 0) -> None:
        self.schema = schema
        self.depth = depth
        self.chunks: list[bytes] = []
        self.records: list[ExpectedRecord] = []
        self.pages: list[ExpectedPage] = []

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def add(self, message: Any, data: bytes) -> None:
        self.chunks.append(data)
        if not isinstance(message, ExpectedPage):
            self.records.append(ExpectedRecord(message, self.depth))

    def command(self, command: Any) -> None:
        self.add(command, self.schema.build_command(command))

    def section(self, header: Any) -> None:
        self.add(header, self.schema.build_section(header))

    def footer(self, section_id: int) -> None:
        self.add(m.SectionFooter(section_id), self.schema.build_footer(section_id))

    def eos(self) -> None:
        self.add(m.RamEos(), self.schema.build_ram_flag("EOS"))

    def page(self, page: m.RamPage, block: str) -> None:
        self.chunks.append(self.schema.build_ram_page(page))
        self.pages.append(ExpectedPage(block, page.offset, page.zero, page.data))

    def package(self, inner: _Writer) -> None:
        self.command(m.Packaged(len(inner.data)))
        self.chunks.extend(inner.chunks)
        self.records.extend(inner.records)
        self.pages.extend(inner.pages)
        self.records.append(ExpectedRecord(m.PackageEnd(), inner.depth))


@dataclass
class _Block:
    info: m.RamBlockInfo
    page_size: int

    @property
    def host_pages(self) -> int:
        return self.info.used_length // self.page_size


@st.composite
def _ram_blocks(
    draw: st.DrawFn, schema: Schema, max_blocks: int, large_page: int | None, mr_addr: bool
) -> list[_Block]:
    page = schema.target_page_size
    idstrs = draw(st.lists(names(1, 24), min_size=1, max_size=max_blocks, unique=True))
    large_index = draw(st.sampled_from(range(len(idstrs)))) if large_page else None
    blocks = []
    for index, idstr in enumerate(idstrs):
        large = large_page is not None and index == large_index
        page_size = large_page if large_page is not None and large else page
        used = draw(st.integers(1, 4 if large else 64)) * page_size
        # Multiples of 3 pages are never powers of two: a power of two here could be taken
        # for a page size by the reader (see test_hostile's MEM_SIZE ambiguity test).
        address = draw(st.integers(0, 1 << 30)) * 3 * page if mr_addr else None
        info = m.RamBlockInfo(idstr, used, page_size if large else None, address)
        blocks.append(_Block(info, page_size))
    return blocks


def _discards_for(block: _Block, host_pages: Sequence[int], per_command: int) -> list[Any]:
    """QEMU's discard commands for a block: merged runs of host pages, in order."""
    ranges: list[m.DiscardRange] = []
    for index in sorted(set(host_pages)):
        start = index * block.page_size
        if ranges and ranges[-1].start + ranges[-1].length == start:
            last = ranges.pop()
            ranges.append(m.DiscardRange(last.start, last.length + block.page_size))
        else:
            ranges.append(m.DiscardRange(start, block.page_size))
    return [
        m.PostcopyRamDiscard(block.info.idstr, tuple(ranges[at : at + per_command]))
        for at in range(0, len(ranges), per_command)
    ]


class _PageSender:
    """Sends host pages as QEMU does: whole host pages, CONTINUE while the block repeats."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.last_block: str | None = None

    def send(self, writer: _Writer, block: _Block, host_page: int, contents: list[bytes]) -> None:
        page = self.schema.target_page_size
        for index, data in enumerate(contents):
            offset = host_page * block.page_size + index * page
            zero = not any(data)  # QEMU sends ZERO for all-zero pages only
            name = block.info.idstr
            record = m.RamPage(
                None if name == self.last_block else name,
                offset,
                zero,
                data[:1] if zero else data,
            )
            writer.page(record, name)
            self.last_block = name


@st.composite
def _host_page_sends(
    draw: st.DrawFn, schema: Schema, blocks: list[_Block], max_pages: int
) -> list[tuple[_Block, int, list[bytes]]]:
    sends = []
    page = schema.target_page_size
    for _ in range(draw(st.integers(0, max_pages))):
        block = draw(st.sampled_from(blocks))
        host_page = draw(st.integers(0, block.host_pages - 1))
        pieces = block.page_size // page
        if pieces == 1:
            contents = [draw(page_contents(schema.profile.name))]
        else:
            # A large page: mostly zero pages, which keeps the stream small.
            data_at = draw(st.none() | st.integers(0, pieces - 1))
            contents = [bytes(page)] * pieces
            if data_at is not None:
                contents[data_at] = draw(page_contents(schema.profile.name))
        sends.append((block, host_page, contents))
    return sends


def _device_payloads(schema: Schema, max_size: int) -> st.SearchStrategy[bytes]:
    # No footer byte: qmig finds the end of a device's state inside PACKAGED by its footer.
    footer = bytes([schema.profile.section_types["SECTION_FOOTER"]])
    other = bytes([footer[0] ^ 1])
    return st.binary(max_size=max_size).map(lambda data: data.replace(footer, other))


@st.composite
def postcopy_streams(
    draw: st.DrawFn,
    version: str = "7.2",
    *,
    max_blocks: int = 4,
    max_precopy_sections: int = 3,
    max_postcopy_sections: int = 3,
    max_pages_per_section: int = 6,
    max_devices: int = 4,
    max_device_size: int = 48,
    large_pages: bool | None = None,
    large_page_size: int = LARGE_PAGE,
) -> GeneratedStream:
    """The stream a QEMU source sends for a postcopy migration, with the facts to check.

    ``large_pages``: whether one RAMBlock uses pages of ``large_page_size`` (its MEM_SIZE
    entry then carries the page size, its pages go out as whole host pages, its discards
    are aligned to them); ``None`` lets hypothesis choose.
    """
    schema = _schema(version)
    profile = schema.profile
    out = _Writer(schema)
    opening = m.StreamHeader(profile.stream_version)
    out.add(opening, bytes(schema.header.build(opening)))
    configuration = draw(configurations(version))
    out.add(configuration, bytes(schema.configuration.build(configuration)))
    ignore_shared = profile.mem_size_mr_addr == "x-ignore-shared" and "x-ignore-shared" in (
        configuration.capabilities or ()
    )
    use_large = draw(st.booleans()) if large_pages is None else large_pages
    large_page = large_page_size if use_large else None
    blocks = draw(_ram_blocks(schema, max_blocks, large_page, ignore_shared))

    out.command(m.OpenReturnPath())
    out.command(m.Ping(1))
    summary = 0
    for block in blocks:
        summary |= block.page_size
    out.command(m.PostcopyAdvise(summary, schema.target_page_size))

    ram_id = draw(uints(32))
    infos = tuple(block.info for block in blocks)
    out.section(m.SectionStart(ram_id, "ram", 0, profile.ram_section_version))
    mem_size = m.MemSize(sum(info.used_length for info in infos), infos)
    out.add(mem_size, schema.build_mem_size(mem_size))
    out.eos()
    out.footer(ram_id)

    sender = _PageSender(schema)

    def ram_section(header: Any) -> None:
        out.section(header)
        for block, host_page, contents in draw(
            _host_page_sends(schema, blocks, max_pages_per_section)
        ):
            sender.send(out, block, host_page, contents)
        out.eos()
        out.footer(ram_id)

    for _ in range(draw(st.integers(0, max_precopy_sections))):
        ram_section(m.SectionPart(ram_id))

    if "SWITCHOVER_START" in profile.commands and draw(st.booleans()):
        out.command(m.SwitchoverStart())
    for block in blocks:
        dirty = draw(st.lists(st.integers(0, block.host_pages - 1), max_size=30))
        for command in _discards_for(block, dirty, profile.max_discard_ranges):
            out.command(command)
    out.command(m.Ping(2))

    package = _Writer(schema, depth=1)
    package.command(m.PostcopyListen())
    device_ids = draw(
        st.lists(uints(32).filter(lambda sid: sid != ram_id), unique=True, max_size=max_devices)
    )
    for section_id in device_ids:
        header = m.SectionFull(section_id, draw(names(1, 24)), draw(uints(32)), draw(uints(32)))
        package.section(header)
        state = draw(_device_payloads(schema, max_device_size))
        package.add(m.DeviceState(header.idstr, header.instance_id, state), state)
        package.footer(section_id)
    package.command(m.Ping(3))
    if profile.package_loaded_ping is not None:
        package.command(m.Ping(profile.package_loaded_ping))
    package.command(m.PostcopyRun())
    out.package(package)
    out.command(m.Ping(4))

    for _ in range(draw(st.integers(0, max_postcopy_sections))):
        ram_section(m.SectionPart(ram_id))
    ram_section(m.SectionEnd(ram_id))
    out.add(m.Eof(), bytes(schema.eof.build(m.Eof())))
    return GeneratedStream(
        version=profile.name,
        data=out.data,
        records=tuple(out.records),
        pages=tuple(out.pages),
        blocks=infos,
        ram_section_id=ram_id,
    )
