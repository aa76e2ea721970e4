"""Multifd handshakes and packets, and mapped-ram headers (QEMU 7.2's and 10.0's layouts).

:func:`multifd_inits` gives handshakes; :func:`multifd_packets` gives a :class:`MultifdWire`
(the packet's header, its offsets, its decoded pages and its bytes, payload included, for one
page size); :func:`multifd_channels` a whole channel (handshake, packets, their events);
:func:`mapped_ram_headers` headers whose layout fits a block and a file; :func:`mapped_ram_files`
whole files.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from qmig.mapped_ram.writer import BlockContent, build_mapped_ram_file
from qmig.strategies.basics import names
from qmig.wire.mapped_ram import MappedRamHeader, mapped_ram_schema
from qmig.wire.multifd import (
    MultifdInit,
    MultifdPacketHeader,
    multifd_schema,
)

MULTIFD_PAGE = 4096


@dataclass(frozen=True)
class MultifdWire:
    """One packet as a source sends it, with what a reader must find in it."""

    header: MultifdPacketHeader
    offsets: tuple[int, ...]
    pages: tuple[bytes, ...]
    data: bytes


@dataclass(frozen=True)
class MultifdChannel:
    """A channel's bytes: the handshake, then packets."""

    version: str
    init: MultifdInit
    packets: tuple[MultifdWire, ...]
    data: bytes


def multifd_inits(version: str | None = None) -> st.SearchStrategy[MultifdInit]:
    multifd_schema(version)  # refuses a version without multifd
    return st.builds(
        MultifdInit, uuid=st.binary(min_size=16, max_size=16), channel=st.integers(0, 255)
    )


@st.composite
def _packet(
    draw: Any, version: str | None, method: str, block_pages: int, packet_num: int | None
) -> MultifdWire:
    schema = multifd_schema(version)
    spec = schema.spec
    alloc = draw(st.integers(0, min(8, spec.packet_size // MULTIFD_PAGE)))
    normal = draw(st.integers(0, alloc))
    zero = draw(st.integers(0, alloc - normal)) if spec.zero_pages == "packet" else 0
    count = normal + zero
    pages = tuple(draw(st.lists(st.integers(0, block_pages - 1), min_size=count, max_size=count)))
    offsets = tuple(page * MULTIFD_PAGE for page in pages)
    contents = tuple(
        draw(
            st.binary(min_size=MULTIFD_PAGE, max_size=MULTIFD_PAGE)
            | st.just(b"\x01" * MULTIFD_PAGE)
        )
        for _ in range(normal)
    )
    raw = b"".join(contents)
    if method == "ZLIB" and normal:
        # One packet per channel here: the channel's deflate stream starts with it.
        compressor = zlib.compressobj()
        payload = compressor.compress(raw) + compressor.flush(zlib.Z_SYNC_FLUSH)
    else:
        payload = raw
    sync = draw(st.booleans())
    flags = spec.compression[method] | (spec.sync_flag if sync else 0)
    header = MultifdPacketHeader(
        flags=flags,
        pages_alloc=alloc,
        normal_pages=normal,
        next_packet_size=len(payload),
        packet_num=draw(st.integers(0, 2**64 - 1)) if packet_num is None else packet_num,
        zero_pages=zero,
        ramblock=draw(names()) if count else "",
    )
    data = schema.build_packet(header, list(offsets)) + payload
    return MultifdWire(header, offsets, contents, data)


def multifd_packets(
    version: str | None = None, *, method: str = "NOCOMP", block_pages: int = 64
) -> st.SearchStrategy[MultifdWire]:
    """One RAM packet of 4 KiB pages in a block of ``block_pages`` pages; ``method``: NOCOMP
    or ZLIB (a ZLIB packet opens its channel's stream)."""
    return _packet(version, method, block_pages, None)


@st.composite
def multifd_channels(draw: Any, version: str | None = None, max_packets: int = 4) -> MultifdChannel:
    """A NOCOMP channel: its handshake, then packets numbered in order."""
    schema = multifd_schema(version)
    init = draw(multifd_inits(version))
    count = draw(st.integers(0, max_packets))
    packets = tuple(draw(_packet(version, "NOCOMP", 64, n)) for n in range(count))
    data = schema.build_init(init) + b"".join(p.data for p in packets)
    return MultifdChannel(version or schema.profile.name, init, packets, data)


@st.composite
def mapped_ram_headers(
    draw: Any, version: str | None = None, *, used_length: int = 64 * MULTIFD_PAGE
) -> tuple[MappedRamHeader, int]:
    """A header for a block of ``used_length`` bytes laid out as QEMU lays it out, and the
    smallest file size that holds it."""
    schema = mapped_ram_schema(version)
    bitmap_offset = draw(st.integers(0, 1 << 30))
    size = schema.bitmap_size(used_length, MULTIFD_PAGE)
    pages_offset = schema.pages_offset_for(bitmap_offset, size)
    header = MappedRamHeader(schema.spec.version, MULTIFD_PAGE, bitmap_offset, pages_offset)
    return header, pages_offset + used_length


@dataclass(frozen=True)
class InvalidMultifd:
    """A channel with one defect: the error must name ``what`` and ``field`` at ``offset``."""

    data: bytes
    what: str
    field: str
    offset: int


# (field, byte position in the fixed part, width, how to spoil the value)
_PACKET_DEFECTS = ("magic", "version", "flags", "pages_alloc", "normal_pages", "zero_pages")


@st.composite
def invalid_multifd_channels(draw: Any, version: str | None = None) -> InvalidMultifd:
    """A valid handshake and packets, then one packet or the handshake spoilt in one field:
    magic, version, unknown flag bits, a count beyond what a packet holds (2**32-1 included),
    a wrong handshake magic or version."""
    schema = multifd_schema(version)
    spec = schema.spec
    channel = draw(multifd_channels(version, max_packets=2))
    data = bytearray(channel.data)
    fields = [f for f in _PACKET_DEFECTS if f != "zero_pages" or spec.zero_pages == "packet"]
    target = draw(st.sampled_from(["init.magic", "init.version", *fields]))
    if target.startswith("init."):
        name = target.removeprefix("init.")
        at = 0 if name == "magic" else 4
        good = spec.magic if name == "magic" else spec.version
        value = draw(st.integers(0, 2**32 - 1).filter(lambda v: v != good))
        data[at : at + 4] = value.to_bytes(4, "big")
        return InvalidMultifd(bytes(data), "MULTIFD_INIT", name, at)
    start = schema.init_size + sum(len(p.data) for p in channel.packets)
    header = MultifdPacketHeader(0, 0, 0, 0, len(channel.packets), 0, "")
    packet = bytearray(schema.build_packet(header, []))
    at = {"magic": 0, "version": 4, "flags": 8, "pages_alloc": 12, "normal_pages": 16}.get(
        target, 32
    )
    page_count = spec.packet_size // MULTIFD_PAGE
    if target == "magic":
        value = draw(st.integers(0, 2**32 - 1).filter(lambda v: v != spec.magic))
    elif target == "version":
        value = draw(st.integers(0, 2**32 - 1).filter(lambda v: v != spec.version))
    elif target == "flags":
        unknown = ~spec.known_flags & (2**32 - 1)
        value = draw(st.integers(1, 2**32 - 1).filter(lambda v: bool(v & unknown)))
    elif target == "pages_alloc":
        value = draw(st.integers(page_count + 1, 2**32 - 1))
    else:  # normal or zero pages beyond pages_alloc (0 here)
        value = draw(st.integers(1, 2**32 - 1))
    packet[at : at + 4] = value.to_bytes(4, "big")
    return InvalidMultifd(bytes(data + packet), "MULTIFD_PACKET", target, start + at)


@dataclass(frozen=True)
class MappedRamFileBytes:
    """A mapped-ram file and the blocks (with their present pages) it holds."""

    blocks: tuple[BlockContent, ...]
    data: bytes


@st.composite
def mapped_ram_files(
    draw: Any, version: str | None = None, *, max_blocks: int = 3, max_pages: int = 64
) -> MappedRamFileBytes:
    """A whole mapped-ram file as QEMU lays it out (each block's page area is a MiB or more:
    keep the counts small)."""
    count = draw(st.integers(1, max_blocks))
    block_names = draw(st.lists(names(), min_size=count, max_size=count, unique=True))
    blocks = []
    for name in block_names:
        pages = draw(st.integers(1, max_pages))
        present = draw(st.sets(st.integers(0, pages - 1), max_size=8))
        contents = {index: draw(st.binary(min_size=1, max_size=8)) for index in present}
        padded = {index: (raw * MULTIFD_PAGE)[:MULTIFD_PAGE] for index, raw in contents.items()}
        blocks.append(BlockContent(name, pages * MULTIFD_PAGE, padded))
    return MappedRamFileBytes(tuple(blocks), build_mapped_ram_file(version, blocks))
