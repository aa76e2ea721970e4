"""The source's multifd decisions, sans-IO: which page goes on which channel, and when to sync.

With the ``multifd`` capability, precopy RAM leaves the main stream: pages are queued per
RAMBlock and go out in packets (at most the profile's ``packet_size`` of pages each), one
packet per channel in turn, each channel having opened with its 64-byte handshake. What
stays on the main channel depends on the version and the machine type (the profile's
``[multifd]`` table says which):

- zero pages: ZERO records on the main channel (7.2, and ``zero-page-detection=legacy``), or
  listed after the normal pages in the packets (9.0+'s ``multifd``), or sent as normal pages
  (``none``);
- syncs: ``per-section`` puts one SYNC packet on every channel before every RAM EOS of the
  main channel (the destination's EOS waits for them); ``per-round`` syncs at setup and each
  time the sweep passes the last block, and says so on the main channel with
  ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (the destination's FLUSH waits for them).

Postcopy pages never go by multifd: a host page must be placed whole and at once. QEMU 10.1+
allows multifd with postcopy-ram: before the switch the source flushes what is queued and
syncs the channels (in a RAM section of its own, ending in EOS); this module does the same,
and refuses the combination for a version whose QEMU refuses it unless the peer is qmig.

The machine hands out :class:`PacketOut` values: the header bytes (built by the schema) and
where the normal pages' data lies in guest RAM, so that a runner sends a packet with one
gathered write and no per-page copy.
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qmig.errors import QmigError
from qmig.protocol.preempt import machine_version
from qmig.protocol.zero_page_detection import ZERO_PAGE_DETECTIONS, ZeroPageDetection
from qmig.wire.multifd import MultifdInit, MultifdPacketHeader, MultifdSchema, multifd_schema
from qmig.wire.profiles import Profile

UUID_SIZE = 16


@dataclass(frozen=True)
class MultifdSendOptions:
    """What the user sets: the ``multifd-channels`` parameter, ``zero-page-detection`` (None:
    the version's default for the machine type), the migration UUID (QEMU's ``-uuid``; the
    destination refuses a channel whose handshake carries another), and whether the peer is
    qmig (which takes multifd with postcopy whatever the version)."""

    channels: int
    zero_page_detection: str | None = None
    uuid: bytes = bytes(UUID_SIZE)
    qmig_peer: bool = False


@dataclass(frozen=True)
class PacketOut:
    """One packet to write on ``channel``: ``header`` (fixed part and offset array), then the
    bytes of ``ram`` at each (start, length) of ``runs`` (the normal pages, in order)."""

    channel: int
    packet_num: int
    header: bytes
    ram: Any
    runs: tuple[tuple[int, int], ...]
    normal_pages: int
    zero_pages: int
    sync: bool

    @property
    def size(self) -> int:
        return len(self.header) + sum(length for _, length in self.runs)


class MultifdPlan:
    """Queues pages per block, cuts packets, deals them round robin, says when to sync."""

    def __init__(
        self,
        profile: Profile,
        options: MultifdSendOptions,
        *,
        machine_type: str,
        target_page_size: int,
        postcopy: bool,
    ) -> None:
        if profile.multifd is None:
            raise QmigError("--multifd", f"QEMU {profile.name} has no multifd")
        if options.channels < 1 or options.channels > 255:
            raise QmigError("--multifd", f"{options.channels} channels: 1 to 255")
        if len(options.uuid) != UUID_SIZE:
            raise QmigError("--multifd", f"a migration UUID is {UUID_SIZE} bytes")
        spec = profile.multifd
        if postcopy and not spec.postcopy and not options.qmig_peer:
            raise QmigError(
                "--multifd",
                f"QEMU {profile.name} refuses multifd together with postcopy-ram (allowed "
                "from 10.1 on; between qmig peers too)",
            )
        self.schema: MultifdSchema = multifd_schema(profile.name)
        self.spec = spec
        self.channels = options.channels
        self.uuid = options.uuid
        self.page_size = target_page_size
        self.page_count = self.schema.page_count(target_page_size)
        version = machine_version(machine_type)
        self.per_section = spec.sync == "per-section" or _up_to(version, spec.per_section_machines)
        self.zero_pages = self._zero_rule(profile, options.zero_page_detection, version)
        self._next_channel = 0
        self._packet_num = 0
        self._block: Any = None  # the SourceBlock of the queued pages
        self._queued = array("Q")  # target page indices of the queued pages
        self._zero = bytes(spec.packet_size)  # compared against, a packet's worth at once
        self.packets = 0  # page packets sent
        self.syncs = 0  # sync rounds (one SYNC packet per channel each)
        self.normal_pages = 0
        self.zero_pages_listed = 0
        self.pages_per_channel = [0] * self.channels
        self.bytes_per_channel = [0] * self.channels

    def _zero_rule(
        self, profile: Profile, asked: str | None, version: tuple[int, int] | None
    ) -> ZeroPageDetection:
        spec = self.spec
        if asked is not None and asked not in ZERO_PAGE_DETECTIONS:
            raise QmigError(
                "--zero-page-detection",
                f"{asked!r} is not one of {', '.join(ZERO_PAGE_DETECTIONS)}",
            )
        if spec.zero_pages == "main-channel":
            if asked not in (None, "legacy"):
                raise QmigError(
                    "--zero-page-detection",
                    f"QEMU {profile.name} has no zero-page-detection parameter: zero pages go "
                    "on the main channel (legacy)",
                )
            return "legacy"
        if asked is not None:
            return asked  # type: ignore[return-value]
        if _up_to(version, spec.legacy_zero_pages_machines):
            return "legacy"
        return "multifd"

    @property
    def zero_pages_on_main(self) -> bool:
        """Zero pages are found before queueing and go as ZERO records on the main channel."""
        return self.zero_pages == "legacy"

    # --- the channels' openings -----------------------------------------------------------

    def handshakes(self) -> list[bytes]:
        """Each channel's first 64 bytes, by channel id."""
        return [self.schema.build_init(MultifdInit(self.uuid, i)) for i in range(self.channels)]

    # --- pages ----------------------------------------------------------------------------

    def queue(self, block: Any, pages: array[int]) -> list[PacketOut]:
        """Queue target pages of ``block`` (QEMU's multifd_queue_page, a page at a time):
        a full queue, or a page of another block, sends what is queued first."""
        out: list[PacketOut] = []
        if self._block is not block and self._queued:
            out.append(self._page_packet())
        self._block = block
        at = 0
        while at < len(pages):
            room = self.page_count - len(self._queued)
            self._queued.extend(pages[at : at + room])
            at += room
            if len(self._queued) == self.page_count:
                out.append(self._page_packet())
        return out

    def flush(self) -> list[PacketOut]:
        """Send what is queued (a partial packet)."""
        return [self._page_packet()] if self._queued else []

    def sync(self) -> list[PacketOut]:
        """Flush, then one SYNC packet on every channel (QEMU's multifd_send_sync_main)."""
        out = self.flush()
        header = MultifdPacketHeader(
            flags=self.spec.sync_flag | self.spec.compression["NOCOMP"],
            pages_alloc=self.page_count if self.spec.sync_pages_alloc == "page-count" else 0,
            normal_pages=0,
            next_packet_size=0,
            packet_num=0,
            zero_pages=0,
            ramblock="",
        )
        for channel in range(self.channels):
            number = self._take_number()
            built = self.schema.build_packet(_numbered(header, number), [], self.page_size)
            out.append(PacketOut(channel, number, built, b"", (), 0, 0, True))
            self.bytes_per_channel[channel] += len(built)
        self.syncs += 1
        return out

    def split_zero(self, ram: Any, pages: array[int]) -> tuple[array[int], array[int]]:
        """``pages`` as (normal, zero) target page indices, each in order. A run of pages
        that is zero as a whole is found with one comparison."""
        size = self.page_size
        normal, zero = array("Q"), array("Q")
        read = _reader(ram)
        zero_page = self._zero[:size]
        chunk = len(self._zero) // size
        i = 0
        count = len(pages)
        while i < count:
            first = pages[i]
            span = min(chunk, count - i)
            if pages[i + span - 1] - first == span - 1:  # contiguous: try all at once
                start, length = first * size, span * size
                if read(start, start + length) == self._zero[:length]:
                    zero.extend(pages[i : i + span])
                    i += span
                    continue
            for page in pages[i : i + span]:
                start = page * size
                if read(start, start + size) == zero_page:
                    zero.append(page)
                else:
                    normal.append(page)
            i += span
        return normal, zero

    # --- packets --------------------------------------------------------------------------

    def _take_number(self) -> int:
        number = self._packet_num
        self._packet_num += 1
        return number

    def _page_packet(self) -> PacketOut:
        block, queued = self._block, self._queued
        self._queued = array("Q")
        if self.zero_pages == "multifd":
            normal, zero = self.split_zero(block.ram, queued)
        else:
            normal, zero = queued, array("Q")
        size = self.page_size
        number = self._take_number()
        header = MultifdPacketHeader(
            flags=self.spec.compression["NOCOMP"],
            pages_alloc=self.page_count,
            normal_pages=len(normal),
            next_packet_size=len(normal) * size,
            packet_num=number,
            zero_pages=len(zero),
            ramblock=block.idstr,
        )
        offsets = array("Q", normal)
        offsets.extend(zero)
        built = self.schema.build_packet(header, [p * size for p in offsets], size)
        channel = self._next_channel
        self._next_channel = (channel + 1) % self.channels
        packet = PacketOut(
            channel, number, built, block.ram, _runs(normal, size), len(normal), len(zero), False
        )
        self.packets += 1
        self.normal_pages += len(normal)
        self.zero_pages_listed += len(zero)
        self.pages_per_channel[channel] += len(queued)
        self.bytes_per_channel[channel] += packet.size
        return packet

    def summary(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "zero_page_detection": self.zero_pages,
            "sync": "per-section" if self.per_section else "per-round",
            "packets": self.packets,
            "syncs": self.syncs,
            "normal_pages": self.normal_pages,
            "zero_pages": self.zero_pages_listed,
            "pages_per_channel": list(self.pages_per_channel),
        }


def _numbered(header: MultifdPacketHeader, number: int) -> MultifdPacketHeader:
    return MultifdPacketHeader(
        header.flags,
        header.pages_alloc,
        header.normal_pages,
        header.next_packet_size,
        number,
        header.zero_pages,
        header.ramblock,
    )


def _reader(ram: Any) -> Callable[[int, int], bytes | bytearray]:
    """``read(start, end)``: a copy of those bytes of ``ram``. Comparing a copy with zeros is
    a memcmp; a memoryview compares element by element, ten times slower."""
    if isinstance(ram, mmap.mmap | bytes | bytearray):
        buffer: mmap.mmap | bytes | bytearray = ram
        return lambda start, end: buffer[start:end]
    view = memoryview(ram)
    return lambda start, end: view[start:end].tobytes()


def _runs(pages: array[int], size: int) -> tuple[tuple[int, int], ...]:
    """Contiguous pages as (byte start, byte length) runs: a gathered write's pieces."""
    if not len(pages):
        return ()
    first, last = pages[0], pages[-1]
    if last - first + 1 == len(pages):  # the usual case: one run
        return ((first * size, len(pages) * size),)
    runs: list[tuple[int, int]] = []
    start = prev = first
    for page in pages[1:]:
        if page != prev + 1:
            runs.append((start * size, (prev - start + 1) * size))
            start = page
        prev = page
    runs.append((start * size, (prev - start + 1) * size))
    return tuple(runs)


def _up_to(version: tuple[int, int] | None, limit: str | None) -> bool:
    """The machine type is of version ``limit`` or older (an alias without one is not)."""
    if version is None or limit is None:
        return False
    major, minor = limit.split(".")
    return version <= (int(major), int(minor))
