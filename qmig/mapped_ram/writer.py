"""A small mapped-ram file as QEMU lays one out: for tests and fuzzing of the readers.

The stream part is header, CONFIGURATION (with the mapped-ram capability), the ``ram``
SECTION_START with its MEM_SIZE list (each entry followed by its MappedRamHeader, the stream
resuming after the block's page area), EOS, a footer, a SECTION_END with EOS, and EOF; pages sit
at ``pages_offset + offset`` and the bitmaps mark them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmig.wire import messages as m
from qmig.wire.mapped_ram import MappedRamHeader, mapped_ram_schema
from qmig.wire.schema import schema_for


@dataclass(frozen=True)
class BlockContent:
    """A block and the pages present in the file (page index -> contents)."""

    name: str
    used_length: int
    pages: dict[int, bytes] = field(default_factory=dict)


def build_mapped_ram_file(version: str | None, blocks: list[BlockContent]) -> bytes:
    schema = schema_for(version)
    layout = mapped_ram_schema(version)
    page = schema.target_page_size
    flags = schema.profile.ram_flags
    out = bytearray(schema.header.build(m.StreamHeader(schema.profile.stream_version)))
    out += schema.configuration.build(
        m.Configuration("pc-i440fx-10.0", capabilities=("mapped-ram",))
    )
    out += schema.build_section(m.SectionStart(1, "ram", 0, schema.profile.ram_section_version))
    total = sum(block.used_length for block in blocks)
    out += (total | flags["MEM_SIZE"]).to_bytes(8, "big")
    for block in blocks:
        name = block.name.encode("latin-1")
        out += bytes([len(name)]) + name + block.used_length.to_bytes(8, "big")
        bitmap_offset = len(out) + layout.header_size
        size = layout.bitmap_size(block.used_length, page)
        pages_offset = layout.pages_offset_for(bitmap_offset, size)
        out += layout.build_header(MappedRamHeader(1, page, bitmap_offset, pages_offset))
        out += bytes(pages_offset + block.used_length - len(out))
        bitmap = layout.build_bitmap(set(block.pages), block.used_length // page)
        out[bitmap_offset : bitmap_offset + size] = bitmap
        for index, content in block.pages.items():
            at = pages_offset + index * page
            out[at : at + page] = content
    out += schema.build_ram_flag("EOS")
    out += schema.build_footer(1)
    out += schema.build_section(m.SectionEnd(1))
    out += schema.build_ram_flag("EOS")
    out += schema.build_footer(1)
    out += schema.eof.build(m.Eof())
    return bytes(out)
