"""The fault thread: turns userfaultfd page faults into page requests, and times them.

Design: a Python thread that blocks in ``qmig_fault_wait`` (poll on the userfaultfd and a quit
eventfd, then one read() of up to 64 messages). cffi releases the GIL for the whole call, so the
thread costs nothing while idle, and the C vCPUs never need the GIL at all. Where it serves
faults itself (``sources``, below), it busy-reads for up to ``spin_us`` after a fault before
sleeping again: faults come in bursts, and on virtual machines waking a sleeping reader on
another CPU costs tens of microseconds. Where a fault becomes a page request (in Python or in
C), it sleeps between faults: the answer comes from other threads (the source's return-path
reader, the destination's receive thread), which the scheduler often wakes onto the fault
thread's CPU, and a spinning reader holds them off (measured in ``qmig simulate``: the source
read a request about 60 µs after it was sent with a 50 µs spin, 10-20 µs without).

Why the request path stays in Python: a destination's pages come over the network, so every
request crosses into Python anyway (the protocol machine, the return path), and a network
round trip costs far more than Python's share per fault, about 6-10 µs on the development host
(a 2-CPU VM). The per-page work that matters (batched reads, placement runs, bitmaps) is in C.
Where the source is local memory, the C-served form below removes Python from the fault path.

Every fault gets a timestamp in C right after read(). When its host page is placed (by
whoever serves it, via the block's placement listener) the interval read → placed is the
fault's latency and the faulting thread's blocked time; faults on a page that is already
requested are folded into the one request. Faults outside every block are reported to
``on_stray`` and kept in :attr:`FaultThread.strays`, never dropped silently; so are the
messages that are no page fault (UFFD_EVENT_REMOVE and the like, which come only with the
features that ask for them: qmig asks for none, a descriptor handed over may have), each as
the event it is. One that changes registered memory (REMOVE, UNMAP, REMAP) leaves the received
bitmaps wrong, so it is the thread's :attr:`FaultThread.error` as well.

Shutdown: :meth:`FaultThread.stop` writes the quit eventfd, which stays readable until read,
so a stop that races with the thread entering poll() cannot be lost.

Served in C: when the page source is memory in this process (``sources``: per block, a buffer
laid out like the block), nothing needs to cross into Python per fault, and the thread runs
``qmig_serve_blocks`` instead: read faults, place from the source, log read/placed times, all
in C. Python decodes the log only for :meth:`FaultThread.stats`. That is the form for local
page sources (a snapshot, a test's pattern, the benchmark); a destination whose pages come
over the network keeps the request path.

Requested in C: with ``requests`` (:class:`~qmig.ram.fault_requests.FaultRequests`) the
thread runs ``qmig_freq_run`` instead, which reads faults, skips pages in place or asked for
already (the received bitmap, and a requested byte per host page that it sets atomically),
and writes the REQ_PAGES(_ID) to the return path itself. Its log is taken in here, under the
same lock as placements, before any placement is accounted, so no fault's latency is lost;
the requests it sent wait in :meth:`FaultThread.take_sent` for the runner, which tells the
protocol machine. While the C's sending is off (a paused migration) faults are held: they go
to ``on_request`` as on the Python path.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from qmig.ram import fault_requests as fr
from qmig.ram._uffd import ffi, lib
from qmig.ram.blocks import RamBlock, RamBlocks
from qmig.ram.errors import RamError, UffdCallError, UffdEventError
from qmig.ram.uffd import (
    EVENT_NAMES,
    EVENT_PAGEFAULT,
    FLAG_WRITE,
    Userfaultfd,
    event_name,
    name_this_thread,
)

BATCH = int(lib.QMIG_FAULT_BATCH)  # fault messages per read(), as the C reads them
SPIN_US = 50.0
SERVED_LOG = 1 << 16  # faults logged per qmig_serve_blocks call (2 MiB)
_FORMAT_CODES = {"uint64_t": "Q", "uint32_t": "I", "int32_t": "i"}


def _unpacker(ctype: str) -> struct.Struct:
    """Unpacks the C struct's fields in order, laid out as cffi sees the compiled struct
    (padding included), so that qmig_uffd.h stays the one place that declares it."""
    layout, at = "=", 0
    for _, member in ffi.typeof(ctype).fields:
        layout += "x" * (member.offset - at) + _FORMAT_CODES[member.type.cname]
        at = member.offset + ffi.sizeof(member.type)
    return struct.Struct(layout + "x" * (ffi.sizeof(ctype) - at))


# read_ns, placed_ns, address, end, tid, block, event
_SERVED = _unpacker("struct qmig_served")


class PageRequest(NamedTuple):
    """A host page some thread is waiting for (a named tuple: one is made per fault)."""

    block: str
    offset: int  # bytes into the block, host-page aligned
    length: int  # the block's host page size
    address: int  # the faulting address
    thread_id: int  # 0 unless the kernel offers UFFD_FEATURE_THREAD_ID
    fault_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns) when the fault was read
    write: bool


class SentRequest(NamedTuple):
    """A request the C fault thread sent (or failed to send: ``sent_ns`` 0)."""

    block: str
    host_offset: int
    read_ns: int  # the fault read
    sent_ns: int  # just before the send
    done_ns: int  # just after it
    with_id: bool  # a REQ_PAGES_ID


@dataclass(frozen=True, slots=True)
class StrayFault:
    """A fault that belongs to no block, or a message that is no page fault (``event``)."""

    address: int
    thread_id: int
    fault_ns: int
    event: int
    end: int = 0  # not a page fault: the event's range is [address, end)

    @property
    def is_fault(self) -> bool:
        return self.event == EVENT_PAGEFAULT

    @property
    def kind(self) -> str:
        """PAGEFAULT, REMOVE, ...: the event as the kernel names it, without its prefix."""
        return EVENT_NAMES.get(self.event, f"0x{self.event:x}")

    def describe(self) -> str:
        """One line: what the message was, and where."""
        if self.is_fault:
            return f"page fault at 0x{self.address:x} outside every block"
        if self.end:
            return f"{event_name(self.event)} of 0x{self.address:x}-0x{self.end:x}"
        return event_name(self.event)


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
    stray_faults: int  # page faults outside every block
    pending: int  # requested host pages not yet in place
    latency: LatencySummary  # fault read → page placed, per fault
    blocktime_ns: int  # sum over faults of read → placed
    blocktime_ns_by_thread: dict[int, int] = field(default_factory=dict)
    all_blocked_ns: int = 0  # time during which every known vCPU thread was blocked
    events: dict[str, int] = field(default_factory=dict)  # other messages, by kind (REMOVE...)


def _named(run: Callable[[], None]) -> Callable[[], None]:
    """``run``, on a thread that ps, top and perf show by its Python name."""

    def named() -> None:
        name_this_thread()
        run()

    return named


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
        sources: Mapping[str, Any] | None = None,
        requests: fr.FaultRequests | None = None,
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
        self._sources: dict[str, Any] | None = None
        self._served_logs: list[bytes] = []
        if sources is not None:
            self._sources = {}
            for block in blocks:
                source = sources.get(block.idstr)
                if source is None or memoryview(source).nbytes < block.used_length:
                    raise RamError(
                        f"block '{block.idstr}': a C-served fault thread needs a source of "
                        f"0x{block.used_length:x} bytes for it"
                    )
                self._sources[block.idstr] = source
        self.c_requests = requests
        self._sent: list[SentRequest] = []  # sent in C, not taken by the runner yet
        self._held: list[PageRequest] = []  # faults for on_request (C sending was off)
        self._held_strays: list[StrayFault] = []
        run = self._run if self._sources is None else self._run_served
        if requests is not None:
            run = self._run_requests
        self._thread = threading.Thread(target=_named(run), name="qmig-faults", daemon=True)
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
        if self.c_requests is not None:
            with self._lock:
                self._absorb()
        for block in self.blocks:
            block.placement_listener = None
            if self._sources is not None:  # pages the C loop placed count as the block's
                with block._lock:
                    block.stats.placed_pages += block.c_block.served
                block.c_block.served = 0
        os.close(self._quit_fd)
        self._quit_fd = -1

    def _run(self) -> None:
        messages = ffi.new("struct qmig_fault[]", BATCH)
        quit_flag = ffi.new("int *")
        handle = self._handle
        fd = self.uffd.fd
        while True:
            # No spin between faults: a request's answer comes from other threads, which a
            # spinning reader would hold off its CPU (see the module docstring).
            count = lib.qmig_fault_wait(fd, self._quit_fd, -1, messages, BATCH, quit_flag)
            if count < 0:
                self.error = UffdCallError("read", -count, os.strerror(-count))
                return
            for index in range(count):
                message = messages[index]
                self._call(
                    handle,
                    message.address,
                    message.flags,
                    message.tid,
                    message.t_ns,
                    message.event,
                    message.end,
                )
            if quit_flag[0] or self._stopping:
                return

    def _run_requests(self) -> None:
        assert self.c_requests is not None
        ctx = self.c_requests.ctx
        quit_flag = ffi.new("int *")
        while True:
            # Back here only for what needs Python: a held or stray fault, a full log, quit.
            # No spin between faults here (see request.c: it holds off the answer).
            count = lib.qmig_freq_run(ctx, self.uffd.fd, self._quit_fd, quit_flag)
            if count < 0:
                self.error = UffdCallError("read", -count, os.strerror(-count))
                return
            with self._lock:
                self._absorb()
                held, self._held = self._held, []
                strays, self._held_strays = self._held_strays, []
            for stray in strays:
                self._report(stray)
            for request in held:
                self._call(self.on_request, request)
            if quit_flag[0] or self._stopping:
                return

    def _absorb(self) -> None:
        """Take the C log in (lock held): counts, waiting faults, requests sent, held ones."""
        assert self.c_requests is not None
        blocks = self.c_requests.blocks
        for (
            read_ns,
            sent_ns,
            done_ns,
            address,
            host_offset,
            tid,
            index,
            kind,
            with_id,
            event,
            end,
        ) in self.c_requests.drain():
            if kind == fr.SEND:
                self._sent.append(
                    SentRequest(
                        blocks[index].idstr, host_offset, read_ns, sent_ns, done_ns, bool(with_id)
                    )
                )
                continue
            if kind == fr.STRAY:
                self._held_strays.append(StrayFault(address, tid, read_ns, event, end))
                self._faults += event == EVENT_PAGEFAULT
                continue
            self._faults += 1
            block = blocks[index]
            if kind == fr.LATE:
                self._late += 1
                continue
            self._wait(block, host_offset // block.page_size, read_ns, tid)
            if kind == fr.REPEAT:
                self._repeats += 1
                continue
            self._requests += 1
            if kind == fr.HELD:
                self._held.append(
                    PageRequest(
                        block.idstr, host_offset, block.page_size, address, tid, read_ns, False
                    )
                )
            else:  # SENT, or FAILED (sent_ns 0): the machine must know it either way
                self._sent.append(
                    SentRequest(block.idstr, host_offset, read_ns, sent_ns, done_ns, bool(with_id))
                )

    def _wait(self, block: RamBlock, host_page: int, read_ns: int, tid: int) -> None:
        """A fault waits for its page (lock held); one placed already is timed now."""
        if block.host_page_received(host_page):
            end = max(block.placed_at(host_page) or time.monotonic_ns(), read_ns)
            self._latencies.append(end - read_ns)
            self._intervals.append((read_ns, end, tid))
            return
        self._pending[block.idstr].setdefault(host_page, []).append((read_ns, tid))

    def take_sent(self) -> list[SentRequest]:
        """The requests C sent since the last call, oldest first (every one logged so far)."""
        with self._lock:
            if self.c_requests is not None:
                self._absorb()
            sent, self._sent = self._sent, []
        return sent

    def _run_served(self) -> None:
        assert self._sources is not None
        blocks = list(self.blocks)
        c_blocks = ffi.new("struct qmig_block *[]", [block.c_block for block in blocks])
        keep = [ffi.from_buffer(self._sources[block.idstr]) for block in blocks]
        c_sources = ffi.new("uint8_t *[]", keep)
        log = ffi.new("struct qmig_served[]", SERVED_LOG)
        entry_size = ffi.sizeof("struct qmig_served")
        stop = ffi.new("int *")
        while True:
            count = lib.qmig_serve_blocks(
                self.uffd.fd, self._quit_fd, c_blocks, c_sources, len(blocks), self.spin_ns,
                log, SERVED_LOG, stop
            )  # fmt: skip
            if count < 0:
                self.error = UffdCallError("serve", -count, os.strerror(-count))
                return
            if count:
                chunk = bytes(ffi.buffer(log, count * entry_size))
                with self._lock:
                    self._served_logs.append(chunk)
            if stop[0] == 2:  # faults in no block, other events: reported as the others do
                for read_ns, _, address, end, tid, index, event in _SERVED.iter_unpack(chunk):
                    if index < 0:
                        self._report(StrayFault(address, tid, read_ns, event, end))
            elif stop[0] == 0 or self._stopping:
                return

    def _served(self) -> tuple[int, int, int, list[int], list[tuple[int, int, int]]]:
        """(faults, pages placed, late faults, latencies, intervals) from the C loop's logs."""
        with self._lock:
            logs = list(self._served_logs)
        faults = placed = late = 0
        latencies: list[int] = []
        intervals: list[tuple[int, int, int]] = []
        for chunk in logs:
            for read_ns, placed_ns, _, _, tid, index, event in _SERVED.iter_unpack(chunk):
                if event != EVENT_PAGEFAULT:
                    continue  # not a fault: reported as the event it is
                faults += 1
                if index < 0:
                    continue
                if placed_ns == 0:
                    late += 1
                    continue
                placed += 1
                end = max(placed_ns, read_ns)
                latencies.append(end - read_ns)
                intervals.append((read_ns, end, tid))
        return faults, placed, late, latencies, intervals

    def _handle(
        self, address: int, flags: int, tid: int, t_ns: int, event: int, end: int = 0
    ) -> None:
        if event != EVENT_PAGEFAULT:
            self._report(StrayFault(address, tid, t_ns, event, end))
            return
        self._faults += 1
        block = self.blocks.find(address)
        if block is None:
            self._report(StrayFault(address, tid, t_ns, event))
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

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        """Run one of the runner's callbacks; if it fails, keep its error and serve on."""
        try:
            callback(*args)
        except Exception as error:
            self._keep(error)

    def _keep(self, error: BaseException) -> None:
        """The thread's error is the first one it met."""
        if self.error is None:
            self.error = error

    def _report(self, stray: StrayFault) -> None:
        """A fault in no block, or another event: kept, handed to ``on_stray``; an event that
        changed registered memory is the thread's error too (the first one)."""
        self.strays.append(stray)
        if not stray.is_fault and stray.end:
            touched = [
                block.idstr
                for block in self.blocks
                if stray.address < block.host_address + block.used_length
                and block.host_address < stray.end
            ]
            if touched:
                self._keep(
                    UffdEventError(
                        f"{stray.describe()} in block {', '.join(touched)}: registered guest "
                        "RAM changed under the fault thread (only page faults are served)"
                    )
                )
        if self.on_stray is not None:
            self.on_stray(stray)

    def _placed(self, block: RamBlock, first: int, count: int, t_ns: int) -> None:
        """Host pages ``[first, first+count)`` were placed, by ``t_ns`` at the latest. A batch
        reports the span it covered, which may hold pages it did not place: a pending page
        counts as served only once its bit is set."""
        with self._lock:
            if self.c_requests is not None:
                self._absorb()  # faults C logged before this placement wait for it
            pending = self._pending[block.idstr]
            if not pending:
                return
            if count == 1:  # the common case: one page, as requested
                pages = [first] if first in pending else []
            elif count <= len(pending):  # walk the shorter: the range or the pending pages
                pages = [page for page in range(first, first + count) if page in pending]
            else:
                pages = [page for page in pending if first <= page < first + count]
            for page in pages:
                if not block.host_page_received(page):
                    continue
                # The batched path records when each page went in; a page placed early in a
                # long run must not be charged for the rest of the run.
                placed_ns = block.placed_at(page) or t_ns
                for read_ns, tid in pending.pop(page):
                    end = max(placed_ns, read_ns)
                    self._latencies.append(end - read_ns)
                    self._intervals.append((read_ns, end, tid))

    def latencies_ns(self) -> list[int]:
        served = self._served()[3] if self._sources is not None else []
        with self._lock:
            return list(self._latencies) + served

    def stats(self, vcpu_threads: int | None = None) -> FaultStats:
        """A snapshot. ``vcpu_threads`` is how many vCPUs count for all-blocked time
        (default: the distinct threads seen faulting)."""
        faults, requests, late = self._faults, self._requests, self._late
        if self._sources is not None:
            served_faults, placed, served_late, latencies, intervals = self._served()
            faults, requests, late = faults + served_faults, requests + placed, late + served_late
        else:
            latencies, intervals = [], []
        with self._lock:
            if self.c_requests is not None:
                self._absorb()
                faults, requests, late = self._faults, self._requests, self._late
            latencies += self._latencies
            intervals += self._intervals
            pending = sum(len(pages) for pages in self._pending.values())
        by_thread: dict[int, int] = {}
        for start, end, tid in intervals:
            by_thread[tid] = by_thread.get(tid, 0) + end - start
        threads = len(by_thread) if vcpu_threads is None else vcpu_threads
        return FaultStats(
            faults=faults,
            requests=requests,
            repeat_faults=self._repeats,
            late_faults=late,
            stray_faults=sum(stray.is_fault for stray in self.strays),
            pending=pending,
            latency=LatencySummary.of(latencies),
            blocktime_ns=sum(by_thread.values()),
            blocktime_ns_by_thread=by_thread,
            all_blocked_ns=_all_blocked(intervals, threads),
            events=dict(Counter(stray.kind for stray in self.strays if not stray.is_fault)),
        )
