"""The source-to-destination stream, read into :class:`Record` values.

The top of the grammar lives here: the stream header and CONFIGURATION, section headers and
footers, QEMU_VM_COMMANDs and the PACKAGED blobs they open. What is inside a section is read
by :mod:`.ram_section` (the ``ram`` section) and :mod:`.device_sections` (device state and
the VMDESCRIPTION after EOF).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, assert_never

from qmig.errors import MalformedError, TruncatedError
from qmig.wire import messages as m
from qmig.wire.discard import DiscardReader
from qmig.wire.ramscan import RamScanner
from qmig.wire.reading.device_sections import DeviceSectionsReader
from qmig.wire.reading.framing import Frame, FramingContext, Mode, Section
from qmig.wire.reading.ram_section import RamSectionReader
from qmig.wire.reading.records import (
    END,
    NEED_DATA,
    NeedMore,
    Record,
    Sentinel,
    parse_payload,
    records_of,
)
from qmig.wire.schema import Schema, schema_for

MAX_RECORD = 8 << 20  # the largest single record qmig buffers (bytes)


class StreamReader(RamSectionReader, DeviceSectionsReader):
    """Reads the source-to-destination stream into :class:`Record` values."""

    def __init__(
        self,
        version: str | None = None,
        *,
        local_page_sizes: dict[str, int] | None = None,
        host_page_size: int | None = None,
        vmdesc: Any = None,
        max_record: int = MAX_RECORD,
        schema: Schema | None = None,
    ) -> None:
        """``schema``: read with it instead of ``version``'s (one built from another profile)."""
        self.schema: Schema = schema or schema_for(version)
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
        self._frame = Frame(Mode.HEADER)
        self._packages: list[int] = []  # absolute end offsets of the open PACKAGED blobs
        # Per open package: whether its load has ended (POSTCOPY_RUN or an EOF inside it,
        # after which QEMU stops reading the blob).
        self._package_done: list[bool] = []
        self._section_types = self.profile.section_type_names
        self._mem_size_rules()

    # --- feeding ----------------------------------------------------------------------

    def new_channel(self, offset: int = 0) -> None:
        """Postcopy recovery: the rest of the stream comes on a new connection. It starts at
        the top level (a command or a section, no header), the bytes of an unfinished record
        on the old one are dropped, and the first page record names its block again. What
        was learnt (sections, blocks) stays. Offsets count from ``offset`` at its first byte
        (0: the connection's own; a recording of several connections passes where this one
        starts in it)."""
        self._init_input()
        self._base = offset
        self._frame = Frame(Mode.TOP)
        self._packages = []
        self.context.current_block = None

    def __iter__(self) -> Iterator[Record]:
        """Every record of what was fed so far (call after feed_eof() for a whole stream)."""
        return records_of(self.next_record)

    # --- reading ----------------------------------------------------------------------

    def next_record(self) -> Record | Sentinel:
        start = self._pos
        try:
            return self._next()
        except NeedMore as need:
            self._pos = start
            if self._eof:
                raise TruncatedError(need.what, need.offset) from None
            limit = need.limit or self.max_record
            if len(self._buf) - self._pos > limit:
                raise MalformedError(
                    need.what, f"record larger than qmig's {limit} byte limit", need.offset
                ) from None
            return NEED_DATA

    def _next(self) -> Record | Sentinel:
        if self._packages and self.offset == self._packages[-1]:
            return self._close_package()
        if self._pos >= len(self._buf):
            if not self._eof:
                return NEED_DATA
            if self._frame.mode in (Mode.AFTER_EOF, Mode.END):
                self._frame = Frame(Mode.END)
                return END
            raise TruncatedError(self._expected_what(), self.offset)
        mode = self._frame.mode
        match mode:
            case Mode.TOP:
                return self._read_top()
            case Mode.RAM:
                return self._read_ram()
            case Mode.FOOTER:
                return self._read_footer()
            case Mode.DEVICE:
                return self._read_device()
            case Mode.HEADER:
                return self._read_header()
            case Mode.CONFIGURATION:
                return self._read_configuration()
            case Mode.AFTER_EOF:
                return self._read_after_eof()
            case Mode.END:
                raise MalformedError(
                    "stream", "trailing bytes after the end of the stream", self.offset
                )
            case _:
                assert_never(mode)

    def _expected_what(self) -> str:
        if self._frame.mode is Mode.RAM:
            return "RAM"
        if self._packages:
            return "PACKAGED"
        return "stream"

    # --- stream header and configuration ------------------------------------------------

    def _read_header(self) -> Record:
        header, size = self._parse("HEADER", self.schema.header, self.schema.header_size)
        self._frame = Frame(Mode.CONFIGURATION)
        return self._emit(header, size)

    def _read_configuration(self) -> Record | Sentinel:
        if self._peek_byte() != self.profile.section_types["CONFIGURATION"]:
            if self.profile.configuration == "required":
                raise MalformedError("CONFIGURATION", "configuration section missing", self.offset)
            self._frame = Frame(Mode.TOP)
            return self._next()
        config, size = self._parse(
            "CONFIGURATION", self.schema.configuration, window=self.max_record
        )
        subsection = self.profile.section_types["SUBSECTION"]
        if self._pos + size >= len(self._buf) and not self._eof:
            raise NeedMore("CONFIGURATION", self.offset)  # more subsections may follow
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
        self._frame = Frame(Mode.TOP)
        return self._emit(config, size)

    # --- top level: sections and commands -----------------------------------------------

    def _read_top(self) -> Record | Sentinel:
        kind = self._peek_byte()
        name = self._section_types.get(kind)
        if name == "COMMAND":
            return self._read_command()
        if name in ("SECTION_START", "SECTION_FULL"):
            return self._read_full_header(name)
        if name in ("SECTION_PART", "SECTION_END"):
            return self._read_short_header(name)
        if name == "EOF":
            record = self._emit(m.Eof(), self.schema.section_type_size)
            if not self._packages:
                self._frame = Frame(Mode.AFTER_EOF)
            else:
                self._package_done[-1] = True
            return record
        raise MalformedError("stream", f"unknown section type {kind:#04x}", self.offset)

    def _read_full_header(self, name: str) -> Record:
        schema = self.schema.section_start if name == "SECTION_START" else self.schema.section_full
        header, size = self._parse(name, schema)
        section = Section(header.section_id, header.idstr, header.instance_id, header.version_id)
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

    def _enter_section(self, name: str, section: Section) -> None:
        if section.is_ram:
            self._frame = Frame(Mode.RAM, section)
        elif name == "SECTION_FULL":
            self._frame = Frame(Mode.DEVICE, section)
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
        footer, size = self._parse(
            "SECTION_FOOTER", self.schema.section_footer, self.schema.footer_size
        )
        if footer.section_id != section.section_id:
            raise MalformedError(
                "SECTION_FOOTER",
                f"mismatched section id in footer for {section.idstr!r} - read "
                f"{footer.section_id:#x} expected {section.section_id:#x}",
                self.offset,
            )
        self._frame = Frame(Mode.TOP)
        return self._emit(footer, size, section.idstr)

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
        head = self.schema.command_header_size
        header, _ = self._parse("COMMAND", self.schema.command_header, head)
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
        if name == "PACKAGED" and self._packages:
            # QEMU reads a package's length and blob from the outer stream, whichever stream
            # the command came from: from inside a package it takes the bytes after the
            # enclosing blob, and its read of that blob fails or parses foreign bytes.
            raise MalformedError(
                name,
                "a package inside a package: QEMU reads its length and blob from the outer "
                "stream, after the enclosing package",
                offset,
            )
        total = head + header.len
        if self._pos + total > self._limit():
            if self._bounded_by_package():
                raise MalformedError(name, "runs past the end of the package", offset)
            raise NeedMore(name, offset)
        payload = self._buf[self._pos + head : self._pos + total]
        message = parse_payload(
            name, "command", self.schema.command_payloads[name], payload, offset, head
        )
        self._note_command(message, offset)
        record = self._emit(message, total)
        if isinstance(message, m.Packaged):
            self._open_package(message, offset)
        return record

    def _note_command(self, message: Any, offset: int) -> None:
        if isinstance(message, m.PostcopyAdvise):
            self.context.advise = message
        elif isinstance(message, m.PostcopyRun) and self._packages:
            self._package_done[-1] = True

    def _open_package(self, packaged: m.Packaged, offset: int) -> None:
        if packaged.length > self.profile.packaged_max_length:
            raise MalformedError(
                "PACKAGED", f"unreasonably large packaged state: {packaged.length}", offset
            )
        self._packages.append(self.offset + packaged.length)
        self._package_done.append(False)

    def _close_package(self) -> Record:
        if self._frame.mode is not Mode.TOP:
            section = self._frame.section
            what = "RAM" if self._frame.mode is Mode.RAM else "PACKAGED"
            where = f" inside section {section.idstr!r}" if section else ""
            raise MalformedError(what, f"package ends{where}", self.offset)
        if not self._package_done[-1]:
            # QEMU loads a package until RUN or an EOF in it; at the blob's end it reads on,
            # finds nothing, and fails with an I/O error: the end of its input.
            raise TruncatedError(
                "PACKAGED",
                self.offset,
                during="a package that ends without POSTCOPY_RUN or EOF (QEMU reads on past "
                "its end)",
            )
        self._packages.pop()
        self._package_done.pop()
        return Record(self.offset, 0, m.PackageEnd(), len(self._packages) + 1)
