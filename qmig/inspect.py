"""Inspecting a recorded migration: every record of the stream and its return path, counted.

:class:`StreamInspection` consumes :class:`~qmig.wire.reader.Record` values and keeps the
figures ``qmig inspect`` prints: occurrences of every section type and command (those inside
PACKAGED included), per-RAMBlock page counts, and, with an extract directory, each block's
final contents written as the pages go by. Memory is bounded by the RAMBlock sizes'
bitmaps, never by the stream's size.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from qmig.wire import messages as m
from qmig.wire.ramscan import RamScanner
from qmig.wire.reader import END, NEED_DATA, Record, ReturnPathReader, StreamReader

CHUNK = 4 << 20
PAGE_DATA, PAGE_SAME_BYTE = 1, 2

COMMAND_TYPES = tuple(cls for cls in m.COMMANDS)
SECTION_TYPES = (m.SectionStart, m.SectionPart, m.SectionEnd, m.SectionFull, m.SectionFooter)


@dataclass
class BlockFigures:
    """Page counts of one RAMBlock; ``state`` holds each target page's last record kind."""

    idstr: str
    used_length: int | None
    page_size: int
    state: bytearray = field(default_factory=bytearray, repr=False)
    page_records: int = 0
    zero_records: int = 0
    image_fd: int = -1

    def ensure_pages(self, pages: int) -> None:
        if len(self.state) < pages:
            self.state.extend(bytes(pages - len(self.state)))

    def as_json(self) -> dict[str, Any]:
        distinct = len(self.state) - self.state.count(0)
        return {
            "used_length": self.used_length,
            "page_records": self.page_records,
            "zero_records": self.zero_records,
            "distinct_pages": distinct,
            "zero_pages": self.state.count(PAGE_SAME_BYTE),
        }


def _image_name(idstr: str) -> str:
    return idstr.replace("/", "_") + ".bin"


class StreamInspection:
    """Figures for one source-to-destination stream."""

    def __init__(self, reader: StreamReader, extract_dir: Path | None = None) -> None:
        self.reader = reader
        self.scanner = RamScanner(reader.schema)
        self.extract_dir = extract_dir
        self.counts: Counter[str] = Counter()
        self.blocks: dict[str, BlockFigures] = {}
        self.devices: list[dict[str, Any]] = []
        self.bytes = 0
        if extract_dir is not None:
            extract_dir.mkdir(parents=True, exist_ok=True)

    def add(self, record: Record) -> None:
        message = record.message
        self.bytes = record.offset + record.size
        if isinstance(message, m.RamPageRun):
            self._add_pages(message)
            return
        if isinstance(message, COMMAND_TYPES):
            self.counts["COMMAND"] += 1
        if not isinstance(message, m.PackageEnd | m.RamEos | m.RamHook | m.RamMultifdFlush):
            self.counts[message.NAME] += 1
        if isinstance(message, m.MemSize):
            for info in message.blocks:
                self._block(info.idstr, info.used_length)
        elif isinstance(message, m.DeviceState):
            self.devices.append(
                {
                    "idstr": message.idstr,
                    "instance_id": message.instance_id,
                    "offset": record.offset,
                    "size": record.size,
                    "state": message.decoded,
                }
            )

    def _block(self, idstr: str, used_length: int | None) -> BlockFigures:
        figures = self.blocks.get(idstr)
        page = self.reader.schema.target_page_size
        if figures is None:
            figures = BlockFigures(idstr, used_length, page)
            self.blocks[idstr] = figures
            if self.extract_dir is not None:
                path = self.extract_dir / _image_name(idstr)
                figures.image_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        if used_length is not None:
            figures.used_length = used_length
            figures.ensure_pages(-(-used_length // page))
            if figures.image_fd >= 0:
                os.ftruncate(figures.image_fd, used_length)
        return figures

    def _add_pages(self, run: m.RamPageRun) -> None:
        figures = self.blocks.get(run.block) or self._block(run.block, None)
        if figures.used_length is None:
            highest = max(run.headers) // run.target_page_size + 1
            figures.ensure_pages(highest)
        figures.page_records += run.count
        figures.zero_records += run.zero_count
        self.counts["RAM"] += run.count
        self.scanner.account(
            run.data, run.data_base, run.headers, run.bodies, figures.state, figures.image_fd
        )

    def close(self) -> None:
        for figures in self.blocks.values():
            if figures.image_fd >= 0:
                os.close(figures.image_fd)
                figures.image_fd = -1
        if self.extract_dir is not None:
            (self.extract_dir / "devices.json").write_text(json.dumps(self.devices, indent=1))

    def as_json(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "counts": dict(sorted(self.counts.items())),
            "ram_blocks": {idstr: b.as_json() for idstr, b in self.blocks.items()},
        }


@dataclass
class ReturnPathInspection:
    counts: Counter[str] = field(default_factory=Counter)
    bytes: int = 0

    def add(self, record: Record) -> None:
        self.counts[record.name] += 1
        self.bytes = record.offset + record.size

    def as_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "counts": dict(sorted(self.counts.items()))}


def read_records(
    file: BinaryIO,
    reader: StreamReader | ReturnPathReader,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Record]:
    """Every record of ``file``, read in chunks so that memory stays bounded."""
    while True:
        count = cast(Any, file).readinto(reader.get_buffer(CHUNK)) or 0
        reader.commit(count)
        if not count:
            reader.feed_eof()
        while True:
            record = reader.next_record()
            if record is NEED_DATA:
                break
            if record is END:
                return
            assert isinstance(record, Record)
            yield record
        if progress is not None:
            progress(count)
        if not count:
            return
