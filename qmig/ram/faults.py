"""The fault thread: turns userfaultfd page faults into page requests, and times them.

Design: a Python thread that blocks in ``qmig_fault_wait`` (poll on the userfaultfd and a quit
eventfd, then one read() of up to 64 messages). cffi releases the GIL for the whole call, so the
thread costs nothing while idle, and the C vCPUs never need the GIL at all. After a fault it
busy-reads for up to ``spin_us`` before sleeping again: faults come in bursts, and on virtual
machines waking a sleeping reader on another CPU costs tens of microseconds.

Why not a C pthread: measured with ``bench/uffd_bench.py`` on the development host (a 2-CPU
VM, kernel 6.18, shared with other work), a fault loop entirely in C serves 45-95k faults/s
at a median of 5-15 µs from fault read to page placed; this Python thread, serving from an
in-process source, 25-49k faults/s at a median of 14-26 µs. The difference, 6-10 µs, is
Python's share per fault (request, placement call, accounting). A C thread would only win it
back if it also placed the pages, that is if the page source were C; the runner's source is the
network, so every request crosses into Python anyway, and a network round trip costs far more
than 7 µs. The per-page work that matters (batched reads, placement runs, bitmaps) is in C.

Every fault gets a timestamp in C right after read(). When its host page is placed (by
whoever serves it, via the block's placement listener) the interval read → placed is the
fault's latency and the faulting thread's blocked time; faults on a page that is already
requested are folded into the one request. Faults outside every block are reported to
``on_stray`` and kept in :attr:`FaultThread.strays`, never dropped silently.

Shutdown: :meth:`FaultThread.stop` writes the quit eventfd, which stays readable until read,
so a stop that races with the thread entering poll() cannot be lost.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from qmig.ram._uffd import ffi, lib
from qmig.ram.blocks import RamBlock, RamBlocks
from qmig.ram.errors import UffdCallError
from qmig.ram.uffd import EVENT_PAGEFAULT, FLAG_WRITE, Userfaultfd

BATCH = 64
SPIN_US = 50.0


class PageRequest(NamedTuple):
    """A host page some thread is waiting for (a named tuple: one is made per fault)."""

    block: str
    offset: int  # bytes into the block, host-page aligned
    length: int  # the block's host page size
    address: int  # the faulting address
    thread_id: int  # 0 unless the kernel offers UFFD_FEATURE_THREAD_ID
    fault_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns) when the fault was read
    write: bool


@dataclass(frozen=True, slots=True)
class StrayFault:
    """A fault (or other event) that belongs to no block."""

    address: int
    thread_id: int
    fault_ns: int
    event: int


@dataclass(frozen=True)
class LatencySummary:
    count: int = 0
    p50_ns: int = 0
    p99_ns: int = 0
    max_ns: int = 0
    mean_ns: int = 0

    @classmethod
    def of(cls, samples: list[int]) -> LatencySummary:
        if not samples:
            return cls()
        ordered = sorted(samples)
        last = len(ordered) - 1
        return cls(
            count=len(ordered),
            p50_ns=ordered[last // 2],
            p99_ns=ordered[min(last, (len(ordered) * 99) // 100)],
            max_ns=ordered[last],
            mean_ns=sum(ordered) // len(ordered),
        )


@dataclass(frozen=True)
class FaultStats:
    faults: int  # page-fault messages read
    requests: int  # page requests handed out (one per missing host page)
    repeat_faults: int  # faults on a page already requested (same or other thread)
    late_faults: int  # faults read after their page was already in place
    stray_faults: int
    pending: int  # requested host pages not yet in place
    latency: LatencySummary  # fault read → page placed, per fault
    blocktime_ns: int  # sum over faults of read → placed
    blocktime_ns_by_thread: dict[int, int] = field(default_factory=dict)
    all_blocked_ns: int = 0  # time during which every known vCPU thread was blocked


def _all_blocked(intervals: list[tuple[int, int, int]], threads: int) -> int:
    """Time during which ``threads`` distinct threads were blocked at once (sweep line)."""
    if threads <= 0:
        return 0
    edges = sorted(
        [(start, 1) for start, _, _ in intervals] + [(end, -1) for _, end, _ in intervals]
    )
    blocked = total = 0
    since = 0
    for when, step in edges:
        if blocked >= threads:
            total += when - since
        blocked += step
        since = when
    return total


class FaultThread:
    """Reads faults from ``uffd`` for ``blocks`` and hands out :class:`PageRequest`s.

    Requests go to ``on_request`` (called on the fault thread; keep it short) or, by default,
    to the :attr:`requests` queue.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        blocks: RamBlocks,
        on_request: Callable[[PageRequest], None] | None = None,
        on_stray: Callable[[StrayFault], None] | None = None,
        spin_us: float = SPIN_US,
    ) -> None:
        self.uffd = uffd
        self.spin_ns = int(spin_us * 1000)
        self.blocks = blocks
        self.requests: queue.SimpleQueue[PageRequest] = queue.SimpleQueue()
        self.on_request = on_request or self.requests.put
        self.on_stray = on_stray
        self.strays: list[StrayFault] = []
        self.error: BaseException | None = None
        self._quit_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._pending: dict[str, dict[int, list[tuple[int, int]]]] = {b.idstr: {} for b in blocks}
        self._latencies: list[int] = []
        self._intervals: list[tuple[int, int, int]] = []
        self._faults = self._requests = self._repeats = self._late = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qmig-faults", daemon=True)
        for block in blocks:
            block.placement_listener = self._placed

    def start(self) -> FaultThread:
        self._thread.start()
        return self

    def __enter__(self) -> FaultThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop reading faults and join. Threads still waiting on pages stay blocked until
        their pages are placed or the blocks are detached (see :class:`RamSession`)."""
        if self._quit_fd < 0:
            return
        self._stopping = True  # seen between batches, even while faults keep coming
        os.eventfd_write(self._quit_fd, 1)
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise UffdCallError("fault thread", 0, f"did not stop within {timeout} s")
        for block in self.blocks:
            block.placement_listener = None
        os.close(self._quit_fd)
        self._quit_fd = -1

    def _run(self) -> None:
        messages = ffi.new("struct qmig_fault[]", BATCH)
        quit_flag = ffi.new("int *")
        handle = self._handle
        fd, spin_ns = self.uffd.fd, self.spin_ns
        count = 0
        while True:
            # After a busy spell, spin a little before sleeping (see the module docstring).
            count = lib.qmig_fault_spin(fd, spin_ns, messages, BATCH) if count and spin_ns else 0
            if not count:
                count = lib.qmig_fault_wait(fd, self._quit_fd, -1, messages, BATCH, quit_flag)
            if count < 0:
                self.error = UffdCallError("read", -count, os.strerror(-count))
                return
            for index in range(count):
                message = messages[index]
                try:
                    handle(message.address, message.flags, message.tid, message.t_ns, message.event)
                except Exception as error:  # the runner's callback failed; keep serving
                    if self.error is None:
                        self.error = error
            if quit_flag[0] or self._stopping:
                return

    def _handle(self, address: int, flags: int, tid: int, t_ns: int, event: int) -> None:
        self._faults += 1
        block = self.blocks.find(address) if event == EVENT_PAGEFAULT else None
        if block is None:
            stray = StrayFault(address, tid, t_ns, event)
            self.strays.append(stray)
            if self.on_stray is not None:
                self.on_stray(stray)
            return
        host_page = (address - block.host_address) // block.page_size
        with self._lock:
            if block.host_page_received(host_page):
                # Placed between the fault and our read; the placement woke the thread.
                self._late += 1
                return
            pending = self._pending[block.idstr]
            waiting = pending.get(host_page)
            if waiting is not None:
                waiting.append((t_ns, tid))
                self._repeats += 1
                return
            pending[host_page] = [(t_ns, tid)]
            self._requests += 1
        self.on_request(
            PageRequest(
                block.idstr,
                host_page * block.page_size,
                block.page_size,
                address,
                tid,
                t_ns,
                bool(flags & FLAG_WRITE),
            )
        )

    def _placed(self, block: RamBlock, first: int, count: int, t_ns: int) -> None:
        with self._lock:
            pending = self._pending[block.idstr]
            if not pending:
                return
            if count == 1:  # the common case: one page, as requested
                waiters = pending.pop(first, None)
                served = [] if waiters is None else [waiters]
            else:  # walk whichever is shorter: the placed range or the pending pages
                if count <= len(pending):
                    pages = [page for page in range(first, first + count) if page in pending]
                else:
                    pages = [page for page in pending if first <= page < first + count]
                served = [pending.pop(page) for page in pages]
            for waiters in served:
                for read_ns, tid in waiters:
                    self._latencies.append(t_ns - read_ns)
                    self._intervals.append((read_ns, t_ns, tid))

    def latencies_ns(self) -> list[int]:
        with self._lock:
            return list(self._latencies)

    def stats(self, vcpu_threads: int | None = None) -> FaultStats:
        """A snapshot. ``vcpu_threads`` is how many vCPUs count for all-blocked time
        (default: the distinct threads seen faulting)."""
        with self._lock:
            latencies = list(self._latencies)
            intervals = list(self._intervals)
            pending = sum(len(pages) for pages in self._pending.values())
        by_thread: dict[int, int] = {}
        for start, end, tid in intervals:
            by_thread[tid] = by_thread.get(tid, 0) + end - start
        threads = len(by_thread) if vcpu_threads is None else vcpu_threads
        return FaultStats(
            faults=self._faults,
            requests=self._requests,
            repeat_faults=self._repeats,
            late_faults=self._late,
            stray_faults=len(self.strays),
            pending=pending,
            latency=LatencySummary.of(latencies),
            blocktime_ns=sum(by_thread.values()),
            blocktime_ns_by_thread=by_thread,
            all_blocked_ns=_all_blocked(intervals, threads),
        )
