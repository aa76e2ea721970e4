"""A mapped-ram file: where each block's header, bitmap and pages are, and the stream around them.

The file is an ordinary stream with holes: the MEM_SIZE list's entries are each followed by a
MappedRamHeader, and the stream resumes after the block's page area. :class:`MappedRamFile`
finds the list with :class:`~qmig.wire.reader.StreamReader` (everything up to the ``ram``
SECTION_START is ordinary), reads the entries and headers, checks each header against the
file, and offers the stream part without the headers and page areas (:meth:`stream`), whose
offsets :meth:`real_offset` maps back to the file's.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

from qmig.errors import MalformedError, QmigError, TruncatedError
from qmig.wire import messages as m
from qmig.wire.mapped_ram import WHAT, BlockLayout, mapped_ram_schema
from qmig.wire.reader import END, NEED_DATA, Record, StreamReader
from qmig.wire.schema import schema_for

CAPABILITY = "mapped-ram"
SCAN_CHUNK = 1 << 16
MAX_BLOCKS = 4096
COPY_CHUNK = 1 << 20  # bytes copied per read when extracting pages


@dataclass(frozen=True)
class Segment:
    """``size`` bytes of the stream part at ``virtual`` are the file's bytes at ``real``."""

    virtual: int
    real: int
    size: int


@dataclass(frozen=True)
class MappedBlock:
    layout: BlockLayout
    entry_offset: int  # where the MEM_SIZE entry (its name's length byte) is in the file
    header_offset: int  # where its MappedRamHeader is


class MappedRamFile:
    """An open mapped-ram file, its layout read and checked."""

    def __init__(self, path: Path, version: str | None = None) -> None:
        self.path = path
        self.version = version
        self.schema = schema_for(version)
        self.layout_schema = mapped_ram_schema(version)
        self.page_size = self.schema.target_page_size
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            self.configuration, self.mem_size_offset = self._find_mem_size()
            self.total, self.blocks = self._read_blocks()
            self.segments = self._segments()
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MappedRamFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- layout ----------------------------------------------------------------------------

    def _find_mem_size(self) -> tuple[m.Configuration, int]:
        reader = StreamReader(self.version, schema=self.schema)
        configuration = None
        position = 0
        while True:
            chunk = os.pread(self._fd, SCAN_CHUNK, position)
            position += len(chunk)
            if chunk:
                reader.feed(chunk)
            else:
                reader.feed_eof()
            while (record := reader.next_record()) is not NEED_DATA and record is not END:
                assert isinstance(record, Record)
                if isinstance(record.message, m.Configuration):
                    configuration = record.message
                if isinstance(record.message, m.SectionStart) and record.message.idstr == "ram":
                    if configuration is None or CAPABILITY not in (
                        configuration.capabilities or ()
                    ):
                        raise QmigError(str(self.path), "not a mapped-ram file")
                    return configuration, record.offset + record.size
            if record is END or not chunk:
                raise MalformedError(WHAT, "no ram section in the file", reader.offset)

    def _pread(self, size: int, offset: int, what: str) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) < size:
            raise TruncatedError(what, offset)
        return data

    def _read_blocks(self) -> tuple[int, list[MappedBlock]]:
        at = self.mem_size_offset
        head = int.from_bytes(self._pread(8, at, "MEM_SIZE"), "big")
        flags = head & self.schema.flag_mask
        if flags != self.schema.profile.ram_flags["MEM_SIZE"]:
            raise MalformedError("MEM_SIZE", f"flags {flags:#x} where MEM_SIZE opens RAM", at)
        total = head & ~self.schema.flag_mask
        mr_addr = "x-ignore-shared" in (self.configuration.capabilities or ())
        blocks: list[MappedBlock] = []
        seen = 0
        at += 8
        while seen < total:
            if len(blocks) == MAX_BLOCKS:
                raise MalformedError("MEM_SIZE", f"more than {MAX_BLOCKS} blocks", at)
            entry = at
            length = self._pread(1, at, "MEM_SIZE")[0]
            if not length:
                raise MalformedError("MEM_SIZE", "empty RAMBlock name", at)
            name = self._pread(length, at + 1, "MEM_SIZE").decode("latin-1")
            at += 1 + length
            used = int.from_bytes(self._pread(8, at, "MEM_SIZE"), "big")
            at += 16 if mr_addr else 8
            if used > total - seen:
                raise MalformedError(
                    "MEM_SIZE",
                    f"block {name!r} of {used:#x} bytes overruns the total {total:#x}",
                    at - 8,
                )
            raw = self._pread(self.layout_schema.header_size, at, WHAT)
            header = self.layout_schema.parse_header(raw, at)
            layout = self.layout_schema.layout(name, used, header, self.size, at, self.page_size)
            blocks.append(MappedBlock(layout, entry, at))
            seen += used
            at = layout.stream_resumes_at
        return total, blocks

    def _segments(self) -> list[Segment]:
        segments: list[Segment] = []
        real = virtual = 0
        for block in self.blocks:
            size = block.header_offset - real
            segments.append(Segment(virtual, real, size))
            virtual += size
            real = block.layout.stream_resumes_at
        segments.append(Segment(virtual, real, self.size - real))
        return segments

    def real_offset(self, virtual: int) -> int:
        """The file offset of the stream part's byte ``virtual``."""
        index = bisect.bisect_right([s.virtual for s in self.segments], virtual) - 1
        segment = self.segments[max(index, 0)]
        return segment.real + virtual - segment.virtual

    def stream(self) -> BinaryIO:
        return cast(BinaryIO, StreamPart(self._fd, self.segments))

    # --- RAM -------------------------------------------------------------------------------

    def bitmap(self, block: MappedBlock) -> bytes:
        layout = block.layout
        return self._pread(layout.bitmap_size, layout.header.bitmap_offset, WHAT)

    def page_runs(self, block: MappedBlock) -> Iterator[tuple[int, int]]:
        """(first page, count) of the pages the bitmap marks present."""
        if block.layout.ignored:
            return iter(())
        return self.layout_schema.page_runs_in(self._bitmap_chunks(block), block.layout.pages)

    def _bitmap_chunks(self, block: MappedBlock) -> Iterator[bytes]:
        layout = block.layout
        step = COPY_CHUNK - COPY_CHUNK % self.layout_schema.spec.bitmap_word
        for at in range(0, layout.bitmap_size, step):
            size = min(step, layout.bitmap_size - at)
            yield self._pread(size, layout.header.bitmap_offset + at, WHAT)

    def read_pages(self, block: MappedBlock, first: int, count: int) -> Iterator[bytes]:
        """The pages [first, first + count) of a block, in chunks of at most COPY_CHUNK."""
        page = block.layout.header.page_size
        start = block.layout.header.pages_offset + first * page
        end = start + count * page
        while start < end:
            size = min(COPY_CHUNK, end - start)
            yield self._pread(size, start, WHAT)
            start += size

    def dump(self, block: MappedBlock, target: Path) -> int:
        """Write the block's contents to ``target`` (sparse: absent pages stay holes, which
        read as the zero pages they stand for); returns the pages written."""
        page = block.layout.header.page_size
        written = 0
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, block.layout.used_length)
            for first, count in self.page_runs(block):
                position = first * page
                for chunk in self.read_pages(block, first, count):
                    os.pwrite(fd, chunk, position)
                    position += len(chunk)
                written += count
        finally:
            os.close(fd)
        return written


class StreamPart:
    """The stream part of a mapped-ram file as a readable file (``readinto``), without the
    headers and page areas: what :func:`qmig.inspect.read_records` and replay consume."""

    def __init__(self, fd: int, segments: list[Segment]) -> None:
        self._fd = fd
        self._segments = segments
        self._position = 0
        self.size = sum(s.size for s in segments)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        for segment in self._segments:
            if done == len(view):
                break
            end = segment.virtual + segment.size
            if self._position >= end or self._position < segment.virtual:
                continue
            skip = self._position - segment.virtual
            want = min(len(view) - done, segment.size - skip)
            got = os.preadv(self._fd, [view[done : done + want]], segment.real + skip)
            done += got
            self._position += got
            if got < want:
                break
        return done

    def read(self, size: int = -1) -> bytes:
        size = self.size - self._position if size < 0 else size
        buffer = bytearray(max(0, min(size, self.size - self._position)))
        count = self.readinto(buffer)
        return bytes(buffer[:count])

    def close(self) -> None:
        pass  # the MappedRamFile owns the descriptor

    def __enter__(self) -> StreamPart:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
