"""A capture's multifd channels, for ``qmig inspect DIR``: every channel read to its end, on the
relay's timeline with the main stream's sync points.

Each ``multifd-<K>.bin`` (formats/capture.md) is walked packet by packet: its handshake, then
each packet's header (pages, zero pages, SYNC), checked with the blocks the main stream's
MEM_SIZE announced, so an offset outside a block is an error as on a destination. Payloads
are skipped, not read: a compressed packet's pages are counted, not decoded.
The index must tile each channel's file, and the packets must account for every byte of it.

The main stream's sync points (its EOS or MULTIFD_FLUSH records, by the rule of
:mod:`qmig.protocol.multifd`) are counted as the listing reads it; a channel whose SYNC
packets do not match them in number is reported, not refused (a capture may end early).
"""

from __future__ import annotations

import contextlib
import functools
import io
import operator
import os
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qmig.capture.recording import Chunk, Direction, open_capture_file
from qmig.errors import MalformedError, QmigError, TruncatedError
from qmig.inspect import Timeline
from qmig.protocol.multifd import MultifdSyncRule
from qmig.wire import messages as m
from qmig.wire.multifd import (
    WHAT_INIT,
    WHAT_PACKET,
    MultifdInit,
    MultifdPacketHeader,
    multifd_schema,
)
from qmig.wire.profiles import load_profile
from qmig.wire.reader import Record

CHUNK = 1 << 20
INDEX_NAME = "index.tsv"


@dataclass
class TimelineEvent:
    """One line of the merged timeline: where, when, what."""

    t_ns: int
    where: str  # "stream" or "multifd-<K>"
    offset: int
    size: int
    name: str
    detail: str

    def as_json(self) -> dict[str, Any]:
        return vars(self).copy()


@dataclass
class ChannelInspection:
    direction: str
    file: str
    id: int | None = None
    bytes: int = 0
    packets: int = 0
    pages: int = 0
    zero_pages: int = 0
    syncs: int = 0
    compression: set[str] = field(default_factory=set)
    sync_t_ns: list[int] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "file": self.file,
            "id": self.id,
            "bytes": self.bytes,
            "packets": self.packets,
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "syncs": self.syncs,
            "sync_t_ns": self.sync_t_ns,
            "compression": sorted(self.compression),
        }


class MultifdInspection:
    """The multifd channels of one capture folder, and the main stream's part in them."""

    def __init__(self, folder: Path, chunks: list[Chunk], version: str) -> None:
        self.folder = folder
        self.version = version
        self.rule = MultifdSyncRule(load_profile(version))
        self.schema = multifd_schema(version)
        directions = sorted(
            {c.direction for c in chunks if c.direction.multifd_channel is not None},
            key=lambda d: d.multifd_channel or 0,
        )
        self.timelines = {
            d: Timeline([(c.offset, c.length, c.t_ns) for c in chunks if c.direction is d])
            for d in directions
        }
        self.covered = {d: _tiled([c for c in chunks if c.direction is d], d) for d in directions}
        self.channels: list[ChannelInspection] = []
        self.blocks: dict[str, int] = {}
        self.main_pages = 0
        self.main_zero_pages = 0
        self.events: list[TimelineEvent] = []
        self.main_syncs: list[TimelineEvent] = []

    @staticmethod
    def present(chunks: list[Chunk]) -> bool:
        return any(chunk.direction.multifd_channel is not None for chunk in chunks)

    def main_record(self, record: Record, stream: Timeline) -> None:
        """A record of the main stream, in order (the first reading of it)."""
        message = record.message
        if isinstance(message, m.Configuration):
            self.rule.machine(message.machine_type)
        elif isinstance(message, m.MemSize):
            self.blocks.update({info.idstr: info.used_length for info in message.blocks})
        elif isinstance(message, m.RamPageRun):
            self.main_pages += message.count
            self.main_zero_pages += message.zero_count
        elif isinstance(message, m.RamEos | m.RamMultifdFlush):
            point = self.rule.sync_point(message, record.offset)
            if point is not None:
                event = TimelineEvent(
                    stream.arrival(record.offset, record.size),
                    "stream",
                    record.offset,
                    record.size,
                    point.record,
                    "sync point: waits for every channel's SYNC",
                )
                self.main_syncs.append(event)

    def read(self) -> None:
        """Read every channel's file to its end."""
        for direction, timeline in self.timelines.items():
            self.channels.append(self._read_channel(direction, timeline))
        self.events = sorted(self.events + self.main_syncs, key=lambda e: e.t_ns)

    def _read_channel(self, direction: Direction, timeline: Timeline) -> ChannelInspection:
        path = _capture_file(self.folder, direction.file_name)
        channel = ChannelInspection(direction.value, str(path))
        try:
            with open_capture_file(path) as file:
                walker = _Walker(file, self.version, self.blocks)
                walker.walk(lambda *event: self._event(channel, timeline, *event))
        except QmigError as error:
            raise _on_channel(error, direction.value) from None
        channel.bytes = walker.at
        if self.covered[direction] != channel.bytes:
            raise MalformedError(
                INDEX_NAME,
                f"{direction.value} chunks sum to {self.covered[direction]}, the file has "
                f"{channel.bytes} bytes",
            )
        return channel

    def _event(
        self,
        channel: ChannelInspection,
        timeline: Timeline,
        offset: int,
        size: int,
        init: MultifdInit | None,
        header: MultifdPacketHeader | None,
    ) -> None:
        where = channel.direction
        if init is not None:
            channel.id = init.channel
            t_ns = timeline.arrival(offset, size)
            detail = f"channel id {init.channel}, uuid {init.uuid.hex()}"
            self.events.append(TimelineEvent(t_ns, where, offset, size, "MULTIFD_INIT", detail))
            return
        if header is None:  # device state: counted as bytes only
            return
        spec = self.schema.spec
        sync = bool(header.flags & spec.sync_flag)
        method = spec.compression_names[header.flags & spec.compression_mask]
        channel.packets += 1
        channel.pages += header.normal_pages
        channel.zero_pages += header.zero_pages
        if header.normal_pages:
            channel.compression.add(method)
        if sync:
            channel.syncs += 1
        if sync or header.normal_pages or header.zero_pages:
            t_ns = timeline.arrival(offset, size)
            if sync:
                channel.sync_t_ns.append(t_ns)
            parts = [f"{header.normal_pages} pages"]
            if header.zero_pages:
                parts.append(f"{header.zero_pages} zero")
            if header.normal_pages or header.zero_pages:
                parts.append(header.ramblock)
            if method != "NOCOMP":
                parts.append(method)
            name = "MULTIFD_PACKET" + (" SYNC" if sync else "")
            detail = f"#{header.packet_num} " + ", ".join(parts)
            self.events.append(TimelineEvent(t_ns, where, offset, size, name, detail))

    def as_json(self) -> dict[str, Any]:
        pages = {"main": self.main_pages}
        for channel in self.channels:
            pages[channel.direction] = channel.pages + channel.zero_pages
        return {
            "channels": [channel.as_json() for channel in self.channels],
            # Target pages (normal and zero) each channel carried; "main": page records.
            "pages": pages,
            "main_zero_pages": self.main_zero_pages,
            "flush_after_each_section": self.rule.flush_after_each_section,
            "sync_points": [event.as_json() for event in self.main_syncs],
            "syncs_match": all(c.syncs == len(self.main_syncs) for c in self.channels),
            "bytes": sum(channel.bytes for channel in self.channels),
        }

    def lines(self) -> list[str]:
        """The merged timeline, one line per event (for the text listing)."""
        return [
            f"{e.t_ns / 1e6:>11.3f} ms  {e.where:<11} {e.offset:>12}  {e.name:<22} {e.detail}"
            for e in self.events
        ]


Event = Callable[[int, int, "MultifdInit | None", "MultifdPacketHeader | None"], None]


class _Walker:
    """One channel file, packet by packet: each header read and checked (the counts, the
    block and every offset in it, in bulk), each payload skipped (seeked past in a plain
    file): memory and time go by packets, not by bytes."""

    def __init__(self, file: BinaryIO, version: str, blocks: dict[str, int]) -> None:
        self.file = file
        self.schema = multifd_schema(version)
        self.page = 1 << self.schema.profile.default_target_page_bits
        self.blocks = blocks
        self.at = 0
        self.size: int | None = None  # a plain file's size: payloads are seeked past
        with contextlib.suppress(AttributeError, OSError, io.UnsupportedOperation):
            if isinstance(file, io.BufferedReader) and file.seekable():
                self.size = os.fstat(file.fileno()).st_size

    def _read(self, size: int, what: str, *, clean_end: bool = False) -> bytes | None:
        data = self.file.read(size)
        if not data and clean_end:
            return None
        if len(data) < size:
            raise TruncatedError(what, self.at + len(data))
        self.at += size
        return data

    def _skip(self, size: int) -> None:
        if self.size is not None:
            if self.at + size > self.size:
                raise TruncatedError(WHAT_PACKET, self.size)
            self.file.seek(size, io.SEEK_CUR)
            self.at += size
            return
        while size:
            data = self.file.read(min(size, CHUNK))
            if not data:
                raise TruncatedError(WHAT_PACKET, self.at)
            self.at += len(data)
            size -= len(data)

    def walk(self, event: Event) -> None:
        schema, spec = self.schema, self.schema.spec
        raw = self._read(schema.init_size, WHAT_INIT)
        assert raw is not None
        event(0, schema.init_size, schema.parse_init(raw, 0), None)
        head_len = schema.packet_len(self.page)
        while True:
            start = self.at
            hdr = self._read(schema.hdr_size, WHAT_PACKET, clean_end=True)
            if hdr is None:
                return
            flags = schema.parse_hdr(hdr, start)
            if schema.is_device_state(flags):
                rest = self._read(schema.device_state_size - schema.hdr_size, WHAT_PACKET)
                assert rest is not None
                device = schema.parse_device_state(hdr + rest, start)
                self._skip(device.next_packet_size)
                event(start, self.at - start, None, None)
                continue
            rest = self._read(head_len - schema.hdr_size, WHAT_PACKET)
            assert rest is not None
            head = hdr + rest
            header = schema.parse_packet(head, start, self.page)
            count = header.normal_pages + header.zero_pages
            if count:
                self._check(header, head, count, start)
            payload = schema.payload_size(header, self.page)
            if header.flags & spec.compression_mask and payload > 2 * spec.packet_size:
                raise MalformedError(
                    WHAT_PACKET,
                    f"next_packet_size: {payload} is more than qmig's limit of "
                    f"{2 * spec.packet_size} for a compressed packet",
                    start + 20,
                )
            self._skip(payload)
            event(start, self.at - start, None, header)

    def _check(self, header: MultifdPacketHeader, head: bytes, count: int, start: int) -> None:
        length = self.blocks.get(header.ramblock)
        if length is None:
            raise MalformedError(
                WHAT_PACKET, f"ramblock: unknown block {header.ramblock!r}", start + 64
            )
        fixed = self.schema.packet_size
        offsets = array("Q")
        offsets.frombytes(head[fixed : fixed + 8 * count])
        if sys.byteorder == "little":
            offsets.byteswap()
        ored = functools.reduce(operator.or_, offsets)
        if max(offsets) + self.page > length or ored % self.page:
            self.schema.check_offsets(header, list(offsets), length, self.page, start + fixed)


def multifd_inspection(index_path: Path, version: str) -> MultifdInspection | None:
    """The capture's multifd channels, if its index has any."""
    from qmig.capture.recording import read_index

    chunks = read_index(index_path)
    if not MultifdInspection.present(chunks):
        return None
    return MultifdInspection(index_path.parent, chunks, version)


def _tiled(chunks: list[Chunk], direction: Direction) -> int:
    total = 0
    for chunk in chunks:
        if chunk.offset != total:
            raise MalformedError(
                INDEX_NAME, f"{direction.value} chunk at {chunk.offset}, expected {total}"
            )
        total += chunk.length
    return total


def _capture_file(folder: Path, name: str) -> Path:
    from qmig.capture.recording import capture_file

    path = capture_file(folder, name)
    if path is None:
        raise QmigError(str(folder), f"the index has chunks of {name} but no such file")
    return path


def _on_channel(error: QmigError, where: str) -> QmigError:
    """The same error, naming the channel's file."""
    clone = error.at(error.offset) if error.offset is not None else error
    clone.what = f"{where}.bin {error.what}"
    return clone
