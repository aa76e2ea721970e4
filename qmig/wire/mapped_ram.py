"""The mapped-ram file layout (QEMU 9.0+, ``file:`` migrations with the mapped-ram capability).

After each block's used length in the MEM_SIZE list comes a MappedRamHeader (version, page
size, bitmap offset, pages offset). The block's pages sit at ``pages_offset + page offset``
without record headers, and the stream goes on at ``pages_offset + used_length``. The bitmap
(host unsigned longs, one bit per page present; zero pages are left out) is written at
``bitmap_offset`` when the migration completes. Numbers come from the profile's
``[mapped_ram]`` table.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import construct as cs

from qmig.errors import MalformedError, QmigError
from qmig.wire.multifd_profile import MappedRamSpec
from qmig.wire.profiles import Profile, load_profile

WHAT = "MAPPED_RAM"


@dataclass(frozen=True)
class MappedRamHeader:
    """One block's header, as read from (or to be written to) the MEM_SIZE list."""

    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int


@dataclass(frozen=True)
class BlockLayout:
    """Where one block lives in the file, checked against the file's size."""

    name: str
    used_length: int
    header: MappedRamHeader
    bitmap_size: int
    stream_resumes_at: int  # where the stream goes on after this block's header
    # A block the source does not migrate (x-ignore-shared): both offsets 0, no page area,
    # the stream goes on right after the header.
    ignored: bool = False

    @property
    def pages(self) -> int:
        return 0 if self.ignored else self.used_length // self.header.page_size


class MappedRamSchema:
    """The header schema and layout rules of one profile's ``[mapped_ram]`` table."""

    def __init__(self, profile: Profile) -> None:
        if profile.mapped_ram is None:
            raise QmigError("--qemu-version", f"QEMU {profile.name} has no mapped-ram format")
        self.profile = profile
        self.spec: MappedRamSpec = profile.mapped_ram
        self.header = cs.Struct(
            "version" / cs.Int32ub,
            "page_size" / cs.Int64ub,
            "bitmap_offset" / cs.Int64ub,
            "pages_offset" / cs.Int64ub,
        )
        self.header_size: int = self.header.sizeof()

    def build_header(self, header: MappedRamHeader) -> bytes:
        return bytes(self.header.build(vars(header)))

    def parse_header(self, data: bytes | bytearray | memoryview, offset: int) -> MappedRamHeader:
        if len(data) < self.header_size:
            raise MalformedError(WHAT, "header runs past the end of the file", offset)
        fields = self.header.parse(bytes(data[: self.header_size]))
        # QEMU refuses a newer header version and reads older ones.
        if fields.version > self.spec.version:
            raise MalformedError(
                WHAT, f"version: {fields.version} is newer than {self.spec.version}", offset
            )
        return MappedRamHeader(
            fields.version, fields.page_size, fields.bitmap_offset, fields.pages_offset
        )

    def bitmap_size(self, used_length: int, page_size: int) -> int:
        """BITS_TO_LONGS(pages) * sizeof(unsigned long)."""
        bits = self.spec.bitmap_word * 8
        pages = used_length // page_size
        return (pages + bits - 1) // bits * self.spec.bitmap_word

    def layout(
        self,
        name: str,
        used_length: int,
        header: MappedRamHeader,
        file_size: int,
        offset: int,
        target_page_size: int,
    ) -> BlockLayout:
        """Check one block's header against the file: ``offset`` is where the header starts
        (the error names the field)."""
        at = offset + 4
        if header.page_size != target_page_size:
            raise MalformedError(
                WHAT,
                f"page_size: {header.page_size} is not the target page size "
                f"{target_page_size} (block {name!r})",
                at,
            )
        if used_length % header.page_size:
            raise MalformedError(
                WHAT, f"block {name!r}: used length {used_length:#x} is not whole pages", offset
            )
        if header.bitmap_offset == 0 and header.pages_offset == 0:
            return BlockLayout(name, used_length, header, 0, offset + self.header_size, True)
        size = self.bitmap_size(used_length, header.page_size)
        if header.bitmap_offset + size > file_size:
            raise MalformedError(
                WHAT,
                f"bitmap_offset: {header.bitmap_offset:#x} + {size} bitmap bytes is past the "
                f"end of the {file_size}-byte file (block {name!r})",
                at + 8,
            )
        if header.pages_offset + used_length > file_size:
            raise MalformedError(
                WHAT,
                f"pages_offset: {header.pages_offset:#x} + {used_length:#x} is past the end "
                f"of the {file_size}-byte file (block {name!r})",
                at + 16,
            )
        return BlockLayout(name, used_length, header, size, header.pages_offset + used_length)

    def page_runs(self, bitmap: bytes, pages: int) -> Iterator[tuple[int, int]]:
        """(first page, count) of each run of pages the bitmap marks present."""
        return self.page_runs_in([bitmap], pages)

    def page_runs_in(self, chunks: Iterable[bytes], pages: int) -> Iterator[tuple[int, int]]:
        """The same, the bitmap read in pieces (each a whole number of words): a block's
        bitmap need not be in memory at once."""
        word = self.spec.bitmap_word
        order = self.spec.bitmap_byte_order
        bits = word * 8
        full = (1 << bits) - 1
        start = -1
        base = 0
        for chunk in chunks:
            for w in range(0, len(chunk), word):
                value = int.from_bytes(chunk[w : w + word], order)
                if (value == 0 and start < 0) or (value == full and start >= 0):
                    base += bits
                    continue
                for bit in range(bits):
                    page = base + bit
                    if page >= pages:
                        break
                    if value >> bit & 1:
                        if start < 0:
                            start = page
                    elif start >= 0:
                        yield start, page - start
                        start = -1
                base += bits
        if start >= 0:
            yield start, min(base, pages) - start

    def build_bitmap(self, present: set[int] | list[int], pages: int) -> bytes:
        """The bitmap QEMU writes for ``present`` pages of a ``pages``-page block."""
        word = self.spec.bitmap_word
        bits = word * 8
        words = [0] * ((pages + bits - 1) // bits)
        for page in present:
            if not 0 <= page < pages:
                raise QmigError(WHAT, f"page {page} is outside a {pages}-page block")
            words[page // bits] |= 1 << (page % bits)
        return b"".join(w.to_bytes(word, self.spec.bitmap_byte_order) for w in words)

    def pages_offset_for(self, bitmap_offset: int, bitmap_size: int) -> int:
        """Where QEMU puts a block's pages: past the bitmap, rounded up to the alignment."""
        align = self.spec.file_offset_alignment
        return (bitmap_offset + bitmap_size + align - 1) // align * align


@functools.cache
def mapped_ram_schema(version: str | None = None) -> MappedRamSchema:
    return MappedRamSchema(load_profile(version))
