"""Multifd channels: the MultiFDInit_t handshake and MultiFDPacket_t packets, as construct schemas.

Each multifd connection opens with a 64-byte handshake (magic, version, the migration UUID,
the channel id, reserved bytes), then carries packets: a fixed header (flags, page counts, the
size of the payload, the packet number, the RAMBlock name), the page offsets (normal pages,
then zero pages where the version lists them, in an array of room for a full packet's pages),
then the payload (the normal pages, or their
compressed form). 10.0 adds device-state packets, told apart by a flag. Every number comes
from the profile's ``[multifd]`` table; checks that need the destination's blocks or the
negotiated method take them as arguments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import construct as cs

from qmig.errors import MalformedError, QmigError
from qmig.wire.multifd_profile import MultifdSpec
from qmig.wire.profiles import Profile, load_profile

WHAT_INIT = "MULTIFD_INIT"
WHAT_PACKET = "MULTIFD_PACKET"
RAMBLOCK_NAME_SIZE = 256
UUID_SIZE = 16


@dataclass(frozen=True)
class MultifdInit:
    """The handshake of one multifd channel."""

    uuid: bytes
    channel: int


@dataclass(frozen=True)
class MultifdPacketHeader:
    """A RAM packet's fixed part (the offsets and payload follow)."""

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    zero_pages: int
    ramblock: str


@dataclass(frozen=True)
class MultifdDeviceStateHeader:
    """A 10.0 device-state packet's fixed part (``next_packet_size`` bytes of state follow)."""

    flags: int
    idstr: str
    instance_id: int
    next_packet_size: int


def _name(raw: bytes) -> str:
    # QEMU forces the last byte to NUL and reads up to the first NUL.
    return raw[: RAMBLOCK_NAME_SIZE - 1].split(b"\0", 1)[0].decode("latin-1")


def _name_bytes(name: str) -> bytes:
    raw = name.encode("latin-1")
    if len(raw) >= RAMBLOCK_NAME_SIZE:
        raise QmigError(WHAT_PACKET, f"block name longer than {RAMBLOCK_NAME_SIZE - 1} bytes")
    return raw.ljust(RAMBLOCK_NAME_SIZE, b"\0")


class MultifdSchema:
    """The handshake and packet schemas of one profile's ``[multifd]`` table."""

    def __init__(self, profile: Profile) -> None:
        if profile.multifd is None:
            raise QmigError("--qemu-version", f"QEMU {profile.name} has no multifd format")
        self.profile = profile
        self.spec: MultifdSpec = profile.multifd
        self.init = cs.Struct(
            "magic" / cs.Int32ub,
            "version" / cs.Int32ub,
            "uuid" / cs.Bytes(UUID_SIZE),
            "id" / cs.Int8ub,
            "unused1" / cs.Bytes(7),
            "unused2" / cs.Bytes(32),
        )
        self.hdr = cs.Struct("magic" / cs.Int32ub, "version" / cs.Int32ub, "flags" / cs.Int32ub)
        lists_zero = self.spec.zero_pages == "packet"
        self._unused = 28 if lists_zero else 32
        self.packet = cs.Struct(
            "magic" / cs.Int32ub,
            "version" / cs.Int32ub,
            "flags" / cs.Int32ub,
            "pages_alloc" / cs.Int32ub,
            "normal_pages" / cs.Int32ub,
            "next_packet_size" / cs.Int32ub,
            "packet_num" / cs.Int64ub,
            # 7.2 reserves these 32 bytes; 9.0+ puts the zero-page count in the first four.
            "zero_pages" / (cs.Int32ub if lists_zero else cs.Computed(0)),
            "unused" / cs.Bytes(28 if lists_zero else 32),
            "ramblock" / cs.Bytes(RAMBLOCK_NAME_SIZE),
        )
        self.device_state = cs.Struct(
            "hdr" / self.hdr,
            "idstr" / cs.Bytes(RAMBLOCK_NAME_SIZE),
            "instance_id" / cs.Int32ub,
            "next_packet_size" / cs.Int32ub,
        )
        self.init_size: int = self.init.sizeof()
        self.hdr_size: int = self.hdr.sizeof()
        self.packet_size: int = self.packet.sizeof()
        self.device_state_size: int = self.device_state.sizeof()

    # --- handshake -------------------------------------------------------------------------

    def build_init(self, init: MultifdInit) -> bytes:
        if len(init.uuid) != UUID_SIZE:
            raise QmigError(WHAT_INIT, f"a UUID is {UUID_SIZE} bytes, not {len(init.uuid)}")
        return bytes(
            self.init.build(
                dict(
                    magic=self.spec.magic,
                    version=self.spec.version,
                    uuid=init.uuid,
                    id=init.channel,
                    unused1=bytes(7),
                    unused2=bytes(32),
                )
            )
        )

    def parse_init(
        self,
        data: bytes | bytearray | memoryview,
        offset: int = 0,
        *,
        uuid: bytes | None = None,
        channels: int | None = None,
    ) -> MultifdInit:
        """The destination's checks: magic, version, then (when given) the UUID it expects
        and the number of channels it opened (the id must be below it)."""
        fields = self.init.parse(bytes(data[: self.init_size]))
        if fields.magic != self.spec.magic:
            raise MalformedError(
                WHAT_INIT, f"magic: {fields.magic:#x} is not {self.spec.magic:#x}", offset
            )
        if fields.version != self.spec.version:
            raise MalformedError(
                WHAT_INIT, f"version: {fields.version} is not {self.spec.version}", offset + 4
            )
        if uuid is not None and fields.uuid != uuid:
            raise MalformedError(
                WHAT_INIT,
                f"uuid: {fields.uuid.hex()} is not the migration's {uuid.hex()}",
                offset + 8,
            )
        if channels is not None and fields.id >= channels:
            raise MalformedError(
                WHAT_INIT,
                f"channel id: {fields.id} is not below the {channels} channels",
                offset + 8 + UUID_SIZE,
            )
        return MultifdInit(fields.uuid, fields.id)

    # --- packets ---------------------------------------------------------------------------

    def is_device_state(self, flags: int) -> bool:
        device = self.spec.device_state_flag
        return device is not None and bool(flags & device)

    def page_count(self, page_size: int) -> int:
        """How many pages a packet holds at most (QEMU's page_count)."""
        return self.spec.packet_size // page_size

    def packet_len(self, page_size: int) -> int:
        """A RAM packet's size before its payload: the fixed part and an offset array of
        page_count entries, whatever the counts (QEMU reads and writes that many bytes)."""
        return self.packet_size + 8 * self.page_count(page_size)

    def build_packet(
        self, header: MultifdPacketHeader, offsets: list[int], page_size: int = 4096
    ) -> bytes:
        """The fixed part and the offset array (normal pages, then zero pages, then unused
        entries); the payload follows."""
        if header.zero_pages and self.spec.zero_pages != "packet":
            raise QmigError(WHAT_PACKET, f"QEMU {self.profile.name} lists no zero pages")
        if len(offsets) != header.normal_pages + header.zero_pages:
            raise QmigError(WHAT_PACKET, "one offset per normal and zero page")
        head = self.packet.build(
            dict(
                magic=self.spec.magic,
                version=self.spec.version,
                flags=header.flags,
                pages_alloc=header.pages_alloc,
                normal_pages=header.normal_pages,
                next_packet_size=header.next_packet_size,
                packet_num=header.packet_num,
                zero_pages=header.zero_pages,
                unused=bytes(self._unused),
                ramblock=_name_bytes(header.ramblock),
            )
        )
        if len(offsets) > self.page_count(page_size):
            raise QmigError(WHAT_PACKET, f"more than {self.page_count(page_size)} pages")
        array = b"".join(o.to_bytes(8, "big") for o in offsets)
        return bytes(head) + array.ljust(self.packet_len(page_size) - self.packet_size, b"\0")

    def build_device_state(self, header: MultifdDeviceStateHeader) -> bytes:
        return bytes(
            self.device_state.build(
                dict(
                    hdr=dict(magic=self.spec.magic, version=self.spec.version, flags=header.flags),
                    idstr=_name_bytes(header.idstr),
                    instance_id=header.instance_id,
                    next_packet_size=header.next_packet_size,
                )
            )
        )

    def parse_hdr(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Magic and version of any packet; returns its flags."""
        magic = int.from_bytes(data[0:4], "big")
        version = int.from_bytes(data[4:8], "big")
        flags = int.from_bytes(data[8:12], "big")
        if magic != self.spec.magic:
            raise MalformedError(
                WHAT_PACKET, f"magic: {magic:#x} is not {self.spec.magic:#x}", offset
            )
        if version != self.spec.version:
            raise MalformedError(
                WHAT_PACKET, f"version: {version} is not {self.spec.version}", offset + 4
            )
        unknown = flags & ~self.spec.known_flags
        if unknown:
            raise MalformedError(WHAT_PACKET, f"flags: unknown bits {unknown:#x}", offset + 8)
        method = flags & self.spec.compression_mask
        if method not in self.spec.compression_names:
            raise MalformedError(
                WHAT_PACKET, f"flags: unknown compression method {method:#x}", offset + 8
            )
        return flags

    def payload_size(self, header: MultifdPacketHeader, page_size: int) -> int:
        """The bytes after the offsets: QEMU reads the normal pages themselves when the packet
        is not compressed, and ``next_packet_size`` bytes when it is."""
        if not header.normal_pages:
            return 0
        if header.flags & self.spec.compression_mask == self.spec.compression["NOCOMP"]:
            return header.normal_pages * page_size
        return header.next_packet_size

    def parse_packet(
        self, data: bytes | bytearray | memoryview, offset: int, page_size: int
    ) -> MultifdPacketHeader:
        """The fixed part of a RAM packet, with QEMU's count checks (before any offset is read:
        a hostile count never sizes a read)."""
        self.parse_hdr(data, offset)
        fields = self.packet.parse(bytes(data[: self.packet_size]))
        flags = fields.flags
        page_count = self.page_count(page_size)
        at = functools.partial(field_at, self.packet, offset)
        if fields.pages_alloc > page_count:
            raise MalformedError(
                WHAT_PACKET,
                f"pages_alloc: {fields.pages_alloc} is more than {page_count} pages",
                at("pages_alloc"),
            )
        if fields.normal_pages > fields.pages_alloc:
            raise MalformedError(
                WHAT_PACKET,
                f"normal_pages: {fields.normal_pages} is more than pages_alloc "
                f"{fields.pages_alloc}",
                at("normal_pages"),
            )
        if fields.zero_pages > fields.pages_alloc - fields.normal_pages:
            raise MalformedError(
                WHAT_PACKET,
                f"zero_pages: {fields.zero_pages} is more than the "
                f"{fields.pages_alloc - fields.normal_pages} pages left",
                at("zero_pages"),
            )
        return MultifdPacketHeader(
            flags=flags,
            pages_alloc=fields.pages_alloc,
            normal_pages=fields.normal_pages,
            next_packet_size=fields.next_packet_size,
            packet_num=fields.packet_num,
            zero_pages=fields.zero_pages,
            ramblock=_name(fields.ramblock),
        )

    def parse_device_state(
        self, data: bytes | bytearray | memoryview, offset: int
    ) -> MultifdDeviceStateHeader:
        flags = self.parse_hdr(data, offset)
        fields = self.device_state.parse(bytes(data[: self.device_state_size]))
        return MultifdDeviceStateHeader(
            flags=flags,
            idstr=_name(fields.idstr),
            instance_id=fields.instance_id,
            next_packet_size=fields.next_packet_size,
        )

    def check_offsets(
        self,
        header: MultifdPacketHeader,
        offsets: list[int],
        used_length: int,
        page_size: int,
        offset: int,
    ) -> None:
        """Every page must lie inside the block (QEMU: offset <= used_length - page size) and
        be page aligned; ``offset`` is where the offset list starts."""
        for i, page in enumerate(offsets):
            kind = "normal" if i < header.normal_pages else "zero"
            if page % page_size or page + page_size > used_length:
                raise MalformedError(
                    WHAT_PACKET,
                    f"offset[{i}] ({kind} page) {page:#x} is outside block "
                    f"{header.ramblock!r} of {used_length:#x} bytes or not page aligned",
                    offset + 8 * i,
                )


def field_at(struct: cs.Struct, base: int, name: str) -> int:
    """The byte offset of ``name`` in a fixed-size struct, from ``base``."""
    position = 0
    for sub in struct.subcons:
        if sub.name == name:
            return base + position
        position += sub.sizeof()
    raise KeyError(name)


@functools.cache
def multifd_schema(version: str | None = None) -> MultifdSchema:
    return MultifdSchema(load_profile(version))
