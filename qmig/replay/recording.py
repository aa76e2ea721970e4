"""Rebuild a captured migration's end state: guest RAM as at switchover, and the device state.

The stream is read once, in chunks, with qmig's reader. Every page record overwrites its page,
so what is left is each page's last copy: the one the destination needed, postcopy pages
included. Device sections are kept as their raw payload bytes (from PACKAGED in a postcopy
stream, or delimited by the trailing VMDESCRIPTION in a precopy one) with their section
headers, and the CONFIGURATION and VMDESCRIPTION as parsed, so that a replay sends them
byte for byte as the captured source did.

A capture says nothing explicit about precopy passes; a pass is QEMU's sweep over the dirty
bitmap in block and offset order, so a page record at or before the previous one (in that
order) starts a new pass. The discard ranges say what the captured source still had to send,
or send again, when it switched.
"""

from __future__ import annotations

import io
import lzma
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from qmig.capture.connections import (
    NewConnection,
    preempt_boundaries,
    split_at,
    stream_boundaries,
)
from qmig.capture.recording import PREEMPT_NAME, capture_file
from qmig.errors import MalformedError, QmigError
from qmig.protocol.source import DeviceSnapshot, SourceBlock
from qmig.replay.multifd_channels import MultifdMerge, multifd_files
from qmig.wire import messages as m
from qmig.wire.reader import Record, StreamReader
from qmig.wire.reading.preempt import PreemptReader

READ_CHUNK = 1 << 20
STREAM_NAMES = ("stream.bin", "stream.bin.xz")


@dataclass
class RecordedBlock:
    idstr: str
    used_length: int
    page_size: int
    memory: mmap.mmap = field(repr=False)


@dataclass
class Recording:
    """What a replay needs from a capture."""

    path: Path
    configuration: m.Configuration
    blocks: list[RecordedBlock]
    devices: list[DeviceSnapshot]
    postcopy_ram: bool  # the captured source advised RAM postcopy
    return_path: bool
    switched: bool  # the captured source switched to postcopy
    passes_before_switch: int  # precopy passes begun before the switch (or in all)
    discards: dict[str, list[tuple[int, int]]]  # block -> (start, length) in bytes
    vmdescription: bytes | None
    stream_bytes: int
    pages: int  # page records read, all passes

    @property
    def machine_type(self) -> str:
        return self.configuration.machine_type

    @property
    def ram_mib(self) -> float:
        """The size of ``pc.ram`` (or of the largest block) in MiB: QEMU's ``-m``."""
        main = next((b for b in self.blocks if b.idstr == "pc.ram"), None)
        if main is None:
            main = max(self.blocks, key=lambda block: block.used_length)
        return main.used_length / (1 << 20)

    def source_blocks(self) -> list[SourceBlock]:
        return [
            SourceBlock(block.idstr, block.used_length, block.memory, block.page_size)
            for block in self.blocks
        ]

    def close(self) -> None:
        for block in self.blocks:
            block.memory.close()


def stream_path(capture: Path) -> Path:
    """The source→destination stream of a capture folder, or ``capture`` itself if a file."""
    if capture.is_dir():
        for name in STREAM_NAMES:
            if (capture / name).is_file():
                return capture / name
        raise QmigError(str(capture), "not a capture folder: no stream.bin or stream.bin.xz")
    if not capture.exists():
        raise QmigError(str(capture), "no such file or folder")
    return capture


def _chunks(path: Path) -> Iterator[bytes]:
    # Fixtures are stored xz-compressed: replay them without unpacking first.
    with _open(path) as file:
        while chunk := file.read(READ_CHUNK):
            yield chunk


def _open(path: Path) -> io.BufferedIOBase:
    from qmig.libvirt.detect import is_save_image

    if is_save_image(path):  # the QEMU stream inside a libvirt save image
        from qmig.libvirt.streams import open_save_image

        return cast(io.BufferedIOBase, open_save_image(path))
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    return path.open("rb")


class _Rebuilder:
    def __init__(self, path: Path, version: str | None) -> None:
        self.path = path
        self.reader = StreamReader(version)
        self.target_page = self.reader.schema.target_page_size
        self.configuration: m.Configuration | None = None
        self.blocks: dict[str, RecordedBlock] = {}
        self.order: dict[str, int] = {}
        self.devices: list[DeviceSnapshot] = []
        self.section: m.SectionFull | m.SectionStart | None = None
        self.postcopy_ram = False
        self.return_path = False
        self.switched = False
        self.passes = 0
        self.last_position: tuple[int, int] | None = None
        self.discards: dict[str, list[tuple[int, int]]] = {}
        self.vmdescription: bytes | None = None
        self.pages = 0
        # A multifd capture's channels: the main channel's pages are dated by sync point
        # as they are read, the channels' laid over them at the end.
        self.multifd: MultifdMerge | None = None
        if path.name in STREAM_NAMES and (files := multifd_files(path.parent)):
            self.multifd = MultifdMerge(files, version)

    def run(self) -> Recording:
        reader = self.reader
        try:
            # A recovered migration's capture holds several connections, one after another:
            # the reader starts over where each begins, as the destination did.
            boundaries = (
                stream_boundaries(self.path.parent) if self.path.name in STREAM_NAMES else []
            )
            for piece in split_at(self.chunks(), boundaries):
                if isinstance(piece, NewConnection):
                    reader.new_channel(piece.offset)
                    continue
                reader.feed(piece)
                self._drain()
            reader.feed_eof()
            self._drain()
            self._preempt_channel()
            if self.multifd is not None:
                memories = {b.idstr: (b.memory, b.used_length) for b in self.blocks.values()}
                self.multifd.apply(memories, self.target_page)
        except lzma.LZMAError as error:
            raise QmigError(str(self.path), f"cannot decompress: {error}") from None
        except BaseException:
            for block in self.blocks.values():
                block.memory.close()
            raise
        if self.configuration is None or not self.blocks:
            raise MalformedError(
                "stream", "no CONFIGURATION or no RAM blocks: nothing to replay", reader.offset
            )
        return Recording(
            path=self.path,
            configuration=self.configuration,
            blocks=list(self.blocks.values()),
            devices=self.devices,
            postcopy_ram=self.postcopy_ram,
            return_path=self.return_path,
            switched=self.switched,
            passes_before_switch=max(self.passes, 1),
            discards=self.discards,
            vmdescription=self.vmdescription,
            stream_bytes=reader.offset,
            pages=self.pages,
        )

    def chunks(self) -> Iterator[bytes]:
        return _chunks(self.path)

    def _preempt_channel(self) -> None:
        """A postcopy-preempt capture's requested pages came on their own channel: they
        are the final copy of their pages (postcopy sends a page once), so they go over
        whatever the main stream left there."""
        if self.path.name not in STREAM_NAMES:
            return
        path = capture_file(self.path.parent, PREEMPT_NAME)
        if path is None:
            return
        reader = PreemptReader(self.reader)
        for piece in split_at(_chunks(path), preempt_boundaries(self.path.parent)):
            if isinstance(piece, NewConnection):
                reader.new_channel(piece.offset)
                continue
            reader.feed(piece)
            self._drain_preempt(reader)
        reader.feed_eof()
        self._drain_preempt(reader)

    def _drain_preempt(self, reader: PreemptReader) -> None:
        for record in reader:
            if isinstance(record.message, m.RamPageRun):
                self._pages(record.message)

    def _drain(self) -> None:
        for record in self.reader:
            self._take(record)

    def _take(self, record: Record) -> None:
        message = record.message
        match message:
            case m.Configuration():
                self.configuration = message
            case m.OpenReturnPath():
                self.return_path = True
            case m.PostcopyAdvise():
                self.postcopy_ram = message.ram_postcopy
            case m.MemSize():
                self._map(message, record)
            case m.RamPageRun():
                self._pages(message)
            case m.PostcopyRamDiscard():
                self.switched = True
                spans = self.discards.setdefault(message.block, [])
                spans.extend((span.start, span.length) for span in message.ranges)
            case m.PostcopyListen():
                self.switched = True
            case m.SectionFull() | m.SectionStart():
                if message.idstr != "ram":
                    self.section = message
            case m.DeviceState():
                self._device(message, record)
            case m.VmDescription():
                self.vmdescription = message.json
            case m.RamEos() if self.multifd is not None:
                self.multifd.main_eos()
            case m.RamMultifdFlush() if self.multifd is not None:
                self.multifd.main_flush()

    def _map(self, message: m.MemSize, record: Record) -> None:
        if self.blocks:
            raise MalformedError("MEM_SIZE", "RAM blocks announced twice", record.offset)
        for index, info in enumerate(message.blocks):
            page_size = info.page_size or self.target_page
            size = -(-info.used_length // page_size) * page_size
            memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.blocks[info.idstr] = RecordedBlock(info.idstr, info.used_length, page_size, memory)
            self.order[info.idstr] = index
        if self.multifd is not None:
            lengths = {info.idstr: info.used_length for info in message.blocks}
            self.multifd.blocks(lengths, self.target_page)

    def _pages(self, run: m.RamPageRun) -> None:
        block = self.blocks[run.block]  # the reader already checked the name
        memory = block.memory
        data, base = run.data, run.data_base
        mask = run.target_page_size - 1
        size = run.target_page_size
        flag = run.page_flag
        for header, body in zip(run.headers, run.bodies, strict=True):
            offset = header & ~mask
            at = body - base
            if header & flag:
                memory[offset : offset + size] = data[at : at + size]
            else:
                memory[offset : offset + size] = bytes([data[at]]) * size
        self.pages += len(run.headers)
        if self.multifd is not None:
            self.multifd.main_pages(run.block, (header // size for header in run.headers))
        if not self.switched and run.headers:
            first = (self.order[run.block], run.headers[0] & ~mask)
            if self.last_position is None or first <= self.last_position:
                self.passes += 1
            self.last_position = (self.order[run.block], run.headers[-1] & ~mask)

    def _device(self, message: m.DeviceState, record: Record) -> None:
        section = self.section
        if section is None or section.idstr != message.idstr:
            raise MalformedError(
                "SECTION_FULL", f"device state of {message.idstr!r} without its header",
                record.offset,
            )  # fmt: skip
        self.devices.append(
            DeviceSnapshot(
                message.idstr,
                message.instance_id,
                section.version_id,
                bytes(message.data),
                section.section_id,
            )
        )


def load_recording(capture: Path, version: str | None = None) -> Recording:
    """Read a capture folder (``stream.bin`` or ``stream.bin.xz``) or a raw stream file."""
    path = stream_path(capture)
    from qmig.mapped_ram.recording import is_mapped_ram, load_mapped_ram

    if is_mapped_ram(path, version):  # its RAM is in pages and bitmaps, not records
        return load_mapped_ram(path, version)
    return _Rebuilder(path, version).run()
