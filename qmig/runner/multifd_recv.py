"""A destination's multifd channels: one thread each, pages straight into RAM.

Each thread takes its channel (``multifd-<k>`` from the migration's
:class:`~qmig.runner.channels.Channels`), checks the handshake as QEMU's destination does (magic,
version, the migration's UUID, an id below the channel count and not taken by another
channel), then reads packets: the fixed part and the offset array into one buffer, the payload
straight from the socket into another, and places the packet's pages with one C call
(``RamBlock.place_records``, normal pages then the 9.0+ zero pages); compressed payloads are
inflated first with the channel's own stream. Nothing per page runs in Python.

The sync (see :mod:`qmig.protocol.multifd`): a thread that read a SYNC packet posts its own
semaphore and waits on its release one; the main thread, at a sync point of the main stream,
waits for every channel's post, then releases them all. Until MEM_SIZE has mapped the blocks a
channel waits before its first packet. A channel fails alone: its error (one line, naming the
channel and the byte offset in it) is kept and the main channel cut, so the runner stops and
reports it. Channels are not bounded by the idle limit: they are rightly silent while the main
stream carries device state, and through a whole postcopy phase.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import socket
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qmig.errors import MalformedError, QmigError, RemoteProtocolError, TransportError
from qmig.protocol.multifd import MultifdSyncPoint
from qmig.ram.session import RamSession
from qmig.runner.channels import Channels
from qmig.transport import Connection
from qmig.wire.multifd import WHAT_INIT, WHAT_PACKET, MultifdPacketHeader, multifd_schema
from qmig.wire.multifd_reader import _Decoder

POLL = 0.1  # how often a waiting thread looks at errors and the stop flag
DATA_FLAG = 0x8  # place_records' "page data" bit in a record header (any bit below a page)
ZERO_BYTE = b"\0"
LITTLE_ENDIAN = sys.byteorder == "little"

# block, pages, zero pages, ns spent, the pages' byte offsets (normal pages, then zero pages)
Placed = Callable[[str, int, int, int, "array[int]"], None]


def channel_kind(index: int) -> str:
    """The name of the ``index``-th multifd channel accepted, in :class:`Channels`."""
    return f"multifd-{index}"


@dataclass
class ChannelStats:
    """What one channel carried (``id``: its handshake's channel id)."""

    id: int | None = None
    bytes: int = 0
    packets: int = 0
    pages: int = 0
    zero_pages: int = 0
    syncs: int = 0
    ended: bool = False  # the source closed it at a packet boundary
    # Pages since the channel's last SYNC, and where the first of their packets starts.
    unsynced: int = 0
    unsynced_at: int = 0
    methods: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class MultifdReceiveOptions:
    """The destination's own multifd settings, as QEMU's destination has them."""

    uuid: bytes = bytes(16)  # QEMU's -uuid (zero unless given): every handshake must carry it
    compression: str | None = None  # NOCOMP, ZLIB, ZSTD...; None: whatever the packets say
    flush_after_each_section: bool | None = None  # None: from the machine type


class _Stopped(Exception):
    """The receiver is being stopped: the thread leaves quietly."""


class MultifdReceiver:
    """The multifd channels of one incoming migration."""

    def __init__(
        self,
        channels: Channels,
        count: int,
        version: str | None,
        *,
        uuid: bytes = bytes(16),
        target_page_size: int = 4096,
        method: str | None = None,
        open_timeout: float = 60.0,
        sync_timeout: float = 60.0,
        on_placed: Placed | None = None,
        on_error: Callable[[], None] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """``uuid``: this destination's (QEMU's -uuid; zero by default, as QEMU's);
        ``method``: the negotiated compression (NOCOMP, ZLIB, ZSTD...), which every packet
        with pages must carry, or None for whatever the packets say; ``sync_timeout``: how
        long a sync waits for channels that send nothing; ``on_placed``: called from the
        channel threads after each packet's pages; ``on_error``: called once a channel failed
        (the runner cuts its main channel); ``on_bytes``: called from the channel threads
        with each read's size (the source is alive)."""
        self.schema = multifd_schema(version)
        self.spec = self.schema.spec
        if method is not None and method not in self.spec.compression:
            known = ", ".join(self.spec.compression)
            raise QmigError("--multifd-compression", f"{method!r} is not one of {known}")
        self.channels = channels
        self.count = count
        self.uuid = uuid
        self.page_size = target_page_size
        self.method = method
        self.open_timeout = open_timeout
        self.sync_timeout = sync_timeout
        self.on_placed = on_placed
        self.on_error = on_error
        self.on_bytes = on_bytes
        self.stats = [ChannelStats() for _ in range(count)]
        self.syncs = 0
        self.error: QmigError | None = None
        self.postcopy = False  # see switch()
        self._session: RamSession | None = None
        self._blocks: dict[str, int] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._synced = [threading.Semaphore(0) for _ in range(count)]
        self._released = [threading.Semaphore(0) for _ in range(count)]
        self._ids: dict[int, int] = {}  # handshake id -> index
        self._lock = threading.Lock()
        # Channels are taken in order (multifd-0 first): an acceptor serves one caller at a
        # time, and errors name a channel by its place until its handshake gives its id.
        self._opened = [threading.Event() for _ in range(count)]
        self._threads: list[threading.Thread] = []

    # --- the runner's side ---------------------------------------------------------------

    def start(self) -> None:
        for index in range(self.count):
            thread = threading.Thread(
                target=self._run, args=(index,), name=f"qmig-multifd-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def ram_ready(self, session: RamSession, blocks: dict[str, int]) -> None:
        """MEM_SIZE mapped the blocks (name -> used length): packets may be placed now."""
        self._session = session
        self._blocks = dict(blocks)
        self._ready.set()

    def sync(self, point: MultifdSyncPoint) -> None:
        """At a sync point of the main stream: wait until every channel has read its SYNC
        packet, then let them all go on (QEMU's multifd_recv_sync_main)."""
        for index in range(self.count):
            self._wait_synced(index, point)
        for released in self._released:
            released.release()
        self.syncs += 1

    def _wait_synced(self, index: int, point: MultifdSyncPoint) -> None:
        stats = self.stats[index]
        seen, since = stats.bytes, time.monotonic()
        while not self._synced[index].acquire(timeout=POLL):
            if self.error is not None:
                raise self.error
            if stats.ended or not self._threads[index].is_alive():
                raise TransportError(
                    self._name(index),
                    f"the channel ended before its SYNC for the main stream's {point.record} "
                    f"at byte {point.offset}",
                    stats.bytes,
                )
            if stats.bytes != seen:
                seen, since = stats.bytes, time.monotonic()
            elif time.monotonic() - since > self.sync_timeout:
                raise TransportError(
                    self._name(index),
                    f"no SYNC within {self.sync_timeout:g} s of the main stream's "
                    f"{point.record} at byte {point.offset}",
                    stats.bytes,
                )

    def switch(self) -> None:
        """Postcopy starts (its discards, or LISTEN). The source flushed and synced every
        channel before: pages a channel read since its last SYNC, or reads from now on, came
        too late to be ordered with postcopy's, and fail the migration."""
        with self._lock:
            self.postcopy = True
            late = [index for index, stats in enumerate(self.stats) if stats.unsynced]
        if late:
            stats = self.stats[late[0]]
            raise RemoteProtocolError(
                f"{self._name(late[0])} {WHAT_PACKET}",
                f"{stats.unsynced} pages after the channel's last SYNC when postcopy started "
                "(multifd carries the precopy phase only)",
                stats.unsynced_at,
            )

    def stop(self) -> None:
        """End every channel thread (the migration is over, or failed)."""
        self._stop.set()
        for released in self._released:
            released.release()
        for index in range(self.count):
            connection = self.channels.get(channel_kind(index))
            if connection is not None and connection.socket is not None:
                with contextlib.suppress(OSError):
                    connection.socket.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5.0)
        for index in range(self.count):
            self.channels.close(channel_kind(index))

    def summary(self) -> dict[str, Any]:
        """For --json: pages per channel (by handshake id), packets, syncs."""
        by_id = sorted(self.stats, key=lambda s: -1 if s.id is None else s.id)
        return {
            "channels": self.count,
            "syncs": self.syncs,
            "per_channel": [
                {
                    "id": stats.id,
                    "bytes": stats.bytes,
                    "packets": stats.packets,
                    "pages": stats.pages,
                    "zero_pages": stats.zero_pages,
                    "syncs": stats.syncs,
                    "compression": sorted(stats.methods),
                }
                for stats in by_id
            ],
        }

    # --- a channel's thread --------------------------------------------------------------

    def _run(self, index: int) -> None:
        try:
            if index:
                while not self._opened[index - 1].wait(POLL):
                    if self._stop.is_set():
                        return
            try:
                connection = self.channels.open(channel_kind(index), self.open_timeout)
            finally:
                self._opened[index].set()
            self._read(index, connection)
        except _Stopped:
            return
        except QmigError as error:
            if self._stop.is_set():
                return  # closed by stop(): not a failure of the migration
            with self._lock:
                if self.error is None:
                    self.error = self._named(error, index)
            if self.on_error is not None:
                self.on_error()

    def _named(self, error: QmigError, index: int) -> QmigError:
        """The same error, its ``what`` naming the channel it happened on."""
        clone = error.at(error.offset) if error.offset is not None else error
        clone.what = f"{self._name(index)} {error.what}"
        return clone

    def _name(self, index: int) -> str:
        channel = self.stats[index].id
        return f"multifd channel {index if channel is None else channel}"

    def _fill(
        self, connection: Connection, view: memoryview, at: int, what: str, stats: ChannelStats
    ) -> bool:
        """Read exactly ``len(view)`` bytes; False at a clean end (nothing of them came)."""
        got = 0
        while got < len(view):
            if self._stop.is_set():
                raise _Stopped
            count = connection.recv_into(view[got:])
            if count == 0:
                if got == 0 and what != WHAT_INIT:
                    return False
                raise MalformedError(what, "unexpected end of stream", at + got)
            got += count
            stats.bytes += count
            if self.on_bytes is not None:
                self.on_bytes(count)
        return True

    def _read(self, index: int, connection: Connection) -> None:
        schema, stats = self.schema, self.stats[index]
        init = bytearray(schema.init_size)
        self._fill(connection, memoryview(init), 0, WHAT_INIT, stats)
        handshake = schema.parse_init(init, 0, uuid=self.uuid, channels=self.count)
        with self._lock:
            if handshake.channel in self._ids:
                raise MalformedError(
                    WHAT_INIT, f"id: channel {handshake.channel} is already set up", 24
                )
            self._ids[handshake.channel] = index
            stats.id = handshake.channel
        head_len = schema.packet_len(self.page_size)
        head = bytearray(head_len)
        head_view = memoryview(head)
        payload = bytearray(2 * self.spec.packet_size)
        payload_view = memoryview(payload)
        decoders: dict[str, _Decoder] = {}
        at = schema.init_size
        while True:
            if not self._fill(connection, head_view[: schema.hdr_size], at, WHAT_PACKET, stats):
                stats.ended = True
                return
            flags = schema.parse_hdr(head, at)
            if schema.is_device_state(flags):
                raise RemoteProtocolError(
                    WHAT_PACKET, "a device-state packet, which qmig's destination does not load", at
                )
            self._fill(
                connection, head_view[schema.hdr_size :], at + schema.hdr_size, WHAT_PACKET, stats
            )
            header = schema.parse_packet(head, at, self.page_size)
            if self.spec.zero_pages != "packet" and any(head[32:36]):
                # 7.2 reserves what 9.0+ fills with the zero-page count: read as 7.2, those
                # zero pages would be lost.
                raise MalformedError(
                    WHAT_PACKET,
                    f"reserved bytes are not zero (QEMU {schema.profile.name} reserves them; "
                    "9.0+ counts zero pages there: is --qemu-version right?)",
                    at + 32,
                )
            size = self._payload_size(header, at)
            self._fill(connection, payload_view[:size], at + head_len, WHAT_PACKET, stats)
            if header.normal_pages or header.zero_pages:
                self._place(header, head, payload_view[:size], at, decoders, stats)
            stats.packets += 1
            at += head_len + size
            if header.flags & self.spec.sync_flag:
                stats.syncs += 1
                with self._lock:
                    stats.unsynced = 0
                self._synced[index].release()
                while not self._released[index].acquire(timeout=POLL):
                    if self._stop.is_set():
                        raise _Stopped

    def _payload_size(self, header: MultifdPacketHeader, at: int) -> int:
        size = self.schema.payload_size(header, self.page_size)
        if size > 2 * self.spec.packet_size:  # only a compressed packet says its own size
            raise MalformedError(
                WHAT_PACKET,
                f"next_packet_size: {size} is more than qmig's limit of "
                f"{2 * self.spec.packet_size} for a compressed packet",
                at + 20,
            )
        return size

    def _place(
        self,
        header: MultifdPacketHeader,
        head: bytearray,
        payload: memoryview,
        at: int,
        decoders: dict[str, _Decoder],
        stats: ChannelStats,
    ) -> None:
        with self._lock:  # against switch(): either it sees these pages, or they see it
            if self.postcopy:
                raise RemoteProtocolError(
                    WHAT_PACKET,
                    "pages after postcopy started (multifd carries the precopy phase only)",
                    at,
                )
            if not stats.unsynced:
                stats.unsynced_at = at
            stats.unsynced += header.normal_pages + header.zero_pages
        method = self.spec.compression_names[header.flags & self.spec.compression_mask]
        if self.method is not None and header.normal_pages and method != self.method:
            raise MalformedError(
                WHAT_PACKET, f"flags: {method} packet where {self.method} was negotiated", at + 8
            )
        session = self._wait_ready()
        fixed = self.schema.packet_size
        normal, zero = header.normal_pages, header.zero_pages
        offsets = array("Q")
        offsets.frombytes(head[fixed : fixed + 8 * (normal + zero)])
        if LITTLE_ENDIAN:
            offsets.byteswap()
        self._check(header, offsets, at)
        data: Any = payload
        if normal and method != "NOCOMP":
            decoder = decoders.get(method)
            if decoder is None:
                decoder = decoders[method] = _Decoder(method)
            data = decoder.decode(bytes(payload), normal * self.page_size, at + len(head))
            stats.methods.add(method)
        elif normal:
            stats.methods.add(method)
        block = session.block(header.ramblock)
        began = time.perf_counter_ns()
        if normal:
            page = self.page_size
            records = array("Q", map(operator.or_, offsets[:normal], itertools.repeat(DATA_FLAG)))
            bodies = array("Q", range(0, normal * page, page))
            block.place_records(records, bodies, data, 0, DATA_FLAG, replace=True)
        if zero:
            # A zero page goes in only over a page written before: fresh RAM reads as zero.
            block.place_records(
                offsets[normal:], array("Q", bytes(8 * zero)), ZERO_BYTE, 0, DATA_FLAG,
                replace=True,
            )  # fmt: skip
        spent = time.perf_counter_ns() - began
        stats.pages += normal
        stats.zero_pages += zero
        if self.on_placed is not None:
            self.on_placed(header.ramblock, normal + zero, zero, spent, offsets)

    def _check(self, header: MultifdPacketHeader, offsets: array[int], at: int) -> None:
        """The block and every offset in it, in bulk; the precise error from the schema."""
        length = self._blocks.get(header.ramblock)
        if length is None:
            raise MalformedError(
                WHAT_PACKET, f"ramblock: unknown block {header.ramblock!r}", at + 64
            )
        if not offsets:
            return
        ored = functools.reduce(operator.or_, offsets)
        if max(offsets) + self.page_size > length or ored % self.page_size:
            fixed = self.schema.packet_size
            self.schema.check_offsets(header, list(offsets), length, self.page_size, at + fixed)

    def _wait_ready(self) -> RamSession:
        while not self._ready.wait(POLL):
            if self._stop.is_set():
                raise _Stopped
        assert self._session is not None
        return self._session
