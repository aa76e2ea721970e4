"""Hypothesis strategies for QEMU's migration wire: messages, whole streams, broken streams.

These are the generators qmig's own property tests use; fuzz your code with them too. Every
strategy that depends on the wire format takes a QEMU ``version`` (a profile in
``formats/``: ``"2.9"``, ``"7.2"``, ``"10.0"``) and generates only what that version knows.

**Messages.** One small strategy per message, each producing a value of
:mod:`qmig.wire.messages` that the version's :class:`~qmig.wire.schema.Schema` can build:
:func:`pings`, :func:`postcopy_advises`, :func:`postcopy_ram_discards`, ... (every
QEMU_VM_COMMAND), :func:`pongs`, :func:`req_pages_ids`, ... (every return-path message),
:func:`ram_pages`, :func:`mem_sizes`, :func:`ram_block_infos`, ... (RAM records),
:func:`section_headers`, :func:`configurations`. :func:`commands`,
:func:`return_path_messages` and :func:`ram_records` pick any of them; :func:`encoded`
pairs a message with its bytes::

    from hypothesis import given
    from qmig import strategies as qs
    from qmig.wire.schema import schema_for

    @given(qs.commands("7.2"))
    def test_command_round_trip(command):
        schema = schema_for("7.2")
        data = schema.build_command(command)
        payload = schema.command_payloads[command.NAME]
        assert payload.parse(data[5:], len=len(data) - 5) == command

**Whole streams.** :func:`postcopy_streams` composes them into the stream a QEMU source
sends for a postcopy migration (header, CONFIGURATION, OPEN_RETURN_PATH, PING, ADVISE, the
``ram`` SECTION_START with its MEM_SIZE list, precopy PARTs with pages, discards, PING,
PACKAGED(LISTEN, device SECTION_FULLs with footers, PING, RUN), PING, postcopy PARTs, END,
EOF), with consistent section ids and RAMBlocks. It returns a :class:`GeneratedStream`: the
bytes plus the facts a reader must find in them::

    from qmig.wire.reader import StreamReader

    @given(qs.postcopy_streams("7.2"))
    def test_reader_finds_every_page(stream):
        reader = StreamReader(stream.version)
        reader.feed(stream.data)
        reader.feed_eof()
        runs = [r.message for r in reader if r.message.NAME == "RAM"]
        assert sum(run.count for run in runs) == len(stream.pages)

**Broken streams.** The ``invalid_*`` strategies each produce an :class:`InvalidStream`:
the bytes (``.data``) of an otherwise valid stream (or return path, see ``.channel``) with
one targeted defect, the WHAT that the error must name and the byte range of the faulty
record::

    import pytest
    from qmig.errors import MalformedError

    @given(qs.invalid_unknown_commands("2.9"))
    def test_unknown_commands_are_refused(bad):
        reader = StreamReader("2.9")
        reader.feed(bad.data)
        reader.feed_eof()
        with pytest.raises(MalformedError) as caught:
            list(reader)
        assert caught.value.what == bad.what
        assert bad.start <= caught.value.offset < bad.end

Use ``.map(lambda bad: bad.data)`` where only the bytes are wanted. The readers
(:class:`~qmig.wire.reader.StreamReader`, :class:`~qmig.wire.reader.ReturnPathReader`)
refuse every variant whose defect is in the bytes alone; discard ranges outside or
unaligned to their block, REQ_PAGES with no previous block and empty requested block names
are well-formed bytes that :mod:`qmig.protocol`'s ``Destination`` and ``Source`` refuse,
since only they know the blocks and the requests so far.

**Command orders.** :func:`command_orders` gives well-formed postcopy commands, page
records and EOF in any order behind a valid opening (a :class:`CommandOrder`): what a
destination refuses there is the order alone, to check against QEMU's PostcopyState rules.

Sizes are kept small (a few RAMBlocks of up to 64 target pages, a handful of pages per
section) so that a property runs in milliseconds; the keyword arguments raise them.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hypothesis import strategies as st

from qmig.wire import messages as m
from qmig.wire.profiles import Profile, available_versions, load_profile
from qmig.wire.schema import Schema, schema_for

U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
MAX_NAME = 255  # a counted string's length is one byte
HUGE_PAGE = 2 << 20
# The large-page block of a generated stream: 64 KiB pages (as on some aarch64 hosts) keep
# whole host pages at 16 records; with 2 MiB pages every stream would carry 512 per page.
LARGE_PAGE = 64 << 10
# Characters QEMU uses in section idstrs and RAMBlock names ("pc.ram", "0000:00:02.0/vga.vram").
NAME_ALPHABET = string.ascii_letters + string.digits + "._-/:@"
FOOTER_BYTE = 0x7E


def _schema(version: str | None) -> Schema:
    return schema_for(version)


def _profile(version: str | None) -> Profile:
    return load_profile(version)


def uints(bits: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << bits) - 1)


def names(
    min_size: int = 1, max_size: int = MAX_NAME, *, any_byte: bool = False
) -> st.SearchStrategy[str]:
    """Names as counted strings carry them: QEMU-like by default, any latin-1 byte on request."""
    alphabet: Any = st.characters(max_codepoint=0xFF) if any_byte else NAME_ALPHABET
    return st.text(alphabet=alphabet, min_size=min_size, max_size=max_size)


def page_offsets(version: str | None = None, limit: int = 1 << 52) -> st.SearchStrategy[int]:
    """Offsets that fit a RAM record header: multiples of the target page size."""
    page = _schema(version).target_page_size
    return st.integers(0, limit - 1).map(lambda index: index * page)


def page_contents(version: str | None = None) -> st.SearchStrategy[bytes]:
    """One target page: a repeated byte or pseudo-random bytes (cheap to draw and shrink)."""
    page = _schema(version).target_page_size
    return st.one_of(
        uints(8).map(lambda fill: bytes([fill]) * page),
        uints(32).map(lambda seed: random.Random(seed).randbytes(page)),
    )


# --- stream framing ----------------------------------------------------------------------


def stream_headers() -> st.SearchStrategy[m.StreamHeader]:
    return st.just(m.StreamHeader(3))


def machine_types() -> st.SearchStrategy[str]:
    return names(1, 40)


def configurations(
    version: str | None = None, *, any_page_bits: bool = False
) -> st.SearchStrategy[m.Configuration]:
    """CONFIGURATION with the subsections ``version`` knows.

    The target page bits are the profile's unless ``any_page_bits`` (qmig's reader refuses
    other values; the schema builds any).
    """
    profile = _profile(version)
    subsections = profile.configuration_subsections
    page_bits = uints(32) if any_page_bits else st.just(profile.default_target_page_bits)
    capabilities: st.SearchStrategy[tuple[str, ...] | None] = st.none()
    if "capabilities" in subsections:
        capabilities = st.none() | st.lists(
            st.sampled_from(profile.validated_capabilities), unique=True, min_size=1
        ).map(tuple)
    uuids: st.SearchStrategy[bytes | None] = st.none()
    if "uuid" in subsections:
        uuids = st.none() | st.binary(min_size=16, max_size=16)
    return st.builds(
        m.Configuration,
        machine_type=machine_types(),
        target_page_bits=st.none() | page_bits,
        capabilities=capabilities,
        uuid=uuids,
    )


def section_starts(idstrs: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    return st.builds(m.SectionStart, uints(32), idstrs or names(), uints(32), uints(32))


def section_fulls(idstrs: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    return st.builds(m.SectionFull, uints(32), idstrs or names(), uints(32), uints(32))


def section_parts() -> st.SearchStrategy[m.SectionPart]:
    return st.builds(m.SectionPart, uints(32))


def section_ends() -> st.SearchStrategy[m.SectionEnd]:
    return st.builds(m.SectionEnd, uints(32))


def section_headers() -> st.SearchStrategy[Any]:
    return st.one_of(section_starts(), section_fulls(), section_parts(), section_ends())


def section_footers() -> st.SearchStrategy[m.SectionFooter]:
    return st.builds(m.SectionFooter, uints(32))


def vm_descriptions(max_size: int = 256) -> st.SearchStrategy[m.VmDescription]:
    return st.builds(m.VmDescription, st.binary(max_size=max_size))


# --- QEMU_VM_COMMAND -----------------------------------------------------------------------


def open_return_paths() -> st.SearchStrategy[m.OpenReturnPath]:
    return st.just(m.OpenReturnPath())


def pings() -> st.SearchStrategy[m.Ping]:
    return st.builds(m.Ping, uints(32))


def postcopy_advises(version: str | None = None) -> st.SearchStrategy[m.PostcopyAdvise]:
    """ADVISE with 16 bytes, and the 0-byte form where ``version`` accepts it."""
    sixteen = st.builds(m.PostcopyAdvise, uints(64), uints(64))
    rule = _profile(version).command_lengths["POSTCOPY_ADVISE"]
    if rule.allows(0):
        return st.just(m.PostcopyAdvise()) | sixteen
    return sixteen


def postcopy_listens() -> st.SearchStrategy[m.PostcopyListen]:
    return st.just(m.PostcopyListen())


def postcopy_runs() -> st.SearchStrategy[m.PostcopyRun]:
    return st.just(m.PostcopyRun())


def discard_ranges() -> st.SearchStrategy[m.DiscardRange]:
    """Any range the wire can carry; :func:`valid_discards` makes QEMU-valid ones."""
    return st.builds(m.DiscardRange, uints(64), uints(64))


@st.composite
def postcopy_ram_discards(
    draw: st.DrawFn,
    blocks: st.SearchStrategy[str] | None = None,
    max_ranges: int = 12,
) -> m.PostcopyRamDiscard:
    """A discard command; at most ``max_ranges`` ranges (and what a be16 length allows)."""
    block = draw(blocks or names())
    room = (U16_MAX - 3 - len(block)) // 16
    ranges = draw(st.lists(discard_ranges(), min_size=1, max_size=min(max_ranges, room)))
    return m.PostcopyRamDiscard(block, tuple(ranges))


def packageds(max_length: int = U32_MAX) -> st.SearchStrategy[m.Packaged]:
    return st.builds(m.Packaged, st.integers(0, max_length))


def enable_colos() -> st.SearchStrategy[m.EnableColo]:
    return st.just(m.EnableColo())


def postcopy_resumes() -> st.SearchStrategy[m.PostcopyResume]:
    return st.just(m.PostcopyResume())


def recv_bitmaps() -> st.SearchStrategy[m.RecvBitmap]:
    return st.builds(m.RecvBitmap, names())


def switchover_starts() -> st.SearchStrategy[m.SwitchoverStart]:
    return st.just(m.SwitchoverStart())


COMMAND_STRATEGIES: dict[str, Callable[[str | None], st.SearchStrategy[Any]]] = {
    "OPEN_RETURN_PATH": lambda version: open_return_paths(),
    "PING": lambda version: pings(),
    "POSTCOPY_ADVISE": postcopy_advises,
    "POSTCOPY_LISTEN": lambda version: postcopy_listens(),
    "POSTCOPY_RUN": lambda version: postcopy_runs(),
    "POSTCOPY_RAM_DISCARD": lambda version: postcopy_ram_discards(),
    "PACKAGED": lambda version: packageds(_profile(version).packaged_max_length),
    "ENABLE_COLO": lambda version: enable_colos(),
    "POSTCOPY_RESUME": lambda version: postcopy_resumes(),
    "RECV_BITMAP": lambda version: recv_bitmaps(),
    "SWITCHOVER_START": lambda version: switchover_starts(),
}


def commands(version: str | None = None) -> st.SearchStrategy[Any]:
    """Any QEMU_VM_COMMAND that ``version`` knows (PACKAGED without its blob)."""
    known = [name for name in _profile(version).commands if name in COMMAND_STRATEGIES]
    return st.one_of([COMMAND_STRATEGIES[name](version) for name in known])


# --- return path ---------------------------------------------------------------------------


def shuts() -> st.SearchStrategy[m.Shut]:
    return st.builds(m.Shut, uints(32))


def pongs() -> st.SearchStrategy[m.Pong]:
    return st.builds(m.Pong, uints(32))


def req_pages_ids(blocks: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    return st.builds(m.ReqPagesId, uints(64), uints(32), blocks or names())


def req_pages() -> st.SearchStrategy[m.ReqPages]:
    return st.builds(m.ReqPages, uints(64), uints(32))


def rp_recv_bitmaps() -> st.SearchStrategy[m.RpRecvBitmap]:
    return st.builds(m.RpRecvBitmap, names())


def resume_acks() -> st.SearchStrategy[m.ResumeAck]:
    return st.builds(m.ResumeAck, uints(32))


def switchover_acks() -> st.SearchStrategy[m.SwitchoverAck]:
    return st.just(m.SwitchoverAck())


RETURN_PATH_STRATEGIES: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "SHUT": shuts,
    "PONG": pongs,
    "REQ_PAGES_ID": req_pages_ids,
    "REQ_PAGES": req_pages,
    "RECV_BITMAP": rp_recv_bitmaps,
    "RESUME_ACK": resume_acks,
    "SWITCHOVER_ACK": switchover_acks,
}


def return_path_messages(version: str | None = None) -> st.SearchStrategy[Any]:
    """Any return-path message that ``version`` knows."""
    known = [name for name in _profile(version).rp_messages if name in RETURN_PATH_STRATEGIES]
    return st.one_of([RETURN_PATH_STRATEGIES[name]() for name in known])


# --- the "ram" section ---------------------------------------------------------------------


def ram_block_infos(
    version: str | None = None,
    *,
    page_size: bool | None = None,
    mr_addr: bool | None = None,
    max_pages: int = 1 << 20,
) -> st.SearchStrategy[m.RamBlockInfo]:
    """One MEM_SIZE entry; ``page_size`` / ``mr_addr``: force the optional field on or off."""
    page = _schema(version).target_page_size

    def optional(present: bool | None, values: st.SearchStrategy[int]) -> Any:
        if present is None:
            return st.none() | values
        return values if present else st.none()

    return st.builds(
        m.RamBlockInfo,
        idstr=names(),
        used_length=st.integers(1, max_pages).map(lambda pages: pages * page),
        page_size=optional(page_size, st.sampled_from([page, 64 << 10, HUGE_PAGE, 1 << 30])),
        mr_addr=optional(mr_addr, page_offsets(version)),
    )


@st.composite
def mem_sizes(
    draw: st.DrawFn,
    version: str | None = None,
    *,
    page_size: bool = False,
    mr_addr: bool = False,
    max_blocks: int = 6,
) -> m.MemSize:
    """A MEM_SIZE record whose total is the sum of its blocks' lengths."""
    infos = st.lists(
        ram_block_infos(version, page_size=page_size, mr_addr=mr_addr),
        min_size=1,
        max_size=max_blocks,
        unique_by=lambda info: info.idstr,
    )
    blocks = draw(infos)
    return m.MemSize(sum(info.used_length for info in blocks), tuple(blocks))


def ram_pages(
    version: str | None = None, blocks: st.SearchStrategy[str | None] | None = None
) -> st.SearchStrategy[m.RamPage]:
    """ZERO (a fill byte) or PAGE records; a ``None`` block means CONTINUE."""
    block_names = blocks if blocks is not None else st.none() | names()
    zero = st.builds(
        m.RamPage,
        block=block_names,
        offset=page_offsets(version),
        zero=st.just(True),
        data=st.binary(min_size=1, max_size=1),
    )
    full = st.builds(
        m.RamPage,
        block=block_names,
        offset=page_offsets(version),
        zero=st.just(False),
        data=page_contents(version),
    )
    return zero | full


def ram_xbzrles(version: str | None = None, max_size: int = 64) -> st.SearchStrategy[Any]:
    return st.builds(
        m.RamXbzrle, st.none() | names(), page_offsets(version), st.binary(max_size=max_size)
    )


def ram_compresseds(version: str | None = None, max_size: int = 64) -> st.SearchStrategy[Any]:
    return st.builds(
        m.RamCompressed, st.none() | names(), page_offsets(version), st.binary(max_size=max_size)
    )


def ram_records(version: str | None = None) -> st.SearchStrategy[Any]:
    """Any single RAM record ``version`` knows, MEM_SIZE included."""
    flags = _profile(version).ram_flags
    options: list[st.SearchStrategy[Any]] = [
        ram_pages(version),
        ram_xbzrles(version),
        st.just(m.RamEos()),
        st.builds(m.RamHook, page_offsets(version)),
        mem_sizes(version),
    ]
    if "COMPRESS_PAGE" in flags:
        options.append(ram_compresseds(version))
    if "MULTIFD_FLUSH" in flags:
        options.append(st.just(m.RamMultifdFlush()))
    return st.one_of(options)


def build_ram_record(schema: Schema, record: Any) -> bytes:
    """The bytes of any value :func:`ram_records` draws."""
    if isinstance(record, m.MemSize):
        return schema.build_mem_size(record)
    if isinstance(record, m.RamPage):
        return schema.build_ram_page(record)
    if isinstance(record, m.RamXbzrle):
        return schema.build_ram_xbzrle(record)
    if isinstance(record, m.RamCompressed):
        return schema.build_ram_compressed(record)
    if isinstance(record, m.RamHook):
        return schema.build_ram_flag("HOOK", record.offset)
    return schema.build_ram_flag(record.NAME)


@st.composite
def encoded(
    draw: st.DrawFn, version: str | None = None, kind: str = "command"
) -> tuple[Any, bytes]:
    """A message and its bytes; ``kind`` is ``command``, ``return_path`` or ``ram``."""
    schema = _schema(version)
    if kind == "command":
        command = draw(commands(version))
        return command, schema.build_command(command)
    if kind == "return_path":
        message = draw(return_path_messages(version))
        return message, schema.build_rp(message)
    record = draw(ram_records(version))
    return record, build_ram_record(schema, record)


# --- whole streams -------------------------------------------------------------------------


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


def _device_payloads(max_size: int) -> st.SearchStrategy[bytes]:
    # No 0x7e: qmig finds the end of a device's state inside PACKAGED by its footer.
    return st.binary(max_size=max_size).map(lambda data: data.replace(b"\x7e", b"\x7d"))


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
    out.add(m.StreamHeader(3), bytes(schema.header.build(m.StreamHeader(3))))
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
        state = draw(_device_payloads(max_device_size))
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


# --- broken streams ------------------------------------------------------------------------

Channel = Literal["stream", "return_path"]


@dataclass(frozen=True)
class InvalidStream:
    """Bytes with one defect: reading them must fail naming ``what`` in [start, end)."""

    data: bytes = field(repr=False)
    what: str
    start: int  # absolute offset of the faulty record
    end: int  # absolute offset just past it
    description: str
    channel: Channel = "stream"


@dataclass(frozen=True)
class _Prefix:
    data: bytes
    blocks: tuple[m.RamBlockInfo, ...]


@st.composite
def _valid_prefix(draw: st.DrawFn, version: str | None) -> _Prefix:
    """Header, CONFIGURATION, OPEN_RETURN_PATH, PING, ADVISE and the ram SECTION_START."""
    schema = _schema(version)
    page = schema.target_page_size
    idstrs = draw(st.lists(names(1, 24), min_size=1, max_size=3, unique=True))
    blocks = tuple(m.RamBlockInfo(i, draw(st.integers(1, 64)) * page) for i in idstrs)
    data = bytes(schema.header.build(m.StreamHeader(3)))
    data += bytes(schema.configuration.build(draw(configurations(version).map(_no_caps))))
    data += schema.build_command(m.OpenReturnPath()) + schema.build_command(m.Ping(1))
    data += schema.build_command(m.PostcopyAdvise(page, page))
    data += schema.build_section(m.SectionStart(2, "ram", 0, schema.profile.ram_section_version))
    data += schema.build_mem_size(m.MemSize(sum(b.used_length for b in blocks), blocks))
    data += schema.build_ram_flag("EOS") + schema.build_footer(2)
    return _Prefix(data, blocks)


def _no_caps(configuration: m.Configuration) -> m.Configuration:
    # Without x-ignore-shared the prefix's MEM_SIZE entries have no memory-region address.
    return m.Configuration(
        configuration.machine_type, configuration.target_page_bits, None, configuration.uuid
    )


@st.composite
def _placed(
    draw: st.DrawFn,
    version: str | None,
    bad: bytes,
    what: str,
    description: str,
    trailer: bytes = b"",
    may_package: bool = True,
) -> InvalidStream:
    """``bad`` behind a valid prefix, optionally inside a PACKAGED blob, then ``trailer``."""
    schema = _schema(version)
    prefix = draw(_valid_prefix(version)).data
    if may_package and draw(st.booleans()):
        inner_prefix = schema.build_command(m.PostcopyListen())
        body = inner_prefix + bad + trailer
        packaged = schema.build_command(m.Packaged(len(body)))
        start = len(prefix) + len(packaged) + len(inner_prefix)
        data = prefix + packaged + body
    else:
        start = len(prefix)
        data = prefix + bad + trailer
    return InvalidStream(data, what, start, start + len(bad), description)


def _raw_command(schema: Schema, name_or_number: str | int, payload: bytes, length: int) -> bytes:
    number = (
        schema.profile.commands[name_or_number]
        if isinstance(name_or_number, str)
        else name_or_number
    )
    header = bytes(schema.command_header.build({"cmd": number, "len": length}))
    return header + payload


@st.composite
def invalid_command_lengths(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A command whose length its receiver refuses (fixed lengths; DISCARD below 20)."""
    schema = _schema(version)
    rules = schema.profile.command_lengths
    # Variable-length commands without a minimum (RECV_BITMAP) check their own fields.
    checked = sorted(name for name, rule in rules.items() if rule.accepted or rule.min_length)
    name = draw(st.sampled_from(checked))
    rule = rules[name]
    if rule.accepted is None:
        length = draw(st.integers(0, rule.min_length - 1))
    else:
        length = draw(st.integers(0, 64).filter(lambda n: n not in (rule.accepted or ())))
    payload = draw(st.binary(min_size=length, max_size=length))
    bad = _raw_command(schema, name, payload, length)
    return draw(_placed(version, bad, name, f"{name} with length {length}"))


@st.composite
def invalid_rp_lengths(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A return-path message with a length the source refuses (fixed, or over 512)."""
    schema = _schema(version)
    profile = schema.profile
    name = draw(st.sampled_from(sorted(profile.rp_lengths)))
    rule = profile.rp_lengths[name]
    limit = profile.rp_max_length
    if rule.accepted is None:
        too_long = st.integers(limit + 1, U16_MAX)
        too_short = st.integers(0, rule.min_length - 1) if rule.min_length else st.nothing()
        length = draw(too_long | too_short)
    else:
        length = draw(st.integers(0, 600).filter(lambda n: n not in (rule.accepted or ())))
    payload = draw(st.binary(min_size=min(length, 600), max_size=min(length, 600)))
    header = bytes(schema.rp_header.build({"type": profile.rp_messages[name], "len": length}))
    lead = draw(st.lists(pongs(), max_size=2))
    prefix = b"".join(schema.build_rp(pong) for pong in lead)
    data = prefix + header + payload
    end = len(prefix) + 4 + length
    return InvalidStream(
        data, name, len(prefix), end, f"{name} with length {length}", "return_path"
    )


@st.composite
def invalid_overlong_names(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A name whose counted length runs past the end of its command or message."""
    schema = _schema(version)
    profile = schema.profile
    choices = ["POSTCOPY_RAM_DISCARD", "REQ_PAGES_ID"]
    if "RECV_BITMAP" in profile.commands:
        choices.append("RECV_BITMAP")
    which = draw(st.sampled_from(choices))
    if which == "POSTCOPY_RAM_DISCARD":
        length = draw(st.integers(20, 200))
        name_length = draw(st.integers(length - 1, MAX_NAME))
        payload = bytes([0, name_length]) + draw(names(length - 2, length - 2)).encode()
        bad = _raw_command(schema, which, payload, length)
        trailer = draw(st.binary(max_size=300))
        return draw(_placed(version, bad, which, "discard name longer than the command", trailer))
    if which == "RECV_BITMAP":
        length = draw(st.integers(1, 200))
        name_length = draw(st.integers(length, MAX_NAME))
        payload = bytes([name_length]) + draw(names(length - 1, length - 1)).encode()
        bad = _raw_command(schema, which, payload, length)
        trailer = draw(st.binary(max_size=300))
        return draw(_placed(version, bad, which, "bitmap name longer than the command", trailer))
    name_length = draw(st.integers(1, MAX_NAME))
    length = draw(st.integers(13, 13 + name_length - 1))
    body = draw(uints(64)).to_bytes(8, "big") + draw(uints(32)).to_bytes(4, "big")
    body += bytes([name_length]) + draw(names(length - 13, length - 13)).encode()
    header = bytes(schema.rp_header.build({"type": profile.rp_messages[which], "len": length}))
    trailer = draw(st.binary(max_size=300))
    data = header + body + trailer
    return InvalidStream(
        data, which, 0, 4 + length, "request name longer than the message", "return_path"
    )


@st.composite
def invalid_wrapping_discards(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A discard whose name is longer than its command by a multiple of 16.

    QEMU subtracts ``3 + name length`` from the command length in a 16-bit counter: these
    wrap it to a multiple of 16 near 65536, so QEMU would read range pairs far past the
    command. The bytes after the command continue the name, as such an attack would.
    """
    schema = _schema(version)
    name_length = draw(st.integers(33, MAX_NAME))
    wraps = draw(st.integers(1, (name_length + 3 - 20) // 16))
    length = name_length + 3 - 16 * wraps  # (length - 3 - name_length) % 65536 = 65536 - 16 wraps
    name = draw(names(name_length, name_length)).encode()
    payload = bytes([0, name_length]) + name[: length - 2]
    bad = _raw_command(schema, "POSTCOPY_RAM_DISCARD", payload, length)
    trailer = name[length - 2 :] + b"\x00" + draw(st.binary(min_size=16, max_size=64))
    return draw(
        _placed(version, bad, "POSTCOPY_RAM_DISCARD", "16-bit length wraps", trailer, False)
    )


@st.composite
def _discard_against_prefix(
    draw: st.DrawFn, version: str, make_range: Callable[[st.DrawFn, m.RamBlockInfo, int], Any]
) -> tuple[_Prefix, bytes]:
    schema = _schema(version)
    prefix = draw(_valid_prefix(version))
    block = draw(st.sampled_from(prefix.blocks))
    page = schema.target_page_size
    good = draw(
        st.lists(
            st.integers(0, block.used_length // page - 1).map(
                lambda i: m.DiscardRange(i * page, page)
            ),
            max_size=5,
        )
    )
    bad = make_range(draw, block, page)
    at = draw(st.integers(0, len(good)))
    ranges = (*good[:at], bad, *good[at:])
    return prefix, schema.build_command(m.PostcopyRamDiscard(block.idstr, ranges))


def _beyond(draw: st.DrawFn, block: m.RamBlockInfo, page: int) -> m.DiscardRange:
    if draw(st.booleans()):
        # Starts inside or at the end, ends beyond the block.
        start = draw(st.integers(0, block.used_length // page)) * page
        least = max(page, block.used_length - start + page)
        length = draw(st.integers(least // page, least // page + 64)) * page
        return m.DiscardRange(start, length)
    # start + length wraps past 2**64 and lands inside the block.
    start = draw(st.integers(block.used_length // page, (U64_MAX // page))) * page
    length = (1 << 64) - start + draw(st.integers(0, block.used_length // page - 1)) * page
    return m.DiscardRange(start, length)


def _unaligned(draw: st.DrawFn, block: m.RamBlockInfo, page: int) -> m.DiscardRange:
    start = draw(st.integers(0, block.used_length // page - 1)) * page
    length = page
    if draw(st.booleans()):
        start += draw(st.integers(1, page - 1))
    else:
        length = draw(st.integers(1, page - 1))
    return m.DiscardRange(start, length)


def invalid_discard_ranges(version: str = "7.2") -> st.SearchStrategy[InvalidStream]:
    """A discard range beyond its RAMBlock, or one whose ``start + length`` wraps 64 bits."""
    return _invalid_discard(version, _beyond, "range beyond the block")


def invalid_unaligned_discards(version: str = "7.2") -> st.SearchStrategy[InvalidStream]:
    """A discard range whose start or length is not a multiple of the block's page size."""
    return _invalid_discard(version, _unaligned, "unaligned range")


@st.composite
def _invalid_discard(
    draw: st.DrawFn,
    version: str,
    bad_range: Callable[[st.DrawFn, m.RamBlockInfo, int], Any],
    description: str,
) -> InvalidStream:
    prefix, command = draw(_discard_against_prefix(version, bad_range))
    start = len(prefix.data)
    return InvalidStream(
        prefix.data + command, "POSTCOPY_RAM_DISCARD", start, start + len(command), description
    )


@st.composite
def invalid_orphan_req_pages(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A return path whose first page request is REQ_PAGES: there is no previous block."""
    schema = _schema(version)
    lead = b"".join(schema.build_rp(pong) for pong in draw(st.lists(pongs(), max_size=3)))
    request = schema.build_rp(draw(req_pages()))
    return InvalidStream(
        lead + request,
        "REQ_PAGES",
        len(lead),
        len(lead) + len(request),
        "REQ_PAGES with no previous REQ_PAGES_ID",
        "return_path",
    )


EMPTY_NAME_RECORDS = (
    "POSTCOPY_RAM_DISCARD",
    "RECV_BITMAP",
    "SECTION_START",
    "SECTION_FULL",
    "MEM_SIZE",
    "RAM",
)


@st.composite
def invalid_empty_names(
    draw: st.DrawFn, version: str = "7.2", records: Sequence[str] = EMPTY_NAME_RECORDS
) -> InvalidStream:
    """A zero-length name where QEMU's reader cannot accept one, on the main stream.

    ``records`` limits the choice to some of :data:`EMPTY_NAME_RECORDS` (RECV_BITMAP only
    where ``version`` has it).
    """
    schema = _schema(version)
    choices = [
        name
        for name in records
        if name != "RECV_BITMAP" or "RECV_BITMAP" in schema.profile.commands
    ]
    which = draw(st.sampled_from(choices))
    page = schema.target_page_size
    if which == "POSTCOPY_RAM_DISCARD":
        ranges = draw(st.integers(2, 4)) * 16  # keeps the command at its minimum length or more
        payload = bytes([0, 0, 0]) + draw(st.binary(min_size=ranges, max_size=ranges))
        bad = _raw_command(schema, which, payload, len(payload))
        return draw(_placed(version, bad, which, "empty RAMBlock name"))
    if which == "RECV_BITMAP":
        bad = _raw_command(schema, which, b"\x00", 1)
        return draw(_placed(version, bad, which, "empty block name"))
    if which in ("SECTION_START", "SECTION_FULL"):
        cls = m.SectionStart if which == "SECTION_START" else m.SectionFull
        bad = schema.build_section(cls(draw(uints(32)), "", draw(uints(32)), draw(uints(32))))
        return draw(_placed(version, bad, which, "empty idstr"))
    prefix = draw(_valid_prefix(version))
    start = len(prefix.data)
    if which == "MEM_SIZE":
        section = schema.build_section(m.SectionStart(7, "ram", 0, 4))
        others = tuple(draw(st.lists(st.builds(m.RamBlockInfo, names(1, 8), st.just(page)))))
        bad = schema.build_mem_size(m.MemSize(page * (len(others) + 1), (*others, _EMPTY_BLOCK)))
        start += len(section)
        return InvalidStream(
            prefix.data + section + bad, which, start, start + len(bad), "empty RAMBlock name"
        )
    section = schema.build_section(m.SectionPart(2))
    bad = schema.build_ram_page(m.RamPage("", 0, True, b"\x00"))
    start += len(section)
    return InvalidStream(
        prefix.data + section + bad, which, start, start + len(bad), "empty block name"
    )


_EMPTY_BLOCK = m.RamBlockInfo("", 4096)


@st.composite
def invalid_empty_rp_names(
    draw: st.DrawFn, version: str = "7.2", messages: Sequence[str] = ("REQ_PAGES_ID", "RECV_BITMAP")
) -> InvalidStream:
    """REQ_PAGES_ID or RECV_BITMAP naming the empty RAMBlock (no RAMBlock has that name).

    Well-formed on the wire: the source refuses them when it looks the block up.
    """
    schema = _schema(version)
    choices = [
        name for name in messages if name != "RECV_BITMAP" or name in schema.profile.rp_messages
    ]
    which = draw(st.sampled_from(choices))
    message: Any = (
        m.ReqPagesId(draw(uints(64)), draw(uints(32)), "")
        if which == "REQ_PAGES_ID"
        else m.RpRecvBitmap("")
    )
    data = schema.build_rp(message)
    return InvalidStream(data, which, 0, len(data), "empty block name", "return_path")


def unknown_command_numbers(version: str = "7.2") -> st.SearchStrategy[int]:
    """Command numbers ``version`` does not know: 0, those of newer versions, and beyond."""
    known = set(_profile(version).commands.values())
    first_invalid = max(known) + 1
    newer = sorted(
        {n for other in available_versions() for n in load_profile(other).commands.values()} - known
    )
    return st.one_of(
        st.just(0),
        st.sampled_from(newer) if newer else st.nothing(),
        st.integers(first_invalid, U16_MAX),
    )


@st.composite
def invalid_unknown_commands(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A QEMU_VM_COMMAND whose number ``version`` does not know."""
    schema = _schema(version)
    number = draw(unknown_command_numbers(version))
    length = draw(st.integers(0, 32))
    payload = draw(st.binary(min_size=length, max_size=length))
    bad = _raw_command(schema, number, payload, length)
    return draw(_placed(version, bad, "unknown command", f"MIG_CMD {number:#x}"))


@st.composite
def invalid_unknown_rp_messages(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A return-path message whose type ``version`` does not know."""
    schema = _schema(version)
    known = set(schema.profile.rp_messages.values())
    number = draw(st.integers(0, U16_MAX).filter(lambda n: n not in known))
    length = draw(st.integers(0, 16))
    header = bytes(schema.rp_header.build({"type": number, "len": length}))
    data = header + draw(st.binary(min_size=length, max_size=length))
    return InvalidStream(data, "unknown message", 0, len(data), f"type {number:#x}", "return_path")


INVALID_STRATEGIES: dict[str, Callable[[str], st.SearchStrategy[InvalidStream]]] = {
    "command_lengths": invalid_command_lengths,
    "rp_lengths": invalid_rp_lengths,
    "overlong_names": invalid_overlong_names,
    "wrapping_discards": invalid_wrapping_discards,
    "discard_ranges": invalid_discard_ranges,
    "unaligned_discards": invalid_unaligned_discards,
    "orphan_req_pages": invalid_orphan_req_pages,
    "empty_names": invalid_empty_names,
    "empty_rp_names": invalid_empty_rp_names,
    "unknown_commands": invalid_unknown_commands,
    "unknown_rp_messages": invalid_unknown_rp_messages,
}
"""Every invalid-variant strategy, by name; each takes a QEMU version."""


def invalid_streams(version: str = "7.2") -> st.SearchStrategy[InvalidStream]:
    """Any of the invalid variants."""
    return st.one_of([strategy(version) for strategy in INVALID_STRATEGIES.values()])


# --- command orders ------------------------------------------------------------------------

ORDER_STEPS = (
    "OPEN_RETURN_PATH",
    "PING",
    "POSTCOPY_ADVISE",
    "POSTCOPY_RAM_DISCARD",
    "POSTCOPY_LISTEN",
    "POSTCOPY_RUN",
    "PACKAGED",
    "RAM",
    "EOF",
)


@dataclass(frozen=True)
class CommandOrder:
    """A stream whose commands come in any order: the bytes and the steps, in words."""

    version: str
    data: bytes = field(repr=False)
    steps: tuple[str, ...]
    block: m.RamBlockInfo


@st.composite
def command_orders(draw: st.DrawFn, version: str = "7.2", *, max_steps: int = 12) -> CommandOrder:
    """Header, CONFIGURATION and a one-block ``ram`` setup, then postcopy commands, page
    records and EOF in any order (PACKAGED holds LISTEN / PING / RUN in any order).

    Each record is well formed and its ranges fit the block: only the order is random, so
    what a destination refuses is the order. This is what qmig's state-machine tests and
    ``qmig fuzz differential`` send::

        @given(qs.command_orders("7.2"))
        def test_destination_verdicts(order):
            dest = Destination("7.2")
            dest.receive_data(order.data)
            ...  # compare with your model of QEMU's PostcopyState rules
    """
    schema = _schema(version)
    page = schema.target_page_size
    block = m.RamBlockInfo("pc.ram", draw(st.integers(1, 64)) * page)
    out = bytearray(schema.header.build(m.StreamHeader(3)))
    out += schema.configuration.build(m.Configuration("pc-i440fx-7.2"))
    out += schema.build_section(m.SectionStart(2, "ram", 0, schema.profile.ram_section_version))
    out += schema.build_mem_size(m.MemSize(block.used_length, (block,)))
    out += schema.build_ram_flag("EOS") + schema.build_footer(2)
    pages = block.used_length // page
    steps = []
    for step in draw(st.lists(st.sampled_from(ORDER_STEPS), max_size=max_steps)):
        steps.append(step)
        if step == "OPEN_RETURN_PATH":
            out += schema.build_command(m.OpenReturnPath())
        elif step == "PING":
            out += schema.build_command(m.Ping(draw(uints(32))))
        elif step == "POSTCOPY_ADVISE":
            out += schema.build_command(m.PostcopyAdvise(page, page))
        elif step == "POSTCOPY_RAM_DISCARD":
            first = draw(st.integers(0, pages - 1))
            count = draw(st.integers(1, pages - first))
            span = m.DiscardRange(first * page, count * page)
            out += schema.build_command(m.PostcopyRamDiscard(block.idstr, (span,)))
        elif step == "POSTCOPY_LISTEN":
            out += schema.build_command(m.PostcopyListen())
        elif step == "POSTCOPY_RUN":
            out += schema.build_command(m.PostcopyRun())
        elif step == "PACKAGED":
            inner = draw(st.permutations(["POSTCOPY_LISTEN", "PING", "POSTCOPY_RUN"]))
            commands: dict[str, Any] = {
                "POSTCOPY_LISTEN": m.PostcopyListen(),
                "PING": m.Ping(3),
                "POSTCOPY_RUN": m.PostcopyRun(),
            }
            blob = b"".join(schema.build_command(commands[name]) for name in inner)
            out += schema.build_packaged(blob)
            steps[-1] = f"PACKAGED({', '.join(inner)})"
        elif step == "RAM":
            offset = draw(st.integers(0, pages - 1)) * page
            record = schema.build_ram_page(m.RamPage(block.idstr, offset, True, b"\x00"))
            out += schema.build_section(m.SectionPart(2)) + record
            out += schema.build_ram_flag("EOS") + schema.build_footer(2)
        else:
            out += schema.eof.build(m.Eof())
    return CommandOrder(_profile(version).name, bytes(out), tuple(steps), block)
