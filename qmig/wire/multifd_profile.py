"""The ``[multifd]`` and ``[mapped_ram]`` tables of a profile, as typed, checked objects.

Read by :meth:`qmig.wire.profiles.Profile.from_toml`; both tables are optional (QEMU 2.9 has
neither, 7.2 has no mapped-ram). Every mistake is one :class:`~qmig.errors.QmigError` line
naming the file and the dotted key, as for the rest of the profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qmig.wire.profile_spec import Table

U8, U32 = 0xFF, 0xFFFF_FFFF

# multifd.zero_pages (wire/multifd.py): where zero pages travel. "main-channel" = ZERO records
# on the main stream (7.2); "packet" = listed after the normal pages in each packet (9.0+).
ZeroPagesRule = Literal["main-channel", "packet"]
# multifd.sync (protocol/multifd_source.py): when the source syncs its channels. "per-section" =
# before every RAM EOS; "per-round" = at setup and at the end of each sweep, announced on the
# main channel by RAM_SAVE_FLAG_MULTIFD_FLUSH.
SyncRule = Literal["per-section", "per-round"]
# multifd.sync_pages_alloc: what a SYNC packet (no pages) says in pages_alloc. "page-count" =
# the packet's room, as page packets (7.2); "zero" = 0, the packet has no RAM payload (9.x+).
SyncPagesAlloc = Literal["page-count", "zero"]
# mapped_ram.bitmap_byte_order: the byte order of the host's unsigned longs.
ByteOrder = Literal["little", "big"]
COMPRESSION_NAMES = ("NOCOMP", "ZLIB", "ZSTD", "QPL", "UADK", "QATZIP")


@dataclass(frozen=True)
class MultifdSpec:
    """One version's multifd handshake and packet numbers."""

    magic: int
    version: int
    packet_size: int
    zero_pages: ZeroPagesRule
    sync_flag: int
    compression_mask: int
    compression: dict[str, int]
    device_state_flag: int | None
    sync: SyncRule = "per-section"
    sync_pages_alloc: SyncPagesAlloc = "page-count"
    # Machine types up to this version sync per section (hw_compat's
    # multifd-flush-after-each-section); None: every machine type follows ``sync``.
    per_section_machines: str | None = None
    # Machine types up to this version keep zero pages on the main channel (hw_compat's
    # zero-page-detection=legacy); None: every machine type follows ``zero_pages``.
    legacy_zero_pages_machines: str | None = None
    postcopy: bool = False  # QEMU accepts multifd together with postcopy-ram

    @property
    def main_flush(self) -> bool:
        """The main stream announces syncs with RAM_SAVE_FLAG_MULTIFD_FLUSH (8.1+): the
        destination waits for every channel's SYNC at each such record."""
        return self.sync == "per-round"

    @property
    def section_sync_machines(self) -> str | None:
        """The destination also waits at each RAM section's EOS for machine types up to this
        version ("all": every machine type; None: none)."""
        return "all" if self.sync == "per-section" else self.per_section_machines

    @property
    def compression_names(self) -> dict[int, str]:
        return {value: name for name, value in self.compression.items()}

    @property
    def known_flags(self) -> int:
        return self.sync_flag | self.compression_mask | (self.device_state_flag or 0)


@dataclass(frozen=True)
class MappedRamSpec:
    """One version's mapped-ram header and file layout numbers."""

    version: int
    file_offset_alignment: int
    bitmap_word: int
    bitmap_byte_order: ByteOrder


def _single_bit(table: Table, key: str, value: int) -> None:
    if not value or value & (value - 1):
        table.fail(f"{value:#x} is not a single bit", key)


def read_multifd(table: Table) -> MultifdSpec:
    with table:
        sync_flag = table.integer("sync_flag", 1, U32)
        _single_bit(table, "sync_flag", sync_flag)
        mask = table.integer("compression_mask", 0, U32)
        if mask & sync_flag:
            table.fail(f"{mask:#x} overlaps sync_flag {sync_flag:#x}", "compression_mask")
        device = table.integer("device_state_flag", 1, U32, None)
        if device is not None:
            _single_bit(table, "device_state_flag", device)
            if device & (mask | sync_flag):
                table.fail(f"{device:#x} overlaps another flag", "device_state_flag")
        packet_size = table.integer("packet_size", 1, U32)
        if packet_size & (packet_size - 1):
            table.fail(f"{packet_size:#x} is not a power of two", "packet_size")
        spec = MultifdSpec(
            magic=table.integer("magic", 0, U32),
            version=table.integer("version", 0, U32),
            packet_size=packet_size,
            zero_pages=table.choice("zero_pages", ZeroPagesRule),
            sync_flag=sync_flag,
            compression_mask=mask,
            compression=_compression(table.table("compression"), mask),
            device_state_flag=device,
            sync=table.choice("sync", SyncRule),
            sync_pages_alloc=table.choice("sync_pages_alloc", SyncPagesAlloc),
            per_section_machines=_version(table, "per_section_machines"),
            legacy_zero_pages_machines=_version(table, "legacy_zero_pages_machines"),
            postcopy=table.boolean("postcopy"),
        )
    return spec


def _version(table: Table, key: str) -> str | None:
    """An optional machine-type version, ``MAJOR.MINOR``."""
    if not table.has(key):
        table.taken.add(key)
        return None
    value = table.string(key)
    major, dot, minor = value.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        table.fail(f"{value!r} is not MAJOR.MINOR", key)
    return value


def _compression(table: Table, mask: int) -> dict[str, int]:
    methods: dict[str, int] = {}
    seen: dict[int, str] = {}
    with table:
        for name, value in table.entries():
            if name not in COMPRESSION_NAMES:
                table.fail("unknown method (known: " + ", ".join(COMPRESSION_NAMES) + ")", name)
            number = table.check_integer(value, 0, U32, name)
            if number & ~mask:
                table.fail(f"{number:#x} is outside compression_mask {mask:#x}", name)
            if number in seen:
                table.fail(f"{number:#x} is already {seen[number]}", name)
            methods[name], seen[number] = number, name
        if "NOCOMP" not in methods:
            table.fail("missing", "NOCOMP")
    return methods


def read_mapped_ram(table: Table) -> MappedRamSpec:
    with table:
        alignment = table.integer("file_offset_alignment", 1, 1 << 40)
        if alignment & (alignment - 1):
            table.fail(f"{alignment:#x} is not a power of two", "file_offset_alignment")
        word = table.integer("bitmap_word", 4, 8)
        if word not in (4, 8):
            table.fail(f"{word} is not 4 or 8", "bitmap_word")
        spec = MappedRamSpec(
            version=table.integer("version", 0, U32),
            file_offset_alignment=alignment,
            bitmap_word=word,
            bitmap_byte_order=table.choice("bitmap_byte_order", ByteOrder),
        )
    return spec
