"""Incremental, sans-IO readers of the migration stream and of the return path.

Feed bytes in with :meth:`StreamReader.feed`, take :class:`Record` values out with
:meth:`StreamReader.next_record` until it returns :data:`NEED_DATA` (feed more) or
:data:`END`. No I/O happens here: the same reader serves a file, a socket, a fuzzer or a test.

The reader keeps only *framing* context, the facts without which the bytes cannot be
delimited: which section ids are the ``ram`` section, which RAMBlock a CONTINUE record
continues, whether a 16-byte ADVISE preceded the MEM_SIZE list, where a PACKAGED blob ends.
It knows nothing of PostcopyState; :mod:`qmig.protocol` decides what is legal when.

Memory stays bounded whatever a length field claims: a PACKAGED blob is read record by
record, never allocated, and no single record may need more than ``max_record`` bytes.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import construct as cs

from qmig.errors import MalformedError, TruncatedError
from qmig.wire import messages as m
from qmig.wire.discard import DiscardReader
from qmig.wire.fields import FieldError
from qmig.wire.page_requests import PageRequests
from qmig.wire.ramscan import RamScanner, Stop
from qmig.wire.schema import Schema, mem_size_params, schema_for

MAX_RECORD = 8 << 20  # the largest single record qmig buffers (bytes)
# The largest VMDESCRIPTION, and device state waiting for it, that qmig buffers: QEMU 7.2's
# pc machine sends 12 KiB of device state and 99 KiB of JSON. The unread tail is copied as it
# grows, so memory peaks near twice this (64 MiB let a stream cost 424 MB before refusal).
MAX_DESCRIPTION = 8 << 20
MAX_RAM_BLOCKS = 4096
MAX_BITMAP = 32 << 20  # the largest RECV_BITMAP bitmap: 1 TiB of 4 KiB pages
# MEM_SIZE lists longer than this (QEMU sends a handful) are not searched for their layout:
# the search recurses once per entry.
MAX_INFERRED_BLOCKS = 256
MIN_BUFFER = 1 << 16
MAX_KEPT_BUFFER = 4 << 20
RAM_IDSTR = "ram"


class _Storage:
    """Reusable receive buffers, so that a long stream does not fault in fresh memory per chunk.

    A retired buffer is reused only once no view of it survives (a record that still holds
    page data keeps its buffer out of use): a bytearray with live views refuses to resize.
    """

    def __init__(self, keep: int = 3) -> None:
        self._retired: list[bytearray] = []
        self._keep = keep

    def take(self, size: int, *, growing: bool = False) -> bytearray:
        for index, buffer in enumerate(self._retired):
            if size <= len(buffer) <= 4 * max(size, MIN_BUFFER) and _unshared(buffer):
                return self._retired.pop(index)
        # Headroom: the next chunk's tail differs by a few bytes and must still fit. A tail
        # that keeps growing (a record not complete yet) gets twice its size, and the chunks
        # after it are read into that room in place: copied log(n) times, not once per chunk.
        # Never much beyond the largest tail qmig holds: a bytearray is cleared, so all of it
        # is resident.
        room = size + (size >> 4)
        if growing:
            room = max(room, min(2 * size, MAX_DESCRIPTION + MIN_BUFFER))
        return bytearray(max(room, MIN_BUFFER))

    def give(self, buffer: bytearray) -> None:
        if len(buffer) > MAX_KEPT_BUFFER:
            return  # a long unread tail's buffer: freed, not kept for reuse
        self._retired.append(buffer)
        if len(self._retired) > self._keep:
            self._retired.pop(0)


def _unshared(buffer: bytearray) -> bool:
    try:
        buffer.append(0)
    except BufferError:
        return False
    buffer.pop()
    return True


class _InputMixin:
    """Feeding, shared by both readers: unread bytes live in ``_buf``, a view of ``_storage``."""

    _buf: memoryview
    _storage: bytearray
    _pos: int
    _base: int
    _eof: bool
    _pool: _Storage
    _incoming: tuple[bytearray, int] | None

    def _init_input(self) -> None:
        self._pool = _Storage()
        self._storage = bytearray()
        self._buf = memoryview(self._storage)
        self._pos = 0  # index in _buf of the next record
        self._base = 0  # absolute offset of _buf[0]
        self._eof = False
        self._incoming = None

    @property
    def offset(self) -> int:
        """Absolute offset of the next unread byte."""
        return self._base + self._pos

    def get_buffer(self, size: int) -> memoryview:
        """Room for up to ``size`` more bytes: read into it, then call :meth:`commit`.

        This is how a transport hands bytes over without an extra copy (as asyncio's
        BufferedProtocol does); :meth:`feed` is the same for bytes already in hand.
        """
        if self._eof:
            raise ValueError("get_buffer() after feed_eof()")
        tail = len(self._buf) - self._pos
        end = len(self._buf)
        if tail > size and end + size <= len(self._storage):
            self._incoming = (self._storage, -1)  # appended in place, after the unread tail
            return memoryview(self._storage)[end : end + size]
        storage = self._pool.take(tail + size, growing=tail > size)
        storage[:tail] = self._buf[self._pos :]
        self._incoming = (storage, tail)
        return memoryview(storage)[tail : tail + size]

    def commit(self, count: int) -> None:
        """``count`` bytes were written into the buffer from :meth:`get_buffer`."""
        assert self._incoming is not None, "commit() without get_buffer()"
        storage, tail = self._incoming
        self._incoming = None
        if tail < 0:
            self._buf = memoryview(storage)[: len(self._buf) + count]
            return
        old = self._storage
        self._base += self._pos
        self._pos = 0
        self._storage = storage
        self._buf = memoryview(storage)[: tail + count]
        if old is not storage:
            self._pool.give(old)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        size = len(data)
        self.get_buffer(size)[:size] = data
        self.commit(size)

    def feed_eof(self) -> None:
        self._eof = True


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
END: Final = _Sentinel("END")


@dataclass
class Record:
    """One item of the stream, where it was, and where it sits."""

    offset: int  # absolute offset of the record's first byte in the outer stream
    size: int  # bytes the record covers
    message: Any  # a value from qmig.wire.messages
    depth: int = 0  # 0: the outer stream; 1: inside PACKAGED; ...
    section: str | None = None  # idstr of the section the record belongs to

    @property
    def name(self) -> str:
        return str(self.message.NAME)


class _NeedMore(Exception):
    """The next record is not complete in the buffer yet."""

    def __init__(self, what: str, offset: int, limit: int | None = None) -> None:
        self.what = what
        self.offset = offset
        self.limit = limit


@dataclass
class _Section:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int

    @property
    def is_ram(self) -> bool:
        return self.idstr == RAM_IDSTR


@dataclass
class _Frame:
    """The reader's position in the grammar."""

    mode: str  # header | configuration | top | ram | footer | device | after_eof | end
    section: _Section | None = None


@dataclass
class FramingContext:
    """What the reader has learnt that later bytes depend on (public for inspection)."""

    target_page_size: int
    sections: dict[int, _Section] = field(default_factory=dict)
    ram_blocks: dict[str, m.RamBlockInfo] = field(default_factory=dict)
    current_block: str | None = None
    advise: m.PostcopyAdvise | None = None
    capabilities: tuple[str, ...] = ()
    configuration: m.Configuration | None = None


class StreamReader(_InputMixin):
    """Reads the source-to-destination stream into :class:`Record` values."""

    def __init__(
        self,
        version: str | None = None,
        *,
        local_page_sizes: dict[str, int] | None = None,
        host_page_size: int | None = None,
        vmdesc: Any = None,
        max_record: int = MAX_RECORD,
    ) -> None:
        self.schema: Schema = schema_for(version)
        self.profile = self.schema.profile
        self.context = FramingContext(target_page_size=self.schema.target_page_size)
        self.local_page_sizes = local_page_sizes
        self.host_page_size = host_page_size or self.schema.target_page_size
        self.vmdesc = vmdesc
        self.max_record = max_record
        self._scanner = RamScanner(self.schema)
        self._discards = DiscardReader(self.schema)
        # Consecutive discard commands of a block as one PostcopyRamDiscards record: for a
        # destination, whose switchover (downtime) they would otherwise cost ~20 us each.
        self.coalesce_discards = False
        self._init_input()
        self._frame = _Frame("header")
        self._packages: list[int] = []  # absolute end offsets of the open PACKAGED blobs
        self._section_types = self.profile.section_type_names

    # --- feeding ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Record]:
        """Every record of what was fed so far (call after feed_eof() for a whole stream)."""
        while True:
            record = self.next_record()
            if record is NEED_DATA or record is END:
                return
            assert isinstance(record, Record)
            yield record

    # --- reading ----------------------------------------------------------------------

    def next_record(self) -> Record | _Sentinel:
        start = self._pos
        try:
            return self._next()
        except _NeedMore as need:
            self._pos = start
            if self._eof:
                raise TruncatedError(need.what, need.offset) from None
            limit = need.limit or self.max_record
            if len(self._buf) - self._pos > limit:
                raise MalformedError(
                    need.what, f"record larger than qmig's {limit} byte limit", need.offset
                ) from None
            return NEED_DATA

    def _next(self) -> Record | _Sentinel:
        if self._packages and self.offset == self._packages[-1]:
            return self._close_package()
        if self._pos >= len(self._buf):
            if not self._eof:
                return NEED_DATA
            if self._frame.mode in ("after_eof", "end"):
                self._frame = _Frame("end")
                return END
            raise TruncatedError(self._expected_what(), self.offset)
        mode = self._frame.mode
        if mode == "header":
            return self._read_header()
        if mode == "configuration":
            return self._read_configuration()
        if mode == "ram":
            return self._read_ram()
        if mode == "footer":
            return self._read_footer()
        if mode == "device":
            return self._read_device()
        if mode == "after_eof":
            return self._read_after_eof()
        if mode == "end":
            raise MalformedError(
                "stream", "trailing bytes after the end of the stream", self.offset
            )
        return self._read_top()

    def _expected_what(self) -> str:
        if self._frame.mode == "ram":
            return "RAM"
        if self._packages:
            return "PACKAGED"
        return "stream"

    # --- helpers ----------------------------------------------------------------------

    def _limit(self) -> int:
        """Index in _buf beyond which the current record may not read."""
        end = len(self._buf)
        if self._packages:
            end = min(end, self._packages[-1] - self._base)
        return end

    def _bounded_by_package(self) -> bool:
        return bool(self._packages) and self._packages[-1] - self._base <= len(self._buf)

    def _parse(
        self,
        what: str,
        schema: cs.Construct,
        size: int | None = None,
        window: int = 1 << 17,
        **kw: Any,
    ) -> tuple[Any, int]:
        """Parse ``schema`` at the current position; return (value, bytes used).

        ``size`` is the record's known length; without it the schema may read up to
        ``window`` bytes, and running out of buffer means "need more data".
        """
        offset = self.offset
        limit = self._limit()
        if size is not None and self._pos + size > limit:
            if self._bounded_by_package():
                raise MalformedError(what, "runs past the end of the package", offset)
            raise _NeedMore(what, offset)
        end = self._pos + size if size is not None else min(limit, self._pos + window)
        with _Stream(self._buf[self._pos : end]) as stream:
            return self._parse_from(stream, what, schema, size, offset, kw)

    def _parse_from(
        self,
        stream: _Stream,
        what: str,
        schema: cs.Construct,
        size: int | None,
        offset: int,
        kw: dict[str, Any],
    ) -> tuple[Any, int]:
        try:
            value = schema.parse_stream(stream, **kw)
        except FieldError as error:
            if error.short and size is None:
                self._short(what, offset)
            raise MalformedError(what, error.detail, offset + error.position) from None
        except cs.StreamError:
            if size is None:
                self._short(what, offset)
            raise MalformedError(what, "runs past the end of its record", offset) from None
        except cs.ConstructError as error:
            raise MalformedError(what, _construct_detail(error), offset) from None
        return value, stream.tell()

    def _short(self, what: str, offset: int) -> None:
        """A record ran out of bytes: malformed inside a complete package, else wait."""
        if self._bounded_by_package():
            raise MalformedError(what, "runs past the end of the package", offset) from None
        raise _NeedMore(what, offset) from None

    def _emit(self, message: Any, size: int, section: str | None = None) -> Record:
        record = Record(self.offset, size, message, len(self._packages), section)
        self._pos += size
        return record

    def _peek_byte(self) -> int:
        return self._buf[self._pos]

    # --- stream header and configuration ------------------------------------------------

    def _read_header(self) -> Record:
        header, size = self._parse("HEADER", self.schema.header, 8)
        self._frame = _Frame("configuration")
        return self._emit(header, size)

    def _read_configuration(self) -> Record | _Sentinel:
        if self._peek_byte() != self.profile.section_types["CONFIGURATION"]:
            if self.profile.configuration == "required":
                raise MalformedError("CONFIGURATION", "configuration section missing", self.offset)
            self._frame = _Frame("top")
            return self._next()
        config, size = self._parse(
            "CONFIGURATION", self.schema.configuration, window=self.max_record
        )
        subsection = self.profile.section_types["SUBSECTION"]
        if self._pos + size >= len(self._buf) and not self._eof:
            raise _NeedMore("CONFIGURATION", self.offset)  # more subsections may follow
        if self._pos + size < len(self._buf) and self._buf[self._pos + size] == subsection:
            # The subsection list stopped at one it could not read: say why.
            self._pos += size
            try:
                self._parse("CONFIGURATION", self.schema.configuration_subsection)
            finally:
                self._pos -= size
        self.context.configuration = config
        bits = config.target_page_bits
        if bits is not None and bits != self.profile.default_target_page_bits:
            raise MalformedError(
                "CONFIGURATION",
                f"received TARGET_PAGE_BITS is {bits} but qmig's "
                f"{self.profile.name} profile uses {self.profile.default_target_page_bits}",
                self.offset,
            )
        self.context.capabilities = config.capabilities or ()
        self._frame = _Frame("top")
        return self._emit(config, size)

    # --- top level: sections and commands -----------------------------------------------

    def _read_top(self) -> Record | _Sentinel:
        kind = self._peek_byte()
        name = self._section_types.get(kind)
        if name == "COMMAND":
            return self._read_command()
        if name in ("SECTION_START", "SECTION_FULL"):
            return self._read_full_header(name)
        if name in ("SECTION_PART", "SECTION_END"):
            return self._read_short_header(name)
        if name == "EOF":
            record = self._emit(m.Eof(), 1)
            if not self._packages:
                self._frame = _Frame("after_eof")
            return record
        raise MalformedError("stream", f"unknown section type {kind:#04x}", self.offset)

    def _read_full_header(self, name: str) -> Record:
        schema = self.schema.section_start if name == "SECTION_START" else self.schema.section_full
        header, size = self._parse(name, schema)
        section = _Section(header.section_id, header.idstr, header.instance_id, header.version_id)
        if section.is_ram and header.version_id != self.profile.ram_section_version:
            raise MalformedError(
                name,
                f"unsupported version {header.version_id} for 'ram' "
                f"(expecting {self.profile.ram_section_version})",
                self.offset,
            )
        self.context.sections[header.section_id] = section
        self._enter_section(name, section)
        return self._emit(header, size, section.idstr)

    def _read_short_header(self, name: str) -> Record:
        schema = self.schema.section_part if name == "SECTION_PART" else self.schema.section_end
        header, size = self._parse(name, schema)
        section = self.context.sections.get(header.section_id)
        if section is None:
            raise MalformedError(name, f"unknown savevm section {header.section_id}", self.offset)
        self._enter_section(name, section)
        return self._emit(header, size, section.idstr)

    def _enter_section(self, name: str, section: _Section) -> None:
        if section.is_ram:
            self._frame = _Frame("ram", section)
        elif name == "SECTION_FULL":
            self._frame = _Frame("device", section)
        else:
            raise MalformedError(
                name,
                f"cannot delimit section {section.idstr!r}: qmig knows the layout of "
                "iterative sections only for 'ram'",
                self.offset,
            )

    def _read_footer(self) -> Record:
        section = self._frame.section
        assert section is not None
        footer, size = self._parse("SECTION_FOOTER", self.schema.section_footer, 5)
        if footer.section_id != section.section_id:
            raise MalformedError(
                "SECTION_FOOTER",
                f"mismatched section id in footer for {section.idstr!r} - read "
                f"{footer.section_id:#x} expected {section.section_id:#x}",
                self.offset,
            )
        self._frame = _Frame("top")
        return self._emit(footer, size, section.idstr)

    def _after_section(self) -> None:
        self._frame = (
            _Frame("footer", self._frame.section) if self.profile.section_footer else _Frame("top")
        )

    # --- commands -------------------------------------------------------------------------

    def _read_command(self) -> Record:
        # Switchover sends discards by the thousand: a well-formed one skips construct.
        discard = self._discards.read(self._buf, self._pos, self._limit())
        if discard is not None:
            if self.coalesce_discards:
                return self._emit(
                    *self._discards.read_run(self._buf, self._pos, self._limit(), discard)
                )
            return self._emit(*discard)
        offset = self.offset
        header, _ = self._parse("COMMAND", self.schema.command_header, 5)
        name = self.profile.command_names.get(header.cmd)
        if name is None or name not in self.schema.command_payloads:
            raise MalformedError(
                "unknown command", f"MIG_CMD {header.cmd:#x} (len {header.len:#x})", offset
            )
        rule = self.profile.command_lengths[name]
        if not rule.allows(header.len):
            raise MalformedError(
                name,
                f"received with bad length - expecting {rule.expected()}, got {header.len}",
                offset,
            )
        total = 5 + header.len
        if self._pos + total > self._limit():
            if self._bounded_by_package():
                raise MalformedError(name, "runs past the end of the package", offset)
            raise _NeedMore(name, offset)
        payload = self._buf[self._pos + 5 : self._pos + total]
        message = _parse_payload(
            name, "command", self.schema.command_payloads[name], payload, offset, 5
        )
        self._note_command(message, offset)
        record = self._emit(message, total)
        if isinstance(message, m.Packaged):
            self._open_package(message, offset)
        return record

    def _note_command(self, message: Any, offset: int) -> None:
        if isinstance(message, m.PostcopyAdvise):
            self.context.advise = message

    def _open_package(self, packaged: m.Packaged, offset: int) -> None:
        if packaged.length > self.profile.packaged_max_length:
            raise MalformedError(
                "PACKAGED", f"unreasonably large packaged state: {packaged.length}", offset
            )
        end = self.offset + packaged.length
        if self._packages and end > self._packages[-1]:
            raise MalformedError("PACKAGED", "runs past the end of the enclosing package", offset)
        self._packages.append(end)

    def _close_package(self) -> Record:
        if self._frame.mode not in ("top",):
            section = self._frame.section
            what = "RAM" if self._frame.mode == "ram" else "PACKAGED"
            where = f" inside section {section.idstr!r}" if section else ""
            raise MalformedError(what, f"package ends{where}", self.offset)
        self._packages.pop()
        return Record(self.offset, 0, m.PackageEnd(), len(self._packages) + 1)

    # --- the ram section ------------------------------------------------------------------

    def _read_ram(self) -> Record:
        flags = self.profile.ram_flags
        offset = self.offset
        if self._limit() - self._pos < 8:
            if self._bounded_by_package():
                raise MalformedError("RAM", "runs past the end of the package", offset)
            raise _NeedMore("RAM", offset)
        header = int.from_bytes(self._buf[self._pos : self._pos + 8], "big")
        record_flags = header & self.schema.flag_mask
        kind = record_flags & ~flags["CONTINUE"]
        block = self.context.current_block
        if (
            record_flags & flags["CONTINUE"]
            and kind in (flags["ZERO"], flags["PAGE"])
            and block is not None
        ):
            return self._read_page_run(block)
        if kind == flags["MEM_SIZE"]:
            return self._read_mem_size(header)
        if kind == flags["EOS"] and not record_flags & flags["CONTINUE"]:
            self._after_section()
            return self._emit(m.RamEos(), 8, RAM_IDSTR)
        if kind == flags.get("MULTIFD_FLUSH") and not record_flags & flags["CONTINUE"]:
            return self._emit(m.RamMultifdFlush(), 8, RAM_IDSTR)
        if kind == flags["HOOK"]:
            return self._emit(m.RamHook(header & ~self.schema.flag_mask), 8, RAM_IDSTR)
        if kind not in self.schema.ram_bodies:
            raise MalformedError(
                "RAM", f"unknown combination of migration flags {record_flags:#x}", offset
            )
        return self._read_one_ram_record()

    def _read_page_run(self, block: str) -> Record:
        info = self.context.ram_blocks.get(block)
        length = info.used_length if info else (1 << 64) - 1
        limit = self._limit()
        view = self._buf if limit == len(self._buf) else self._buf[:limit]
        result = self._scanner.scan(view, self._pos, self._base, length)
        if result.count == 0:
            offset = self.offset
            if result.stop is Stop.RANGE:
                self._raise_offset_range(block, offset)
            if result.stop is Stop.SHORT:
                if self._bounded_by_package():
                    raise MalformedError("RAM", "runs past the end of the package", offset)
                raise _NeedMore("RAM", offset)
            return self._read_one_ram_record()
        run = m.RamPageRun(
            block=block,
            count=result.count,
            zero_count=result.zero_count,
            # Copies: the scanner reuses its arrays, and a run must stay valid on its own.
            headers=memoryview(result.headers.tobytes()).cast("Q"),
            bodies=memoryview(result.bodies.tobytes()).cast("Q"),
            data=self._buf,
            data_base=self._base,
            target_page_size=self.schema.target_page_size,
            page_flag=self.profile.ram_flags["PAGE"],
        )
        return self._emit(run, result.next_pos - self._pos, RAM_IDSTR)

    def _raise_offset_range(self, block: str, offset: int) -> None:
        header = int.from_bytes(self._buf[self._pos : self._pos + 8], "big")
        info = self.context.ram_blocks[block]
        raise MalformedError(
            "RAM",
            f"illegal RAM offset {header & ~self.schema.flag_mask:#x} in block {block!r} "
            f"(used length {info.used_length:#x})",
            offset,
        )

    def _read_one_ram_record(self) -> Record:
        """A record the fast path does not take: it names its block, or is XBZRLE/COMPRESS."""
        flags = self.profile.ram_flags
        offset = self.offset
        record, size = self._parse("RAM", self.schema.ram_record)
        if record.block is None:
            if self.context.current_block is None:
                raise MalformedError("RAM", "CONTINUE with no previous block", offset)
            block = self.context.current_block
        else:
            block = record.block
            if self.context.ram_blocks and block not in self.context.ram_blocks:
                raise MalformedError("RAM", f"can't find block {block!r}", offset + 8)
            self.context.current_block = block
        info = self.context.ram_blocks.get(block)
        if info is not None and record.offset >= info.used_length:
            self._raise_offset_range(block, offset)
        name = None if record.flags & flags["CONTINUE"] else block
        if record.kind in (flags["ZERO"], flags["PAGE"]):
            return self._emit(self._single_run(block, record, size), size, RAM_IDSTR)
        if record.kind == flags["XBZRLE"]:
            return self._emit(m.RamXbzrle(name, record.offset, record.body.data), size, RAM_IDSTR)
        return self._emit(m.RamCompressed(name, record.offset, record.body.data), size, RAM_IDSTR)

    def _single_run(self, block: str, record: Any, size: int) -> m.RamPageRun:
        """A run of one record decoded by the schema, in the fast path's shape."""
        zero = record.kind == self.profile.ram_flags["ZERO"]
        body_size = 1 if zero else self.schema.target_page_size
        body_at = self.offset + size - body_size
        return m.RamPageRun(
            block=block,
            count=1,
            zero_count=int(zero),
            headers=memoryview(array("Q", [record.header])),
            bodies=memoryview(array("Q", [body_at])),
            data=self._buf,
            data_base=self._base,
            target_page_size=self.schema.target_page_size,
            page_flag=self.profile.ram_flags["PAGE"],
        )

    def _read_mem_size(self, header: int) -> Record:
        offset = self.offset
        total = header & ~self.schema.flag_mask
        pos = 8
        blocks: list[m.RamBlockInfo] = []
        remaining = total
        # QEMU's rule on both sides: the region address follows each entry exactly when
        # x-ignore-shared is on, which the CONFIGURATION's capabilities subsection says.
        mr_addr = (
            self.profile.mem_size_mr_addr == "x-ignore-shared"
            and "x-ignore-shared" in self.context.capabilities
        )
        page_sizes = self._page_size_presence(mr_addr, total)
        while remaining > 0:
            if len(blocks) >= MAX_RAM_BLOCKS:
                raise MalformedError("MEM_SIZE", f"more than {MAX_RAM_BLOCKS} RAMBlocks", offset)
            self._pos += pos
            try:
                entry = len(blocks)
                rules = mem_size_params(lambda ctx, i=entry: page_sizes(i, ctx), mr_addr)
                info, used = self._parse("MEM_SIZE", self.schema.mem_size_block, rules=rules)
            finally:
                self._pos -= pos
            if info.used_length > remaining:
                raise MalformedError(
                    "MEM_SIZE",
                    f"block {info.idstr!r} length {info.used_length:#x} exceeds the "
                    f"remaining total {remaining:#x}",
                    offset + pos,
                )
            remaining -= info.used_length
            blocks.append(info)
            pos += used
        for info in blocks:
            self.context.ram_blocks[info.idstr] = info
        return self._emit(m.MemSize(total, tuple(blocks)), pos, RAM_IDSTR)

    def _page_size_presence(self, mr_addr: bool, total: int) -> Callable[[int, Any], bool]:
        """Whether MEM_SIZE entry ``i`` carries a page size: QEMU's rule, or read off the bytes.

        The source writes it when RAM postcopy is on and the block's page size differs from
        the host's; the destination reads it when postcopy was advised and its own block's
        page size differs from the host's. A reader given its blocks (``local_page_sizes``)
        decides as QEMU's destination does. Without them, the one layout of the whole list
        that the bytes admit is found by :meth:`_infer_page_sizes`.
        """
        advise = self.context.advise
        if advise is None or not advise.ram_postcopy:
            return lambda i, ctx: False
        local = self.local_page_sizes
        if local is not None:
            host = self.host_page_size
            return lambda i, ctx: local.get(ctx.idstr, host) != host
        summary = advise.page_size_summary or 0
        if summary == self.host_page_size:
            return lambda i, ctx: False  # the summary ORs every block's size: all are host's
        layout = self._infer_page_sizes(mr_addr, total, summary)
        return lambda i, ctx: i < len(layout) and layout[i]

    def _infer_page_sizes(self, mr_addr: bool, total: int, summary: int) -> tuple[bool, ...]:
        """Which MEM_SIZE entries carry a page size, found by walking the list's bytes.

        An entry is ``cstr8 idstr, be64 used_length, [be64 page_size], [be64 mr_addr]``. A
        page size is a power of two other than the host's that the ADVISE summary announced;
        but a region address may look like one. So both layouts of each entry are tried, and
        one is kept only if the rest of the list then reads: every name non-empty, the lengths
        summing exactly to ``total``, and a RAM record header (EOS in practice) after the
        last entry. A layout that puts the 8 bytes in the wrong place meets a zero name
        length or a flag-less header almost at once. When no layout fits, the plausible-size
        guess stands and the schema reports what is wrong.
        """
        buf, start = self._buf, self._pos + 8
        limit = self._limit()
        flag_mask, known = self.schema.flag_mask, self.profile.known_ram_flags
        host = self.host_page_size
        extra = 8 if mr_addr else 0

        def available(end: int) -> bool:
            if end <= limit:
                return True
            if end > len(buf) and not self._eof and not self._bounded_by_package():
                raise _NeedMore("MEM_SIZE", self.offset)
            return False

        def be64(at: int) -> int:
            return int.from_bytes(buf[at : at + 8], "big")

        def plausible(at: int) -> bool:
            size = be64(at)
            return size != host and size & (size - 1) == 0 and bool(size & summary)

        def follows(at: int) -> bool:
            """A RAM record header can start at ``at``: offset bits clear, known flags."""
            if not available(at + 8):
                return False
            flags = be64(at)
            return flags == flags & flag_mask and flags != 0 and not flags & ~known

        failed: set[tuple[int, int]] = set()

        def walk(at: int, remaining: int, depth: int = 0) -> tuple[bool, ...] | None:
            if remaining == 0:
                return () if follows(at) else None
            if (at, remaining) in failed or depth >= MAX_INFERRED_BLOCKS:
                return None
            if not available(at + 1) or buf[at] == 0:
                return None
            after_length = at + 1 + buf[at] + 8
            if not available(after_length + extra) or be64(after_length - 8) > remaining:
                return None
            left = remaining - be64(after_length - 8)
            if available(after_length + 8 + extra) and plausible(after_length):
                rest = walk(after_length + 8 + extra, left, depth + 1)
                if rest is not None:
                    return (True, *rest)
            rest = walk(after_length + extra, left, depth + 1)
            if rest is not None:
                return (False, *rest)
            failed.add((at, remaining))
            return None

        layout = walk(start, total)
        if layout is not None:
            return layout
        return self._guess_page_sizes(start, total, extra, plausible)

    def _guess_page_sizes(
        self, start: int, total: int, extra: int, plausible: Callable[[int], bool]
    ) -> tuple[bool, ...]:
        """A list no layout fits: take every plausible size, so that the schema's parse goes
        as far as the bytes allow and reports the first field that is wrong."""
        buf, limit = self._buf, self._limit()
        layout: list[bool] = []
        at, remaining = start, total
        while remaining > 0 and at < limit and len(layout) < MAX_RAM_BLOCKS:
            after_length = at + 1 + buf[at] + 8
            if after_length + 8 > limit:
                if self._bounded_by_package():
                    break  # the schema's parse says it runs past the package
                raise _NeedMore("MEM_SIZE", self.offset)  # at EOF: a truncated list
            present = plausible(after_length)
            layout.append(present)
            remaining -= min(remaining, int.from_bytes(buf[after_length - 8 : after_length], "big"))
            at = after_length + extra + (8 if present else 0)
        return tuple(layout)

    # --- device state ---------------------------------------------------------------------

    def _read_device(self) -> Record:
        section = self._frame.section
        assert section is not None
        if self._packages:
            size = self._delimit_by_footer(section)
            data = bytes(self._buf[self._pos : self._pos + size])
            self._after_section()
            return self._emit(
                m.DeviceState(section.idstr, section.instance_id, data), size, section.idstr
            )
        return self._read_described_device(section)

    def _delimit_by_footer(self, section: _Section) -> int:
        """Length of a device payload inside PACKAGED, found by its footer.

        Inside a package the blob's length bounds the device state even where no
        VMDESCRIPTION describes it. The payload ends at the first ``0x7e + be32 id`` that
        is followed by something that can only start the next record: another section
        header, a known command, or the end of the package.
        """
        offset = self.offset
        package_end = self._packages[-1] - self._base
        limit = min(package_end, self._pos + self.max_record)
        if limit > len(self._buf):
            raise _NeedMore(f"SECTION_FULL {section.idstr!r}", offset)
        footer = bytes(
            [self.profile.section_types["SECTION_FOOTER"]]
        ) + section.section_id.to_bytes(4, "big")
        at = self._pos
        while True:
            at = self._storage.find(footer, at, limit)
            if at < 0:
                raise MalformedError(
                    "SECTION_FULL",
                    f"cannot delimit device section {section.idstr!r}: no footer found "
                    "before the end of the package",
                    offset,
                )
            if self._starts_record(at + 5, package_end):
                return at - self._pos
            at += 1

    def _starts_record(self, at: int, package_end: int) -> bool:
        if at == package_end:
            return True
        types = self.profile.section_types
        kind = self._buf[at]
        if kind == types["COMMAND"] and at + 5 <= package_end:
            cmd = int.from_bytes(self._buf[at + 1 : at + 3], "big")
            length = int.from_bytes(self._buf[at + 3 : at + 5], "big")
            name = self.profile.command_names.get(cmd)
            return (
                name is not None
                and self.profile.command_lengths[name].allows(length)
                and at + 5 + length <= package_end
            )
        if kind in (types["SECTION_FULL"], types["SECTION_START"]) and at + 6 <= package_end:
            name_len = self._buf[at + 5]
            end = at + 6 + name_len + 8
            if name_len == 0 or end > package_end:
                return False
            idstr = self._buf[at + 6 : at + 6 + name_len]
            return all(0x20 < byte < 0x7F for byte in idstr)
        if kind == types["EOF"]:
            return at + 1 == package_end
        return False

    def _read_described_device(self, section: _Section) -> Record:
        description = self._device_description(section)
        from qmig.wire import vmstate

        limit = self._limit()
        try:
            used, decoded = vmstate.decode_device(description, self._buf, self._pos, limit)
        except vmstate.VmstateError as error:
            if error.short and limit == len(self._buf) and not self._eof:
                raise _NeedMore("SECTION_FULL", self.offset, MAX_DESCRIPTION) from None
            at = None if error.offset is None else self._base + error.offset
            raise MalformedError("SECTION_FULL", error.detail, at) from None
        data = bytes(self._buf[self._pos : self._pos + used])
        self._after_section()
        return self._emit(
            m.DeviceState(section.idstr, section.instance_id, data, decoded), used, section.idstr
        )

    def _device_description(self, section: _Section) -> Any:
        from qmig.wire import vmstate

        offset = self.offset
        if self.vmdesc is None:
            types = self.profile.section_types
            found = vmstate.find_trailing_description(
                self._storage, self._pos, len(self._buf), eof=types["EOF"],
                kind=types["VMDESCRIPTION"], limit=MAX_DESCRIPTION
            )  # fmt: skip
            if found is None:
                if self._eof:
                    raise MalformedError(
                        "SECTION_FULL",
                        f"cannot delimit device section {section.idstr!r}: device sections "
                        "carry no length and the stream has no VMDESCRIPTION describing them",
                        offset,
                    )
                raise _NeedMore("SECTION_FULL", offset, MAX_DESCRIPTION)
            try:
                self.vmdesc = vmstate.VmDescription.from_json(found)
            except vmstate.VmstateError as error:
                raise MalformedError("VMDESCRIPTION", error.detail, offset) from None
        description = self.vmdesc.find(section.idstr, section.instance_id)
        if description is None:
            raise MalformedError(
                "SECTION_FULL",
                f"no description for section {section.idstr!r} instance "
                f"{section.instance_id} in VMDESCRIPTION",
                offset,
            )
        return description

    # --- after EOF ------------------------------------------------------------------------

    def _read_after_eof(self) -> Record:
        kind = self._peek_byte()
        if kind != self.profile.section_types["VMDESCRIPTION"]:
            raise MalformedError(
                "stream", f"expected VMDESCRIPTION after EOF, got {kind:#04x}", self.offset
            )
        if self._pos + 5 > len(self._buf):
            raise _NeedMore("VMDESCRIPTION", self.offset)
        length = int.from_bytes(self._buf[self._pos + 1 : self._pos + 5], "big")
        if length > MAX_DESCRIPTION:
            raise MalformedError(
                "VMDESCRIPTION",
                f"{length} bytes is more than qmig's {MAX_DESCRIPTION} limit",
                self.offset,
            )
        if self._pos + 5 + length > len(self._buf):
            raise _NeedMore("VMDESCRIPTION", self.offset, MAX_DESCRIPTION + 5)
        description, size = self._parse("VMDESCRIPTION", self.schema.vmdescription, 5 + length)
        self._frame = _Frame("end")
        return self._emit(description, size)


class _Stream:
    """A minimal read stream over a bytes-like object (faster than BytesIO for slices)."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        # construct's parse contexts are cyclic and keep the stream until a GC pass; drop
        # the view now so that the receive buffer can be reused at once.
        self._data.release()

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = len(self._data) - self._pos
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(chunk)
        return chunk

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = pos
        elif whence == 1:
            self._pos += pos
        else:
            self._pos = len(self._data) + pos
        return self._pos


def _parse_payload(
    what: str, kind: str, schema: cs.Construct, payload: memoryview, offset: int, header: int
) -> Any:
    """A length-delimited payload, which must be used up exactly (QEMU's length checks).

    ``offset`` is where the record starts and ``header`` the bytes before its payload.
    """
    length = len(payload)
    with _Stream(payload) as stream:
        try:
            message = schema.parse_stream(stream, len=length)
        except FieldError as error:
            detail = f"runs past the end of the {kind}" if error.short else error.detail
            raise MalformedError(what, detail, offset + header + error.position) from None
        except cs.ConstructError as error:
            raise MalformedError(what, _construct_detail(error), offset + header) from None
        left = length - stream.tell()
    if left:
        raise MalformedError(what, f"{left} bytes left over in the {kind}", offset)
    return message


def _construct_detail(error: cs.ConstructError) -> str:
    text = str(error).splitlines()[-1]
    return text.strip() or type(error).__name__


class ReturnPathReader(_InputMixin):
    """Reads the destination-to-source return path into :class:`Record` values.

    The source's checks, in its order: a known message type, the fixed length or the
    512-byte buffer, then the message's own rules.
    """

    def __init__(self, version: str | None = None) -> None:
        self.schema: Schema = schema_for(version)
        self.profile = self.schema.profile
        self._page_requests = PageRequests(self.schema)
        self._init_input()

    def __iter__(self) -> Iterator[Record]:
        while True:
            record = self.next_record()
            if record is NEED_DATA or record is END:
                return
            assert isinstance(record, Record)
            yield record

    def next_record(self) -> Record | _Sentinel:
        available = len(self._buf) - self._pos
        offset = self.offset
        if available == 0:
            return END if self._eof else NEED_DATA
        if available < 4:
            return self._short("return path", offset)
        request = self._page_requests.read(self._buf, self._pos, len(self._buf))
        if request is not None:  # well formed: the schema would read the same (see its module)
            message, size = request
            self._pos += size
            return Record(offset, size, message)
        header = self.schema.rp_header.parse(bytes(self._buf[self._pos : self._pos + 4]))
        name = self.profile.rp_names.get(header.type)
        if name is None or name not in self.schema.rp_payloads:
            raise MalformedError(
                "unknown message",
                f"received invalid message {header.type:#06x} length {header.len:#06x}",
                offset,
            )
        rule = self.profile.rp_lengths[name]
        if not rule.allows(header.len) or header.len > self.profile.rp_max_length:
            expected = rule.expected()
            if header.len > self.profile.rp_max_length:
                expected = f"at most {self.profile.rp_max_length}"
            raise MalformedError(
                name, f"incorrect length {header.len} expecting {expected}", offset
            )
        if available < 4 + header.len:
            return self._short(name, offset)
        payload = self._buf[self._pos + 4 : self._pos + 4 + header.len]
        message = _parse_payload(name, "message", self.schema.rp_payloads[name], payload, offset, 4)
        size = 4 + header.len
        if name in self.schema.rp_trailers:
            trailer = self._read_trailer(name, offset, size)
            if trailer is None:
                return self._short(name, offset)
            message = dataclasses.replace(message, bitmap=trailer.bitmap)
            size += 16 + trailer.size
        self._pos += size
        return Record(offset, size, message)

    def _read_trailer(self, name: str, offset: int, at: int) -> Any:
        """The bitmap after RP RECV_BITMAP, ``at`` bytes into the record; None: not all here."""
        start = self._pos + at
        if len(self._buf) < start + 8:
            return None
        size = int.from_bytes(self._buf[start : start + 8], "big")
        if size > MAX_BITMAP:
            raise MalformedError(
                name, f"bitmap of {size} bytes is more than qmig's {MAX_BITMAP} limit", offset + at
            )
        if len(self._buf) < start + 16 + size:
            return None
        with _Stream(self._buf[start : start + 16 + size]) as stream:
            try:
                return self.schema.rp_trailers[name].parse_stream(stream)
            except FieldError as error:
                raise MalformedError(name, error.detail, offset + at + error.position) from None

    def _short(self, what: str, offset: int) -> _Sentinel:
        if self._eof:
            raise TruncatedError(what, offset)
        return NEED_DATA
