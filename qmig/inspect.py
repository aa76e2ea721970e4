"""Inspecting a recorded migration: every record of the stream and its return path, counted.

:class:`StreamInspection` consumes :class:`~qmig.wire.reader.Record` values and keeps the
figures ``qmig inspect`` prints: occurrences of every section type and command (those inside
PACKAGED included), per-RAMBlock page counts, and, with an extract directory, each block's
final contents written as the pages go by. Memory is bounded by the RAMBlock sizes'
bitmaps, never by the stream's size.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from qmig.sparse import zeroed
from qmig.wire import messages as m
from qmig.wire.ramscan import RamScanner
from qmig.wire.reader import END, NEED_DATA, Record, ReturnPathReader, StreamReader
from qmig.wire.schema import RAM_RECORD_HEADER, counted_size

# Bytes read per call. 1 MiB beat 4 MiB by 10-30 % of CPU time on a 1 GiB stream here: the
# buffer the file is copied into stays in cache, and the reader's recycled buffers are small.
CHUNK = 1 << 20
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
            # Resident only where pages arrive: MEM_SIZE may claim terabytes (qmig.sparse).
            grown = zeroed(pages)
            grown[: len(self.state)] = self.state
            self.state = grown

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
    boundaries: Sequence[int] = (),
) -> Iterator[Record]:
    """Every record of ``file``, read in chunks so that memory stays bounded. ``boundaries``:
    where a recording of several connections (postcopy recovery) starts a new one; the
    reader starts over there, as the destination did."""
    pending = sorted(boundaries)
    while True:
        while pending and reader.fed >= pending[0]:
            reader.new_channel(pending.pop(0))
        size = min(CHUNK, pending[0] - reader.fed) if pending else CHUNK
        count = cast(Any, file).readinto(reader.get_buffer(size)) or 0
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


# --- whole recordings in memory -------------------------------------------------------------
# Tests and fixture scripts hold a capture's bytes already; these read them with the same
# readers as ``qmig inspect``, so that one description of the bytes (qmig.wire.schema) serves.


def stream_records(data: bytes, version: str | None = None) -> Iterator[Record]:
    """Every record of a whole source-to-destination stream; a malformed one raises."""
    return read_records(io.BytesIO(data), StreamReader(version))


def return_path_records(data: bytes, version: str | None = None) -> list[Record]:
    """Every message of a whole return path, in order; a cut-off or bad one raises."""
    return list(read_records(io.BytesIO(data), ReturnPathReader(version)))


def count_return_path(data: bytes, version: str | None = None) -> Counter[str]:
    """Occurrences of each return-path message, by name (``REQ_PAGES``, ``PONG``, …)."""
    return Counter(record.name for record in return_path_records(data, version))


@dataclass(frozen=True)
class DiscardCommand:
    """One POSTCOPY_RAM_DISCARD of a stream, where it is (inside PACKAGED or not)."""

    offset: int
    block: str
    ranges: list[tuple[int, int]]  # (start, length) in bytes within the block


def find_discard_commands(data: bytes, version: str | None = None) -> list[DiscardCommand]:
    """The POSTCOPY_RAM_DISCARD commands of a whole stream, found by parsing all of it."""
    return [
        DiscardCommand(
            record.offset,
            record.message.block,
            [(piece.start, piece.length) for piece in record.message.ranges],
        )
        for record in stream_records(data, version)
        if isinstance(record.message, m.PostcopyRamDiscard)
    ]


# --- a capture directory: both directions on one timeline -----------------------------------


class Timeline:
    """When each byte of one direction of a capture reached the relay (formats/capture.md).

    A chunk's ``t_ns`` is when the relay received it; a record is complete at the relay when
    the chunk holding its last byte arrived.
    """

    def __init__(self, chunks: list[tuple[int, int, int]]) -> None:
        """``chunks``: (offset, length, t_ns) of one direction, in offset order."""
        self.ends = [offset + length for offset, length, _ in chunks]
        self.times = [t_ns for _, _, t_ns in chunks]

    def arrival(self, offset: int, size: int) -> int:
        """t_ns at which the record at ``offset`` of ``size`` bytes had wholly arrived."""
        if not self.times:
            return 0
        last = offset + max(size, 1) - 1
        index = bisect.bisect_right(self.ends, last)
        return self.times[min(index, len(self.times) - 1)]


@dataclass
class PageRequest:
    """A REQ_PAGES or REQ_PAGES_ID, and the stream record that answered it."""

    offset: int  # in the return path
    name: str
    block: str | None  # REQ_PAGES: the block of the last REQ_PAGES_ID (None if there was none)
    start: int
    length: int
    t_ns: int
    answered_at_byte: int | None = None  # the stream record that completed the range
    answered_t_ns: int | None = None
    in_flight: bool = False  # the answer reached the relay before the request did
    answered_on: str = "stream"  # the channel of the answer: "stream", or "preempt"
    waiting: set[int] = field(default_factory=set, repr=False)  # target pages still due

    @property
    def latency_us(self) -> float | None:
        if self.answered_t_ns is None:
            return None
        return round((self.answered_t_ns - self.t_ns) / 1000, 1)

    def as_json(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "name": self.name,
            "block": self.block,
            "start": self.start,
            "len": self.length,
            "t_ns": self.t_ns,
            "answered_at_byte": self.answered_at_byte,
            "answered_t_ns": self.answered_t_ns,
            "latency_us": self.latency_us,
            "in_flight": self.in_flight,
            "answered_on": self.answered_on,
        }


def page_requests(records: list[Record], timeline: Timeline) -> list[PageRequest]:
    """The page requests of a return path, each with its block and its time at the relay."""
    requests = []
    block = None
    for record in records:
        message = record.message
        if isinstance(message, m.ReqPagesId | m.ReqPages):
            if isinstance(message, m.ReqPagesId):
                block = message.block
            t_ns = timeline.arrival(record.offset, record.size)
            requests.append(
                PageRequest(record.offset, record.name, block, message.start, message.length, t_ns)
            )
    return requests


class RequestMatcher:
    """Finds, for each page request, the stream record that answered it.

    A request is answered by the first page records of its block, covering every target page
    of its range, that reached the relay after the request did. Both times are the relay's,
    so the latency is what the source took to answer plus the relay's round trip.

    Often the page is already on its way: the source sent it (postcopy's background
    transfer) before the request reached it, and does not send it again. The relay then saw
    it shortly before the request. When no record after the request covers the range, the
    last one since postcopy started (the PACKAGED blob) that did is the answer, marked
    ``in_flight``, with a negative latency. Pages sent before that were either held by the
    destination already or discarded, so they cannot answer a request.

    Page records are looked at one by one only after the switch to postcopy or while a
    request waits, so the precopy bulk of a stream costs nothing here.
    """

    def __init__(
        self, requests: list[PageRequest], timeline: Timeline, page_size: int, flag_continue: int
    ) -> None:
        self.requests = sorted(requests, key=lambda request: request.t_ns)
        self.timeline = timeline
        self.page_size = page_size
        self.flag_continue = flag_continue
        self._next = 0  # the first request not yet waiting
        self._waiting: dict[tuple[str, int], list[PageRequest]] = {}
        # (block, page) -> (record start, arrival) of its last record since the switch
        self._recent: dict[tuple[str, int], tuple[int, int]] | None = None

    def postcopy_started(self) -> None:
        if self._recent is None:
            self._recent = {}

    def _activate(self, t_ns: int) -> None:
        while self._next < len(self.requests) and self.requests[self._next].t_ns <= t_ns:
            request = self.requests[self._next]
            self._next += 1
            if request.block is None:
                continue
            first = request.start - request.start % self.page_size
            pages = range(first, request.start + max(request.length, 1), self.page_size)
            request.waiting = set(pages)
            for page in pages:
                self._waiting.setdefault((request.block, page), []).append(request)

    def add(self, run: m.RamPageRun) -> None:
        recent = self._recent
        if not run.count:
            return
        size = run.target_page_size
        if recent is None and not self._waiting:
            if self._next >= len(self.requests):
                return
            last_end = run.bodies[-1] + size  # a bound on the run's last byte
            if self.timeline.arrival(last_end, 1) < self.requests[self._next].t_ns:
                return  # the whole run reached the relay before the next request
        mask = size - 1
        for header, body in zip(run.headers, run.bodies, strict=True):
            arrived = self.timeline.arrival(body, size if header & run.page_flag else 1)
            key = (run.block, header & ~mask)
            if recent is not None:
                recent[key] = (self._record_start(run.block, header, body), arrived)
            self._activate(arrived)
            for request in self._waiting.pop(key, ()):
                request.waiting.discard(key[1])
                if not request.waiting:
                    request.answered_at_byte = self._record_start(run.block, header, body)
                    request.answered_t_ns = arrived

    def _record_start(self, block: str, header: int, body: int) -> int:
        """A page record's first byte: its be64, then the block name unless it CONTINUEs."""
        start = body - RAM_RECORD_HEADER.sizeof()
        if header & self.flag_continue:
            return start
        return start - counted_size(block)

    def finish(self) -> None:
        """Answer what is left with pages that were already in flight (see the class doc)."""
        self._activate(1 << 63)
        recent = self._recent or {}
        for request in self.requests:
            if request.answered_at_byte is not None or request.block is None:
                continue
            found = [recent.get((request.block, page)) for page in request.waiting]
            hits = [hit for hit in found if hit is not None and hit[1] <= request.t_ns]
            if hits and len(hits) == len(found):
                request.answered_at_byte, request.answered_t_ns = max(hits)
                request.in_flight = True
        self._waiting.clear()


def latency_summary(requests: list[PageRequest]) -> dict[str, Any]:
    """Counts, and p50/p99/max latency (µs) of the requests answered after they were made."""
    latencies = sorted(
        r.latency_us for r in requests if r.latency_us is not None and not r.in_flight
    )

    def rank(fraction: float) -> float | None:  # nearest rank
        if not latencies:
            return None
        return latencies[max(0, math.ceil(len(latencies) * fraction) - 1)]

    return {
        "count": len(requests),
        "answered": len(latencies),
        "in_flight": sum(r.in_flight for r in requests),
        "unanswered": sum(r.answered_at_byte is None for r in requests),
        "p50": rank(0.5),
        "p99": rank(0.99),
        "max": latencies[-1] if latencies else None,
    }
