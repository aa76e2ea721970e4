"""Every byte layout of QEMU's migration stream and its return path, as construct schemas.

This file is the one place where qmig describes bytes. Each Struct reads like the layout it
encodes; the numbers come from a version profile (``formats/qemu-*.toml``), so one
:class:`Schema` exists per QEMU version. Every schema parses and builds, byte-identical.
Integers are big-endian throughout. The checks mirror the receiving QEMU's, in its order,
and each names itself (see :mod:`qmig.wire.fields`).

The bulk page records have a faster decoder beside this schema, in :mod:`qmig.wire.ramscan`;
``tests/wire/test_ramscan.py`` proves the two agree.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import construct as cs
from construct import this

from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.fields import (
    As,
    CountedName,
    Expect,
    NonEmpty,
    Require,
    Valid,
    counted_string,
    empty,
)
from qmig.wire.profiles import Profile, load_profile

MAX_MACHINE_TYPE_LENGTH = 4096  # qmig's bound on the be32 machine-type length
RECV_BITMAP_END_MARK = 0x0123456789ABCDEF  # QEMU's RAMBLOCK_RECV_BITMAP_ENDING
RESUME_ACK_VALUE = 1  # QEMU's MIGRATION_RESUME_ACK_VALUE: any other RESUME_ACK is refused
CONFIGURATION_PREFIX = "configuration/"

# Fields whose sizes the readers and the fast paths need, named once.
SECTION_TYPE = cs.Int8ub  # the byte that opens every section, command and EOF
VMDESCRIPTION_LENGTH = cs.Int32ub  # the JSON's length after VMDESCRIPTION
DISCARD_VERSION = cs.Int8ub
DISCARD_TERMINATOR = cs.Const(0, cs.Int8ub)  # after the block name
RAM_RECORD_HEADER = cs.Int64ub  # offset | flags, before every RAM record
MEM_SIZE_FIELD = cs.Int64ub  # used length, page size and region address of a MEM_SIZE entry
RECV_BITMAP_SIZE = cs.Int64ub
RECV_BITMAP_END = cs.Const(RECV_BITMAP_END_MARK, cs.Int64ub)


def field_offset(struct: cs.Struct, name: str) -> int:
    """Where field ``name`` of a fixed-size Struct starts (the fields before it, sized)."""
    offset = 0
    for sub in struct.subcons:
        if sub.name == name:
            return offset
        offset += sub.sizeof()
    raise KeyError(name)


def counted_size(name: str) -> int:
    """Bytes a counted name takes on the wire: its length byte and the name."""
    return len(CountedName.build(name))


# --- stream header and CONFIGURATION ----------------------------------------------------


def stream_header(profile: Profile) -> cs.Construct:
    """be32 magic "QEVM", be32 version: the one this QEMU reads (older ones are obsolete)."""
    return As(
        m.StreamHeader,
        cs.Struct(
            "magic" / Expect(cs.Const(profile.magic, cs.Int32ub), "not a migration stream"),
            "version" / cs.Int32ub,
            Require(
                lambda ctx: ctx.version not in profile.obsolete_versions,
                lambda ctx: f"SaveVM v{ctx.version} format is obsolete",
            ),
            Require(
                lambda ctx: ctx.version == profile.stream_version,
                lambda ctx: f"unsupported migration stream version {ctx.version}",
            ),
        ),
    )


def configuration_subsection(profile: Profile) -> cs.Construct:
    """SUBSECTION, counted name "configuration/NAME", be32 version, then NAME's body."""
    bodies = {
        "target-page-bits": cs.Struct("target_page_bits" / cs.Int32ub),
        "capabilities": cs.Struct("capabilities" / cs.PrefixedArray(cs.Int32ub, CountedName)),
        "uuid": cs.Struct("uuid" / cs.Bytes(16)),
    }
    return cs.Struct(
        "marker"
        / Expect(
            cs.Const(profile.section_types["SUBSECTION"], SECTION_TYPE), "expected a subsection"
        ),
        "name" / CountedName,
        Require(
            lambda ctx: (
                ctx.name.removeprefix(CONFIGURATION_PREFIX) in profile.configuration_subsections
            ),
            lambda ctx: f"unknown subsection {ctx.name!r}",
        ),
        "version_id" / cs.Int32ub,
        "body" / cs.Switch(lambda ctx: ctx.name.removeprefix(CONFIGURATION_PREFIX), bodies),
    )


def configuration(profile: Profile, subsection: cs.Construct) -> cs.Construct:
    """CONFIGURATION, be32-counted machine type, then subsections while SUBSECTION follows."""
    marker = profile.section_types["SUBSECTION"]
    return _ConfigurationAdapter(
        cs.Struct(
            "section_type" / cs.Const(profile.section_types["CONFIGURATION"], SECTION_TYPE),
            "machine_type_length" / cs.Int32ub,
            Require(
                lambda ctx: ctx.machine_type_length <= MAX_MACHINE_TYPE_LENGTH,
                lambda ctx: (
                    f"machine type name length {ctx.machine_type_length} "
                    f"exceeds {MAX_MACHINE_TYPE_LENGTH}"
                ),
            ),
            "machine_type" / cs.Bytes(this.machine_type_length),
            "subsections"
            / cs.GreedyRange(
                cs.Struct(cs.Peek(cs.Const(marker, SECTION_TYPE)), "subsection" / subsection)
            ),
        )
    )


# --- sections ------------------------------------------------------------------------------


def full_section_header(cls: type, section_type: int) -> cs.Construct:
    """SECTION_START / SECTION_FULL: type, be32 id, counted idstr, be32 instance, be32 version."""
    return As(
        cls,
        cs.Struct(
            "section_type" / cs.Const(section_type, SECTION_TYPE),
            "section_id" / cs.Int32ub,
            "idstr"
            / NonEmpty(
                CountedName,
                lambda ctx: f"unable to read ID string for section {ctx.section_id}",
            ),
            "instance_id" / cs.Int32ub,
            "version_id" / cs.Int32ub,
        ),
    )


def short_section_header(cls: type, section_type: int) -> cs.Construct:
    """SECTION_PART / SECTION_END: type, be32 id of a section started before."""
    return As(
        cls,
        cs.Struct(
            "section_type" / cs.Const(section_type, SECTION_TYPE),
            "section_id" / cs.Int32ub,
        ),
    )


def section_footer(profile: Profile) -> cs.Construct:
    """SECTION_FOOTER, be32 id of the section it ends."""
    return As(
        m.SectionFooter,
        cs.Struct(
            "section_type"
            / Expect(
                cs.Const(profile.section_types["SECTION_FOOTER"], SECTION_TYPE),
                "missing section footer",
            ),
            "section_id" / cs.Int32ub,
        ),
    )


def eof(profile: Profile) -> cs.Construct:
    """EOF: one byte."""
    marker = profile.section_types["EOF"]
    return cs.ExprAdapter(
        cs.Const(marker, SECTION_TYPE),
        decoder=lambda obj, ctx: m.Eof(),
        encoder=lambda obj, ctx: marker,
    )


def vmdescription(profile: Profile) -> cs.Construct:
    """VMDESCRIPTION, be32-counted JSON."""
    return As(
        m.VmDescription,
        cs.Struct(
            "section_type" / cs.Const(profile.section_types["VMDESCRIPTION"], SECTION_TYPE),
            "json" / cs.Prefixed(VMDESCRIPTION_LENGTH, cs.GreedyBytes),
        ),
    )


# --- QEMU_VM_COMMAND: COMMAND, be16 cmd, be16 len, len bytes -------------------------------


def command_header(profile: Profile) -> cs.Construct:
    return cs.Struct(
        "section_type" / cs.Const(profile.section_types["COMMAND"], SECTION_TYPE),
        "cmd" / cs.Int16ub,
        "len" / cs.Int16ub,
    )


def ping() -> cs.Construct:
    return As(m.Ping, cs.Struct("value" / cs.Int32ub))


def postcopy_advise() -> cs.Construct:
    """Empty without RAM postcopy; else be64 page size summary, be64 target page size."""
    return cs.ExprAdapter(
        cs.If(
            this.len == 16,
            cs.Struct("page_size_summary" / cs.Int64ub, "target_page_size" / cs.Int64ub),
        ),
        decoder=lambda sizes, ctx: (
            m.PostcopyAdvise()
            if sizes is None
            else m.PostcopyAdvise(sizes.page_size_summary, sizes.target_page_size)
        ),
        encoder=lambda advise, ctx: (
            {
                "page_size_summary": advise.page_size_summary,
                "target_page_size": advise.target_page_size,
            }
            if advise.ram_postcopy
            else None
        ),
    )


def discard_range() -> cs.Construct:
    """be64 start, be64 length: one range of a POSTCOPY_RAM_DISCARD."""
    return As(m.DiscardRange, cs.Struct("start" / cs.Int64ub, "length" / cs.Int64ub))


def postcopy_ram_discard(profile: Profile) -> cs.Construct:
    """u8 version, counted block name, 0x00, then ranges to the end of the command."""
    ranges_bytes = this._.len - 3 - cs.len_(this.block)
    return As(
        m.PostcopyRamDiscard,
        cs.Struct(
            "version" / DISCARD_VERSION,
            Require(
                lambda ctx: ctx.version == profile.discard_version,
                lambda ctx: f"invalid version {ctx.version}",
            ),
            "block" / NonEmpty(CountedName, "failed to read RAMBlock ID"),
            "terminator" / Expect(DISCARD_TERMINATOR, "missing 0x00 terminator after block name"),
            Require(
                lambda ctx: (ctx._.len - 3 - len(ctx.block)) % 16 == 0,
                lambda ctx: (
                    f"invalid length {(ctx._.len - 3 - len(ctx.block)) & 0xFFFF}"
                    " (ranges are 16 bytes each)"
                ),
            ),
            "ranges" / cs.Array(ranges_bytes // 16, discard_range()),
        ),
    )


def packaged() -> cs.Construct:
    """be32 length of the blob that follows the command (outside its own length)."""
    return As(m.Packaged, cs.Struct("length" / cs.Int32ub))


def recv_bitmap() -> cs.Construct:
    return As(m.RecvBitmap, cs.Struct("block" / NonEmpty(CountedName, "failed to read block name")))


def command_payloads(profile: Profile) -> dict[str, cs.Construct]:
    """The payload of every command this QEMU knows, by name."""
    payloads: dict[str, cs.Construct] = {
        "OPEN_RETURN_PATH": empty(m.OpenReturnPath),
        "PING": ping(),
        "POSTCOPY_ADVISE": postcopy_advise(),
        "POSTCOPY_LISTEN": empty(m.PostcopyListen),
        "POSTCOPY_RUN": empty(m.PostcopyRun),
        "POSTCOPY_RAM_DISCARD": postcopy_ram_discard(profile),
        "PACKAGED": packaged(),
        "ENABLE_COLO": empty(m.EnableColo),
        "POSTCOPY_RESUME": empty(m.PostcopyResume),
        "RECV_BITMAP": recv_bitmap(),
        "SWITCHOVER_START": empty(m.SwitchoverStart),
    }
    return {name: payloads[name] for name in profile.commands if name in payloads}


# --- return path: be16 type, be16 len, len bytes -------------------------------------------


def rp_header() -> cs.Construct:
    return cs.Struct("type" / cs.Int16ub, "len" / cs.Int16ub)


def req_pages_id() -> cs.Construct:
    """be64 start, be32 length, counted block name; the length covers the name exactly."""
    return As(
        m.ReqPagesId,
        cs.Struct(
            "start" / cs.Int64ub,
            "length" / cs.Int32ub,
            "name_length" / cs.Peek(cs.Int8ub),
            Require(lambda ctx: ctx._.len == 13 + ctx.name_length, _req_pages_id_length),
            "block" / CountedName,
        ),
    )


def req_pages() -> cs.Construct:
    """be64 start, be32 length, in the block the previous REQ_PAGES_ID named."""
    return As(m.ReqPages, cs.Struct("start" / cs.Int64ub, "length" / cs.Int32ub))


def rp_payloads(profile: Profile) -> dict[str, cs.Construct]:
    """The payload of every return-path message this QEMU knows, by name."""
    payloads: dict[str, cs.Construct] = {
        "SHUT": As(m.Shut, cs.Struct("status" / cs.Int32ub)),
        "PONG": As(m.Pong, cs.Struct("value" / cs.Int32ub)),
        "REQ_PAGES_ID": req_pages_id(),
        "REQ_PAGES": req_pages(),
        "RECV_BITMAP": As(
            m.RpRecvBitmap, cs.Struct("block" / Expect(CountedName, "missing block name"))
        ),
        "RESUME_ACK": As(m.ResumeAck, cs.Struct("value" / cs.Int32ub)),
        "SWITCHOVER_ACK": empty(m.SwitchoverAck),
    }
    return {name: payloads[name] for name in profile.rp_messages if name in payloads}


def recv_bitmap_trailer() -> cs.Construct:
    """What follows RP RECV_BITMAP outside its length: the block's received bitmap, which the
    source reads straight off the stream."""
    return cs.Struct(
        "size"  # bytes: the page count rounded up to whole 64-bit words
        / Valid(
            RECV_BITMAP_SIZE,
            "missing bitmap size",
            lambda size: size % 8 == 0,
            lambda size: f"bitmap size {size:#x} is not a whole number of 64-bit words",
        ),
        "bitmap" / cs.Bytes(this.size),  # little-endian 64-bit words
        "end_mark" / Expect(RECV_BITMAP_END, "bitmap end mark incorrect"),
    )


# --- the "ram" section: be64 (offset | flags), then a body chosen by the flags -------------


def mem_size_block() -> cs.Construct:
    """One MEM_SIZE entry: counted idstr, be64 used length, [be64 page size], [be64 mr addr].

    Whether the optional fields are there is not in the bytes: the parse gets ``rules``.
    """
    return As(
        m.RamBlockInfo,
        cs.Struct(
            "idstr" / NonEmpty(CountedName, "failed to read RAMBlock name", "empty RAMBlock name"),
            "used_length" / MEM_SIZE_FIELD,
            "page_size" / cs.If(lambda ctx: ctx._params.rules.page_size_field(ctx), MEM_SIZE_FIELD),
            "mr_addr" / cs.If(lambda ctx: ctx._params.rules.mr_addr_field, MEM_SIZE_FIELD),
        ),
    )


def xbzrle_limit(profile: Profile, page_size: int) -> int:
    """The longest XBZRLE body the profile's rule lets a receiver take (QEMU: "len overflow")."""
    match profile.max_xbzrle_length:
        case "target-page":
            return page_size
        case rule:
            raise QmigError("profile", f"{profile.name}: unknown max_xbzrle_length rule {rule!r}")


def xbzrle_body(limit: int) -> cs.Construct:
    """u8 encoding (1), be16 length of at most ``limit`` (a page), the encoded bytes."""
    return cs.Struct(
        "encoding" / cs.Int8ub,
        Require(
            lambda ctx: ctx.encoding == 1,
            lambda ctx: f"unknown XBZRLE encoding {ctx.encoding:#x}",
        ),
        "length" / cs.Int16ub,
        Require(
            lambda ctx: ctx.length <= limit,
            lambda ctx: f"XBZRLE length {ctx.length} overflows a page",
        ),
        "data" / cs.Bytes(this.length),
    )


def compressed_body(page_size: int) -> cs.Construct:
    """be32 length, the zlib bytes; at most what compressing a page can grow to."""
    return cs.Struct(
        "length" / cs.Int32ub,
        Require(
            lambda ctx: ctx.length <= page_size + page_size // 1000 + 64,
            lambda ctx: f"invalid compressed data length {ctx.length}",
        ),
        "data" / cs.Bytes(this.length),
    )


def ram_bodies(profile: Profile, page_size: int) -> dict[int, cs.Construct]:
    """What follows a RAM record header (and its block name), by the record's kind flag."""
    flags = profile.ram_flags
    bodies: dict[int, cs.Construct] = {
        flags["ZERO"]: cs.Struct("fill" / cs.Int8ub),
        flags["PAGE"]: cs.Struct("data" / cs.Bytes(page_size)),
        flags["XBZRLE"]: xbzrle_body(xbzrle_limit(profile, page_size)),
    }
    if "COMPRESS_PAGE" in flags:
        bodies[flags["COMPRESS_PAGE"]] = compressed_body(page_size)
    return bodies


def ram_record(profile: Profile, bodies: dict[int, cs.Construct], flag_mask: int) -> cs.Construct:
    """be64 offset | flags; the block name unless CONTINUE; the body the kind flag selects."""
    flags = profile.ram_flags
    return cs.Struct(
        "header" / RAM_RECORD_HEADER,
        "offset" / cs.Computed(this.header & ~flag_mask),
        "flags" / cs.Computed(this.header & flag_mask),
        "kind" / cs.Computed(this.flags & ~flags["CONTINUE"]),
        "block"
        / cs.If(
            lambda ctx: not ctx.flags & flags["CONTINUE"] and ctx.kind in bodies,
            Expect(CountedName, "failed to read RAMBlock name"),
        ),
        "body" / cs.Switch(this.kind, bodies, default=cs.Pass),
    )


class Schema:
    """The construct schemas for one QEMU version."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        section = profile.section_types
        self.target_page_size = 1 << profile.default_target_page_bits

        self.header = stream_header(profile)
        self.configuration_subsection = configuration_subsection(profile)
        self.configuration = configuration(profile, self.configuration_subsection)

        self.section_start = full_section_header(m.SectionStart, section["SECTION_START"])
        self.section_full = full_section_header(m.SectionFull, section["SECTION_FULL"])
        self.section_part = short_section_header(m.SectionPart, section["SECTION_PART"])
        self.section_end = short_section_header(m.SectionEnd, section["SECTION_END"])
        self.section_footer = section_footer(profile)
        self.eof = eof(profile)
        self.vmdescription = vmdescription(profile)

        self.command_header = command_header(profile)
        self.command_payloads = command_payloads(profile)
        self.command_classes = {cls.NAME: cls for cls in m.COMMANDS}

        self.rp_header = rp_header()
        self.rp_payloads = rp_payloads(profile)
        trailers = {"RECV_BITMAP": recv_bitmap_trailer()}
        self.rp_trailers = {name: trailers[name] for name in self.rp_payloads if name in trailers}
        self.rp_classes = {cls.NAME: cls for cls in m.RETURN_PATH_MESSAGES}

        self.flag_mask = self.target_page_size - 1
        self.ram_record_header = RAM_RECORD_HEADER
        self.mem_size_block = mem_size_block()
        self.ram_bodies = ram_bodies(profile, self.target_page_size)
        self.ram_record = ram_record(profile, self.ram_bodies, self.flag_mask)
        self.ram_body_sizes = {
            kind: self.ram_bodies[kind].sizeof()
            for kind in (profile.ram_flags["ZERO"], profile.ram_flags["PAGE"])
        }

        # The fixed parts' sizes, from the layouts above: the readers delimit records by them.
        self.header_size = self.header.sizeof()
        self.command_header_size = self.command_header.sizeof()
        self.command_length_at = field_offset(self.command_header, "len")
        self.footer_size = self.section_footer.sizeof()
        self.short_section_header_size = self.section_part.sizeof()  # then a full one's name
        self.full_section_header_size = len(self.section_full.build(m.SectionFull(0, "", 0, 0)))
        self.section_type_size = SECTION_TYPE.sizeof()
        self.name_length_size = counted_size("")  # the length byte before every name
        self.vmdescription_length_size = VMDESCRIPTION_LENGTH.sizeof()
        self.vmdescription_head_size = self.section_type_size + self.vmdescription_length_size
        self.rp_header_size = self.rp_header.sizeof()
        self.ram_header_size = self.ram_record_header.sizeof()
        self.mem_size_field_size = MEM_SIZE_FIELD.sizeof()
        self.recv_bitmap_size_size = RECV_BITMAP_SIZE.sizeof()
        self.recv_bitmap_fixed_size = self.recv_bitmap_size_size + RECV_BITMAP_END.sizeof()
        # EOF then VMDESCRIPTION: how the JSON that ends a precopy stream begins.
        self.vmdescription_marker = bytes(
            [profile.section_types["EOF"], profile.section_types["VMDESCRIPTION"]]
        )

    def discard_range_offset(self, block: str, index: int) -> int:
        """Bytes from a POSTCOPY_RAM_DISCARD command's first byte to its range ``index``."""
        return self.command_header_size + discard_range_offset(block, index)

    # --- building -----------------------------------------------------------------------

    def build_command(self, message: m.Command, *, blob: bytes = b"") -> bytes:
        """The bytes of one QEMU_VM_COMMAND; for PACKAGED, ``blob`` follows the command."""
        name = message.NAME
        payload = self.command_payloads[name].build(message, len=_payload_length(message))
        header = self.command_header.build(
            {"cmd": self.profile.commands[name], "len": len(payload)}
        )
        return header + payload + blob

    def build_packaged(self, inner: bytes) -> bytes:
        return self.build_command(m.Packaged(len(inner)), blob=inner)

    def build_rp(self, message: m.ReturnPathMessage) -> bytes:
        """One return-path message, with what follows it outside its length (a bitmap)."""
        name = message.NAME
        payload = self.rp_payloads[name].build(message)
        header = self.rp_header.build({"type": self.profile.rp_messages[name], "len": len(payload)})
        trailer = b""
        if isinstance(message, m.RpRecvBitmap):
            trailer = self.rp_trailers[name].build(
                {"size": len(message.bitmap), "bitmap": message.bitmap}
            )
        return header + payload + trailer

    def build_ram_page(self, page: m.RamPage) -> bytes:
        flags = self.profile.ram_flags
        kind = flags["ZERO"] if page.zero else flags["PAGE"]
        body = {"fill": page.data[0]} if page.zero else {"data": page.data}
        return self._build_ram(kind, page.block, page.offset, body)

    def build_ram_xbzrle(self, record: m.RamXbzrle) -> bytes:
        body = {"encoding": 1, "length": len(record.encoded), "data": record.encoded}
        return self._build_ram(self.profile.ram_flags["XBZRLE"], record.block, record.offset, body)

    def build_ram_compressed(self, record: m.RamCompressed) -> bytes:
        body = {"length": len(record.compressed), "data": record.compressed}
        kind = self.profile.ram_flags["COMPRESS_PAGE"]
        return self._build_ram(kind, record.block, record.offset, body)

    def _build_ram(self, kind: int, block: str | None, offset: int, body: dict[str, Any]) -> bytes:
        flags = kind if block is not None else kind | self.profile.ram_flags["CONTINUE"]
        return self.ram_record.build({"header": offset | flags, "block": block, "body": body})

    def build_ram_flag(self, name: str, offset: int = 0) -> bytes:
        """A body-less RAM record: EOS, MULTIFD_FLUSH or HOOK."""
        return self.ram_record_header.build(offset | self.profile.ram_flags[name])

    def build_mem_size(self, mem_size: m.MemSize) -> bytes:
        out = self.ram_record_header.build(mem_size.total | self.profile.ram_flags["MEM_SIZE"])
        for block in mem_size.blocks:
            params = _MemSizeParams(
                page_size_field=lambda ctx, b=block: b.page_size is not None,
                mr_addr_field=block.mr_addr is not None,
            )
            out += self.mem_size_block.build(block, rules=params)
        return out

    def build_section(self, header: m.SectionHeader) -> bytes:
        builder = {
            m.SectionStart: self.section_start,
            m.SectionFull: self.section_full,
            m.SectionPart: self.section_part,
            m.SectionEnd: self.section_end,
        }[type(header)]
        return builder.build(header)

    def build_footer(self, section_id: int) -> bytes:
        return self.section_footer.build(m.SectionFooter(section_id))

    def build_opening(self, configuration: m.Configuration, *, return_path: bool = False) -> bytes:
        """A stream's first records as a QEMU source writes them: the header (this profile's
        stream version), the CONFIGURATION section and, with ``return_path``,
        OPEN_RETURN_PATH."""
        out = self.header.build(m.StreamHeader(self.profile.stream_version))
        out += self.configuration.build(configuration)
        if return_path:
            out += self.build_command(m.OpenReturnPath())
        return bytes(out)

    def build_ram_setup(self, section_id: int, blocks: Sequence[m.RamBlockInfo]) -> bytes:
        """The RAM section's setup without multifd: SECTION_START of "ram" (instance 0, this
        profile's ram section version), MEM_SIZE listing ``blocks`` with the sum of their used
        lengths (as the record header holds it: a hostile list may claim more), EOS and the
        section's footer."""
        start = m.SectionStart(section_id, "ram", 0, self.profile.ram_section_version)
        total = sum(block.used_length for block in blocks) % (1 << 8 * self.ram_header_size)
        return (
            self.build_section(start)
            + self.build_mem_size(m.MemSize(total, tuple(blocks)))
            + self.build_ram_flag("EOS")
            + self.build_footer(section_id)
        )


class _MemSizeParams:
    """What decides the optional MEM_SIZE fields (not in the bytes at that point)."""

    def __init__(self, page_size_field: Any, mr_addr_field: bool) -> None:
        self.page_size_field = page_size_field
        self.mr_addr_field = mr_addr_field


def mem_size_params(page_size_field: Any, mr_addr_field: bool) -> _MemSizeParams:
    return _MemSizeParams(page_size_field, mr_addr_field)


def discard_range_offset(block: str, index: int) -> int:
    """Bytes from a POSTCOPY_RAM_DISCARD payload's first byte to its range ``index``."""
    head = DISCARD_VERSION.sizeof() + counted_size(block) + DISCARD_TERMINATOR.sizeof()
    return head + index * discard_range().sizeof()


def _payload_length(message: Any) -> int:
    """The length a payload's own fields need to know while building (ADVISE, DISCARD)."""
    if isinstance(message, m.PostcopyAdvise):
        return 16 if message.ram_postcopy else 0
    if isinstance(message, m.PostcopyRamDiscard):
        return discard_range_offset(message.block, len(message.ranges))
    return 0


def _req_pages_id_length(ctx: Any) -> str:
    return f"length {ctx._.len} expecting {13 + ctx.name_length}"


class _ConfigurationAdapter(cs.Adapter):
    def _decode(self, obj: Any, context: Any, path: str) -> m.Configuration:
        values: dict[str, Any] = {}
        for entry in obj.subsections:
            body = entry.subsection.body
            for key in ("target_page_bits", "capabilities", "uuid"):
                if body is not None and key in body:
                    value = body[key]
                    values[key] = tuple(value) if key == "capabilities" else value
        return m.Configuration(machine_type=obj.machine_type.decode("latin-1"), **values)

    def _encode(self, obj: m.Configuration, context: Any, path: str) -> dict[str, Any]:
        subsections = []

        def add(name: str, body: dict[str, Any]) -> None:
            subsections.append(
                {"subsection": {"name": CONFIGURATION_PREFIX + name, "version_id": 1, "body": body}}
            )

        if obj.target_page_bits is not None:
            add("target-page-bits", {"target_page_bits": obj.target_page_bits})
        if obj.capabilities is not None:
            add("capabilities", {"capabilities": list(obj.capabilities)})
        if obj.uuid is not None:
            add("uuid", {"uuid": obj.uuid})
        machine = obj.machine_type.encode("latin-1")
        return {
            "machine_type_length": len(machine),
            "machine_type": machine,
            "subsections": subsections,
        }


@functools.cache
def schema_for(version: str | None = None) -> Schema:
    """The (cached) schema of a QEMU version; ``None`` means qmig's default version."""
    return Schema(load_profile(version))


__all__ = [
    "Schema",
    "counted_size",
    "counted_string",
    "discard_range_offset",
    "field_offset",
    "mem_size_params",
    "schema_for",
]
