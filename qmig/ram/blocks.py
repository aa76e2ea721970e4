"""RAM blocks and the life of their pages: mapped, registered, received, placed, discarded.

A :class:`RamBlock` is a named area like QEMU's RAMBlock (idstr, used length, page size),
backed by an anonymous private mapping (hugetlb when its page size is larger than the host's).
Pages arrive as 4 KiB *target* pages; the kernel can only place whole *host* pages, so a
block with 2 MiB pages gathers the 512 target pages of a host page in a staging buffer and
places them with one UFFDIO_COPY. The received bitmap has one bit per target page, set only
once the page is in place, and lives in a buffer the C placement code reads and writes.

A block is written in two ways, as QEMU's is. Before it is registered with userfaultfd
(precopy, up to LISTEN) pages are copied straight into the mapping: nothing can fault yet, and
a memcpy is several times cheaper than an ioctl. Once registered, every page goes in with
UFFDIO_COPY/ZEROPAGE, atomically, waking whoever waits on it. :meth:`RamBlock.place_records`
does either for a whole run of stream records in one C call (``qmig_place_records``).

Reading RAM from Python is guarded: touching a page that is not in place would block this
thread inside the kernel *while it holds the GIL*, and the fault thread, which needs the GIL to
serve the page, could never run. :meth:`RamBlock.read` and :meth:`RamBlock.digest` therefore
refuse ranges that are not wholly placed.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import struct
import threading
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from qmig.errors import HostSupportError
from qmig.host import HOST_PAGE_SIZE as HOST_PAGE_SIZE  # re-exported
from qmig.ram._uffd import ffi, lib
from qmig.ram.errors import RamError
from qmig.ram.uffd import (
    FEATURE_MISSING_HUGETLBFS,
    MAX_RUN_PAGES,
    REQUIRED_HUGE_RANGE_IOCTLS,
    REQUIRED_RANGE_IOCTLS,
    TARGET_PAGE_SIZE,
    PlaceResult,
    Userfaultfd,
    _placement_error,
    missing,
    place_pages,
)
from qmig.sparse import zeroed

HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")
REGION = 2 << 20  # what one huge page (or the huge zero page) maps on x86-64

# Called after pages are placed (or found already there): block, first host page, count, time.
PlacementListener = Callable[["RamBlock", int, int, int], None]


@functools.cache
def maps_huge_zero_page() -> bool:
    """Whether reading untouched THP-advised memory maps the kernel's huge zero page here."""
    return bool(lib.qmig_huge_zero_page_works())


def size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def huge_page_counts(page_size: int) -> tuple[int, int] | None:
    """``(total, free)`` huge pages of ``page_size``, or None if the kernel has no such size."""
    directory = HUGEPAGES_SYSFS / f"hugepages-{page_size // 1024}kB"
    if not directory.is_dir():
        return None
    total = int((directory / "nr_hugepages").read_text())
    free = int((directory / "free_hugepages").read_text())
    return total, free


class PageBitmap:
    """A bitmap shared with C code, which flips its bits atomically."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        # Sized by the block's claimed length: memory only where bits are set (qmig.sparse).
        self._bytes = zeroed((bits + 7) // 8)
        self.cdata: Any = ffi.from_buffer("uint8_t[]", self._bytes)

    def __len__(self) -> int:
        return self.bits

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.bits:
            raise IndexError(f"bits {start}+{count} outside a bitmap of {self.bits}")

    def set(self, start: int, count: int = 1) -> None:
        self._check(start, count)
        lib.qmig_bitmap_set(self.cdata, start, count)

    def clear(self, start: int, count: int = 1) -> None:
        self._check(start, count)
        lib.qmig_bitmap_clear(self.cdata, start, count)

    def count(self, start: int = 0, count: int | None = None) -> int:
        count = self.bits - start if count is None else count
        self._check(start, count)
        return int(lib.qmig_bitmap_count(self.cdata, start, count))

    def test(self, bit: int) -> bool:
        return bool(self._bytes[bit >> 3] >> (bit & 7) & 1)

    def copy(self) -> bytes:
        """The bits as they are now, bit i at bit i % 8 of byte i // 8."""
        return bytes(self._bytes)

    def all_set(self, start: int, count: int) -> bool:
        self._check(start, count)
        return int(lib.qmig_bitmap_next_clear(self.cdata, start, start + count)) == start + count

    def next_clear(self, start: int = 0, end: int | None = None) -> int:
        """The first clear bit in ``[start, end)``, or ``end`` if there is none."""
        end = self.bits if end is None else end
        self._check(start, end - start)
        return int(lib.qmig_bitmap_next_clear(self.cdata, start, end))


@dataclass(frozen=True)
class BlockSpec:
    """What the stream says about a block: its name, used length and page size in bytes."""

    idstr: str
    used_length: int
    page_size: int = HOST_PAGE_SIZE


@dataclass
class BlockStats:
    placed_pages: int = 0  # host pages this block put in place
    zero_pages: int = 0  # of which placed as zero pages
    duplicate_pages: int = 0  # arrivals for host pages already in place (EEXIST)
    discarded_target_pages: int = 0
    written_pages: int = 0  # target pages written directly, before registration


class RecordsResult(NamedTuple):
    """What one :meth:`RamBlock.place_records` call did."""

    placed: int  # host pages placed with an ioctl
    zero: int  # of which zero pages
    written: int  # target pages written directly (block not registered yet)
    existing: int  # records for pages already in place (EEXIST or marked)
    ioctls: int
    t_ns: int


# Record headers are ``offset | flags``; offsets are 4 KiB aligned, so any low bit can mark
# a data page in the records this module makes up for its per-page entry points.
_DATA_FLAG = 0x8
_ZERO_BYTE = b"\0"
_RANGE = struct.Struct(">QQ")  # a discard range: start, length (bytes)


class RamBlock:
    """One named RAM area with its received bitmap and host-page placement."""

    def __init__(
        self,
        idstr: str,
        used_length: int,
        page_size: int = HOST_PAGE_SIZE,
        *,
        remote_address: int | None = None,
    ) -> None:
        """``remote_address``: the block is another process's memory, at that address in its
        address space, reachable only through a userfaultfd it handed over (see
        :mod:`qmig.ram.handoff`). Nothing is mapped here, and nothing here may read it."""
        if page_size < HOST_PAGE_SIZE or page_size & (page_size - 1):
            raise RamError(f"block '{idstr}': page size {page_size} is not a host page size")
        if used_length <= 0 or used_length % page_size:
            raise RamError(
                f"block '{idstr}': used length 0x{used_length:x} is not a positive multiple "
                f"of its page size {size_text(page_size)}"
            )
        self.idstr = idstr
        self.used_length = used_length
        self.page_size = page_size
        self.huge = page_size != HOST_PAGE_SIZE
        self.target_pages = used_length // TARGET_PAGE_SIZE
        self.host_pages = used_length // page_size
        self.targets_per_host_page = page_size // TARGET_PAGE_SIZE
        self.remote = remote_address is not None
        self.host_address = self._map() if remote_address is None else remote_address
        self.end_address = self.host_address + used_length
        self.received = PageBitmap(self.target_pages)
        self.stats = BlockStats()
        self.placement_listener: PlacementListener | None = None
        self.uffd: Userfaultfd | None = None
        self._lock = threading.Lock()
        # The huge-page staging state lives in the C struct; calls that may touch it are
        # serialised by this lock (4 KiB blocks need none: their scratch is per thread).
        self._place_lock = threading.Lock()
        self._detached = False
        self._closed = False
        self._c: Any = ffi.new("struct qmig_block *")
        self._c.fd = -1
        self._c.zeropage = int(not self.huge)
        self._c.host = self.host_address
        self._c.length = used_length
        self._c.page_size = page_size
        self._c.target_page = TARGET_PAGE_SIZE
        self._c.max_run = MAX_RUN_PAGES
        self._c.max_data_run = 0
        self._c.bitmap = self.received.cdata
        # Pages written directly before registration; a zero page for any other page of the
        # fresh mapping is known to be there already (nothing else writes the block then).
        self._touched = PageBitmap(used_length // TARGET_PAGE_SIZE)
        self._c.touched = self._touched.cdata
        self._c.staging_page = (1 << 64) - 1
        self._c.regions = ffi.NULL
        self._placed_ns: Any = ffi.NULL
        self._keep: list[Any] = []  # buffers the C struct points to
        if self.huge:
            self._keep += [ffi.new("uint8_t[]", page_size), ffi.new("uint8_t[]", page_size)]
            self._c.staging, self._c.staged = self._keep
        # Guest RAM wants THP, as a VMM asks for it; it is turned off around discards.
        self.set_thp(True)

    def __repr__(self) -> str:
        return (
            f"RamBlock({self.idstr!r}, 0x{self.used_length:x}, {size_text(self.page_size)}, "
            f"{self.received.count()}/{self.target_pages} target pages)"
        )

    def _map(self) -> int:
        error = ffi.new("int *")
        huge_size = self.page_size if self.huge else 0
        if self.huge and huge_page_counts(self.page_size) is None:
            raise HostSupportError(
                "huge pages",
                f"block '{self.idstr}' has {size_text(self.page_size)} pages, a size this "
                "kernel does not offer (use a host with that huge-page size)",
            )
        address = int(lib.qmig_map_anon(self.used_length, huge_size, error))
        if address:
            return address
        if self.huge:
            counts = huge_page_counts(self.page_size) or (0, 0)
            need = self.host_pages
            sysfs = HUGEPAGES_SYSFS / f"hugepages-{self.page_size // 1024}kB" / "nr_hugepages"
            raise HostSupportError(
                "huge pages",
                f"cannot map block '{self.idstr}': it needs {need} free "
                f"{size_text(self.page_size)} huge pages and {counts[1]} are free "
                f"({os.strerror(error[0])}; as root: echo {counts[0] + need} > {sysfs})",
            )
        raise HostSupportError(
            "memory", f"cannot map block '{self.idstr}': {os.strerror(error[0])}"
        )

    # --- registration -------------------------------------------------------------------

    @property
    def c_block(self) -> Any:
        """The ``struct qmig_block *`` C code places through (for the C-served fault loop)."""
        return self._c

    @property
    def registered(self) -> bool:
        return self.uffd is not None

    def attach(self, uffd: Userfaultfd) -> None:
        """Register the block in MISSING mode and check the ioctls postcopy needs on it.

        Pages written before (directly, see the module docstring) stay; populated pages that
        hold nothing received are dropped first, so that they fault (``qmig_block_sweep``)."""
        if self.remote:
            raise RamError(f"block '{self.idstr}': another process's block is registered there")
        if self.huge and not uffd.offered.features & FEATURE_MISSING_HUGETLBFS:
            raise HostSupportError(
                "userfaultfd",
                f"missing userfault features: MISSING_HUGETLBFS, needed by block "
                f"'{self.idstr}' with {size_text(self.page_size)} pages (use a newer kernel)",
            )
        dropped = lib.qmig_block_sweep(self._c)
        if dropped < 0:
            raise RamError(
                f"block '{self.idstr}': sweep before registering: {os.strerror(-dropped)}"
            )
        ioctls = uffd.register(self.host_address, self.used_length)
        required = REQUIRED_HUGE_RANGE_IOCTLS if self.huge else REQUIRED_RANGE_IOCTLS
        lacking = missing(required, ioctls)
        if lacking:
            uffd.unregister(self.host_address, self.used_length)
            raise HostSupportError(
                "userfaultfd",
                f"missing userfault ioctls on block '{self.idstr}': {', '.join(lacking)} "
                "(use a newer kernel)",
            )
        # When each host page went in: the fault thread's latency, per page, even for pages
        # placed in the middle of a long run.
        self._placed_ns = self._zeroed_times()
        with self._place_lock:
            self._c.placed_ns = self._placed_ns
            self._c.fd = uffd.fd
            self._c.regions = ffi.NULL  # from here on pages are dropped and placed singly
        self.uffd = uffd

    def attach_handed_over(self, uffd: Userfaultfd) -> None:
        """Place into another process's block through the descriptor it handed over (it has
        registered the block already)."""
        self._placed_ns = self._zeroed_times()
        with self._place_lock:
            self._c.placed_ns = self._placed_ns
            self._c.fd = uffd.fd
        self.uffd = uffd

    def _zeroed_times(self) -> Any:
        """One uint64 per host page, resident only where a page was placed (qmig.sparse)."""
        times = zeroed(8 * self.host_pages)
        self._keep.append(times)  # C points into it
        return ffi.from_buffer("uint64_t[]", times)

    def detach(self) -> None:
        """Unregister. Threads still waiting on missing pages are woken onto zero pages."""
        with self._place_lock:
            self._c.fd = -1
            self._detached = True
        if self.uffd is not None and not self.uffd.closed and not self.remote:
            self.uffd.unregister(self.host_address, self.used_length)
        self.uffd = None

    def notify_placed(self, headers: Any) -> None:
        """Tell the placement listener about the host pages of these records (offset | flags,
        sorted or not) that someone else placed: the C receive thread, ahead of the records'
        own placement, which then finds them in place. The listener looks at each page's bit
        and placement time, so pages not in place are not taken for placed."""
        listener = self.placement_listener
        if listener is None or not len(headers):
            return
        mask = ~(self._c.target_page - 1)
        first = min(headers) & mask
        last = max(headers) & mask
        first_page, end_page = first // self.page_size, last // self.page_size + 1
        listener(self, first_page, end_page - first_page, lib.qmig_now_ns())

    def placed_at(self, host_page: int) -> int:
        """CLOCK_MONOTONIC ns when ``host_page`` was placed by the batched path (0: unknown)."""
        placed = self._placed_ns
        return 0 if placed == ffi.NULL else int(placed[host_page])

    def set_thp(self, enabled: bool) -> None:
        """THP off before discards (a collapse would fill discarded pages with zeros).

        While it is on and the block is written directly, zero memory is mapped 2 MiB at a
        time by the huge zero page (``prepare_regions`` in C), where the kernel offers it."""
        if self.huge or self.remote:
            return
        advice = lib.MADV_HUGEPAGE if enabled else lib.MADV_NOHUGEPAGE
        lib.qmig_madvise(self.host_address, self.used_length, advice)
        regions: Any = ffi.NULL
        if enabled and self.uffd is None and not self._detached and maps_huge_zero_page():
            first = self.host_address & ~(REGION - 1)
            regions = ffi.from_buffer(
                "uint8_t[]", zeroed((self.end_address - 1 - first) // REGION + 1)
            )
        with self._place_lock:
            self._c.regions = regions
        # Kept alive while C may point to it: a 4 KiB block's placement takes no lock.
        self._keep.append(regions)

    def limit_data_runs(self, pages: int) -> None:
        """Once registered, place at most ``pages`` data pages per UFFDIO_COPY (0: as many as
        come in a row). One page at a time wakes a vCPU waiting on a page as soon as that page
        is in, as QEMU places pages; long runs place more per second."""
        with self._place_lock:
            self._c.max_data_run = pages

    @property
    def maps_huge_zero_page(self) -> bool:
        """Whether zero memory written directly is mapped by the huge zero page now."""
        return self._c.regions != ffi.NULL

    # --- lookups ------------------------------------------------------------------------

    def contains(self, address: int) -> bool:
        return self.host_address <= address < self.end_address

    def host_page_received(self, host_page: int) -> bool:
        return self.received.test(host_page * self.targets_per_host_page)

    @property
    def complete(self) -> bool:
        return self.received.next_clear() == self.target_pages

    def missing_host_pages(self) -> Iterator[int]:
        """Offsets of host pages not yet in place, in order."""
        step = self.targets_per_host_page
        bit = self.received.next_clear()
        while bit < self.target_pages:
            host_page = bit // step
            yield host_page * self.page_size
            bit = self.received.next_clear((host_page + 1) * step)

    def is_received(self, offset: int, length: int = TARGET_PAGE_SIZE) -> bool:
        first, count = self._target_range(offset, length, "is_received", aligned=False)
        return self.received.all_set(first, count)

    # --- receiving pages ----------------------------------------------------------------

    def receive_target_page(self, offset: int, data: bytes) -> PlaceResult:
        return self.receive_target_pages(offset, data)

    def receive_target_pages(self, offset: int, data: Any) -> PlaceResult:
        """Accept consecutive target pages starting at ``offset``; place every host page they
        complete. ``data`` is any buffer whose length is a multiple of 4 KiB."""
        source = ffi.from_buffer(data)
        length = len(source)
        if (
            offset < 0
            or not 0 < length <= self.used_length - offset
            or (offset | length) & (TARGET_PAGE_SIZE - 1)
        ):
            self._target_range(offset, length, "page data")  # raises the precise error
        count = length // TARGET_PAGE_SIZE
        if self.huge or not self.registered:
            headers = array("Q", range(offset | _DATA_FLAG, offset + length, TARGET_PAGE_SIZE))
            bodies = array("Q", range(0, length, TARGET_PAGE_SIZE))
            return self._as_place_result(self.place_records(headers, bodies, data, 0, _DATA_FLAG))
        address = int(ffi.cast("uintptr_t", source))
        return self._place(offset // TARGET_PAGE_SIZE, count, address)

    def receive_zero(self, offset: int, length: int = TARGET_PAGE_SIZE) -> PlaceResult:
        """Accept zero target pages (UFFDIO_ZEROPAGE; huge pages copy a zeroed page)."""
        first, count = self._target_range(offset, length, "zero page")
        if self.huge or not self.registered:
            headers = array("Q", range(offset, offset + length, TARGET_PAGE_SIZE))
            bodies = array("Q", bytes(8 * count))
            return self._as_place_result(
                self.place_records(headers, bodies, _ZERO_BYTE, 0, _DATA_FLAG)
            )
        return self._place(first, count, 0, zero=True)

    def _as_place_result(self, result: RecordsResult) -> PlaceResult:
        return PlaceResult(result.placed + result.written, result.existing, result.t_ns)

    def place_records(
        self,
        headers: Any,
        bodies: Any,
        data: Any,
        data_base: int,
        page_flag: int,
        *,
        replace: bool = False,
    ) -> RecordsResult:
        """Place a run of ZERO/PAGE records in one C call, with no per-page Python.

        ``headers[i]`` (uint64) is record i's target-page offset in the block ORed with
        flags: ``page_flag`` set means 4 KiB of page data, clear means a page filled with
        one byte. Its body (the data, or the fill byte) is at ``data[bodies[i] - data_base]``.
        Registered, consecutive missing pages go in with one ioctl per run (EEXIST: already
        there; EAGAIN: retried); huge-page blocks gather whole host pages first. ``replace``:
        a page already in place is dropped and placed again (precopy re-sends after
        registration); unregistered blocks are simply overwritten.
        """
        count = len(headers)
        if count == 0:
            return RecordsResult(0, 0, 0, 0, 0, lib.qmig_now_ns())
        if len(bodies) != count:
            raise RamError(f"block '{self.idstr}': {count} record headers but {len(bodies)} bodies")
        result = ffi.new("struct qmig_records_result *")
        c_headers = ffi.from_buffer("uint64_t[]", headers)
        c_bodies = ffi.from_buffer("uint64_t[]", bodies)
        c_data = ffi.from_buffer(data)
        if self._detached:
            raise RamError(f"block '{self.idstr}': pages arrived after it was torn down")
        if self.remote and not self.registered:
            self._local("direct write")
        if self.huge and self.registered:
            with self._place_lock:
                ret = lib.qmig_place_records(
                    self._c, c_data, data_base, c_headers, c_bodies, count, page_flag,
                    int(replace), result
                )  # fmt: skip
        else:
            ret = lib.qmig_place_records(
                self._c, c_data, data_base, c_headers, c_bodies, count, page_flag, int(replace),
                result
            )  # fmt: skip
        done = RecordsResult(
            result.placed, result.zero, result.written, result.existing, result.ioctls,
            result.t_ns
        )  # fmt: skip
        with self._lock:
            self.stats.placed_pages += done.placed
            self.stats.zero_pages += done.zero
            self.stats.duplicate_pages += done.existing
            self.stats.written_pages += done.written
        listener = self.placement_listener
        if listener is not None and done.placed:
            first = int(result.first_page)
            listener(self, first, int(result.end_page) - first, done.t_ns)
        if ret < 0:
            self._records_error(-ret, headers[int(result.error_record)])
        return done

    def _records_error(self, code: int, header: int) -> None:
        offset = header & ~(TARGET_PAGE_SIZE - 1)
        if code == errno.ERANGE:
            self._target_range(offset, TARGET_PAGE_SIZE, "page")  # raises the precise error
        if code == errno.EBUSY:
            raise RamError(
                f"block '{self.idstr}': target page 0x{offset:x} belongs to another host page "
                "than the one being gathered, which is incomplete (postcopy sends the target "
                "pages of a host page together)"
            )
        raise _placement_error("COPY", code, self.host_address + offset)

    def _target_range(
        self, offset: int, length: int, what: str, *, aligned: bool = True
    ) -> tuple[int, int]:
        if offset < 0 or length <= 0 or offset + length > self.used_length:
            raise RamError(
                f"block '{self.idstr}': {what} 0x{offset:x}+0x{length:x} is outside its used "
                f"length 0x{self.used_length:x}"
            )
        if aligned and (offset % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE):
            raise RamError(
                f"block '{self.idstr}': {what} 0x{offset:x}+0x{length:x} is not whole "
                f"{size_text(TARGET_PAGE_SIZE)} target pages"
            )
        first = offset // TARGET_PAGE_SIZE
        last = (offset + length - 1) // TARGET_PAGE_SIZE
        return first, last - first + 1

    def _uffd(self) -> Userfaultfd:
        if self.uffd is None:
            raise RamError(f"block '{self.idstr}': pages arrived while it is not registered")
        return self.uffd

    def _place(self, first: int, count: int, address: int, zero: bool = False) -> PlaceResult:
        """Place target pages [first, first+count) of a block whose host pages are 4 KiB."""
        uffd = self._uffd()
        result = place_pages(
            uffd.fd, self.host_address + first * TARGET_PAGE_SIZE, address, TARGET_PAGE_SIZE,
            TARGET_PAGE_SIZE, count, MAX_RUN_PAGES, zero, 0, self.received.cdata, first, 1
        )  # fmt: skip
        self._account(result, first, count, zero=zero)
        return result

    def _account(self, result: PlaceResult, first: int, count: int, *, zero: bool) -> None:
        with self._lock:
            self.stats.placed_pages += result.placed
            self.stats.duplicate_pages += result.existing
            if zero:
                self.stats.zero_pages += result.placed
        listener = self.placement_listener
        if listener is not None:
            per = self.targets_per_host_page
            first_host = first // per
            listener(self, first_host, (first + count - 1) // per - first_host + 1, result.t_ns)

    # --- discard ------------------------------------------------------------------------

    def drop_staging(self) -> None:
        """Forget a host page gathered in part (postcopy recovery: its rest was lost with a
        broken channel; the whole page comes again)."""
        with self._place_lock:
            self._c.staging_page = (1 << 64) - 1
            self._c.staged_count = 0

    def discard(self, start: int, length: int) -> None:
        """Drop ``[start, start+length)`` so that it faults again (MADV_DONTNEED). Discards
        come before LISTEN; they must not race with placing the same pages.

        Before registration only the bits are cleared: nothing can fault yet and nothing reads
        a page whose bit is clear, and :meth:`attach` drops every such page in one sweep,
        with batched MADV_DONTNEED (one TLB flush per 1024 ranges, not one per range)."""
        if start < 0 or length <= 0 or start + length > self.used_length:
            raise RamError(
                f"block '{self.idstr}': discard 0x{start:x}+0x{length:x} is outside its used "
                f"length 0x{self.used_length:x}"
            )
        if start % self.page_size or length % self.page_size:
            raise RamError(
                f"block '{self.idstr}': discard 0x{start:x}+0x{length:x} is not aligned to "
                f"its {size_text(self.page_size)} host pages"
            )
        self.discard_ranges(_RANGE.pack(start, length))

    def discard_ranges(self, ranges: bytes) -> int:
        """Discard many ranges in one C call (``qmig_block_discard``): ``ranges`` holds
        (start, length) byte pairs as big-endian u64s, as POSTCOPY_RAM_DISCARD carries them.
        Returns the target pages discarded.

        As :meth:`discard` does for one: bits are cleared first (a fault on a dropped page
        must never find its bit still set, or the fault thread would take it for one already
        served and leave the thread waiting), then, once the block is registered, the pages
        are dropped: adjacent ranges coalesced, the MADV_DONTNEEDs batched. Before that only
        the bits change, and :meth:`attach`'s sweep drops the memory."""
        count = len(ranges) // _RANGE.size
        if not count:
            return 0
        bad = ffi.new("uint64_t *")
        drop = int(self.registered or self._detached)
        with self._place_lock:  # a host page being gathered there starts over
            ret = int(lib.qmig_block_discard(self._c, ffi.from_buffer(ranges), count, drop, bad))
        if ret == -errno.EINVAL:
            start, length = _RANGE.unpack_from(ranges, _RANGE.size * bad[0])
            raise RamError(
                f"block '{self.idstr}': discard 0x{start:x}+0x{length:x} is not aligned to its "
                f"{size_text(self.page_size)} host pages or not inside its used length "
                f"0x{self.used_length:x}"
            )
        if ret < 0:
            raise RamError(f"block '{self.idstr}': MADV_DONTNEED failed: {os.strerror(-ret)}")
        with self._lock:
            self.stats.discarded_target_pages += ret
        return ret

    # --- reading (only what is in place) ------------------------------------------------

    def _local(self, what: str) -> None:
        if self.remote:
            raise RamError(f"block '{self.idstr}': {what}: its memory is in another process")

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of placed pages. Unplaced pages are refused: see the module docstring."""
        self._local("read")
        first, count = self._target_range(offset, length, "read", aligned=False)
        if not self.received.all_set(first, count):
            missing_at = self.received.next_clear(first, first + count) * TARGET_PAGE_SIZE
            raise RamError(
                f"block '{self.idstr}': read 0x{offset:x}+0x{length:x} covers page 0x"
                f"{missing_at:x}, which is not in place yet; reading it from Python would "
                "block while holding the GIL"
            )
        return bytes(ffi.buffer(ffi.cast("char *", self.host_address + offset), length))

    def digest(self) -> str:
        """SHA-256 of the whole block, once every page is in place."""
        self._local("digest")
        if not self.complete:
            raise RamError(
                f"block '{self.idstr}': {self.target_pages - self.received.count()} target "
                "pages are not in place yet; the digest needs all of them"
            )
        view = ffi.buffer(ffi.cast("char *", self.host_address), self.used_length)
        return hashlib.sha256(view).hexdigest()

    # --- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self.detach()
        if not self.remote:
            lib.qmig_unmap(self.host_address, self.used_length)
        self._closed = True


class RamBlocks:
    """The blocks of one destination, found by name or by host address."""

    def __init__(
        self, specs: Iterable[BlockSpec], remote_addresses: dict[str, int] | None = None
    ) -> None:
        """``remote_addresses``: the blocks are another process's, at these addresses."""
        self._by_name: dict[str, RamBlock] = {}
        try:
            for spec in specs:
                if spec.idstr in self._by_name:
                    raise RamError(f"block '{spec.idstr}' is defined twice")
                address = None
                if remote_addresses is not None:
                    address = remote_addresses.get(spec.idstr)
                    if address is None:
                        raise RamError(f"block '{spec.idstr}': no address in the other process")
                self._by_name[spec.idstr] = RamBlock(
                    spec.idstr, spec.used_length, spec.page_size, remote_address=address
                )
        except BaseException:
            self.close()
            raise
        self._ordered = sorted(self._by_name.values(), key=lambda block: block.host_address)
        self._starts = [block.host_address for block in self._ordered]

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __getitem__(self, idstr: str) -> RamBlock:
        try:
            return self._by_name[idstr]
        except KeyError:
            raise RamError(f"no RAM block named '{idstr}'") from None

    @property
    def needs_huge_pages(self) -> bool:
        return any(block.huge for block in self)

    def find(self, address: int) -> RamBlock | None:
        index = bisect_right(self._starts, address) - 1
        if index >= 0 and self._ordered[index].contains(address):
            return self._ordered[index]
        return None

    def attach(self, uffd: Userfaultfd) -> None:
        for block in self:
            block.attach(uffd)

    def detach(self) -> None:
        for block in self:
            block.detach()

    def set_thp(self, enabled: bool) -> None:
        for block in self:
            block.set_thp(enabled)

    @property
    def complete(self) -> bool:
        return all(block.complete for block in self)

    def wait_complete(self, timeout: float) -> bool:
        """Wait until every page is in place. A vCPU can run on as soon as the kernel placed
        its page, a moment before the placing thread marks it; verify after this, not after
        joining vCPUs."""
        deadline = time.monotonic() + timeout
        while not self.complete:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self) -> None:
        for block in self._by_name.values():
            block.close()
