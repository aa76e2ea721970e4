"""Running a :class:`~qmig.protocol.destination.Destination` over a connection, onto real RAM.

The main thread reads the stream, feeds the machine and applies its decisions to a
:class:`~qmig.ram.session.RamSession`: map the blocks when MEM_SIZE announces them, discard
ranges, place pages with userfaultfd, start the guest workload at RUN. The fault thread turns
faults into page requests through the same machine, under a lock, and sends them on the
return path at once; once the guest runs here (and with the fast path), the fault thread
writes them from C itself, and the machine is told of each before its page counts
(:mod:`qmig.ram.fault_requests`). Nothing here reads guest memory before every page is in
place.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmig.errors import QmigError, RemoteProtocolError, TransportError
from qmig.latency import qemu_latency_figures
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.multifd import MultifdSyncPoint, MultifdSyncRule, mark_received
from qmig.protocol.preempt_channel import PreemptChannel
from qmig.protocol.states import DestinationState, is_postcopy_running
from qmig.ram.blocks import HOST_PAGE_SIZE, BlockSpec
from qmig.ram.errors import RamError
from qmig.ram.fault_requests import FaultRequests, ReturnPathLock
from qmig.ram.faults import PageRequest
from qmig.ram.session import RamSession
from qmig.ram.workload import Workload
from qmig.runner.channels import PREEMPT, Channels, CutPlan
from qmig.runner.fastpath import FastPath, start_fast_path, start_preempt_fast_path
from qmig.runner.misbehave import MisbehavingConnection
from qmig.runner.multifd_recv import MultifdReceiveOptions, MultifdReceiver
from qmig.runner.pauses import Pause
from qmig.transport import Connection, Limits
from qmig.wire import messages as m
from qmig.wire.page_requests import PageRequests
from qmig.wire.reader import END

RECV_CHUNK = 1 << 20
RETURN_PATH_BUFFER = 64 << 10  # SO_SNDBUF of the return path (the kernel doubles it)
POSTCOPY_DATA_RUN = 1  # data pages per UFFDIO_COPY after LISTEN (see _apply)
IDLE_TIMEOUT = 60.0
PREEMPT_POLL = 0.1  # the preempt thread's wait for bytes, and then for LISTEN
STOP_TIMEOUT = 5.0  # a reading thread told to stop has stopped within this
RECOVER_TIMEOUT = 600.0  # paused: how long to wait for the source's new channel


@dataclass
class DestinationReport:
    """What happened on the destination, for summaries and --json."""

    started: float = 0.0
    running_at: float | None = None  # POSTCOPY_RUN (monotonic, comparable across processes)
    finished: float = 0.0
    postcopy: bool = False
    bytes_received: int = 0
    blocks: dict[str, int] = field(default_factory=dict)
    devices: list[m.DeviceState] = field(default_factory=list, repr=False)
    requests: int = 0
    request_sent_ns: list[int] = field(default_factory=list, repr=False)  # fault -> request sent
    request_sent_at_ns: list[int] = field(default_factory=list, repr=False)  # when, in order
    request_placed_ns: list[int] = field(default_factory=list, repr=False)  # sent -> placed
    faults: dict[str, Any] = field(default_factory=dict)
    workload: list[dict[str, Any]] = field(default_factory=list)
    discarded_pages: int = 0
    notices: list[str] = field(default_factory=list)
    # Switchover (monotonic): the first POSTCOPY_RAM_DISCARD applied, and LISTEN (whose
    # registration sweeps the blocks); running_at is RUN.
    first_discard_at: float | None = None
    listen_at: float | None = None
    # Target pages placed, and the time spent placing them, before and after RUN.
    placed_pages: dict[str, int] = field(default_factory=lambda: {"precopy": 0, "postcopy": 0})
    placing_ns: dict[str, int] = field(default_factory=lambda: {"precopy": 0, "postcopy": 0})
    # For reports: per block [pages, zero pages] placed; per answered request (sent ns,
    # sent → placed ns, block, host offset).
    block_pages: dict[str, list[int]] = field(default_factory=dict)
    request_log: list[tuple[int, int, str, int]] = field(default_factory=list, repr=False)
    recoveries: int = 0
    paused_s: float = 0.0  # the channel broke → POSTCOPY_RESUME, summed
    pauses: list[Pause] = field(default_factory=list)  # each pause and its recovery
    # The C receive thread's figures, summed over its runs (one per channel after RUN), and
    # per data page it placed, recv() → placed (ns).
    fast_path: dict[str, int] = field(default_factory=dict)
    fast_path_wait_ns: list[int] = field(default_factory=list, repr=False)
    preempt_pages: int = 0  # target pages that came on the preempt channel
    preempt_bytes: int = 0
    # Multifd: target pages (normal and zero) that came in packets, and per channel what it
    # carried, with the number of syncs (MultifdReceiver.summary).
    multifd_pages: int = 0
    multifd: dict[str, Any] = field(default_factory=dict)


class DestinationRunner:
    def __init__(
        self,
        connection: Connection | Channels,
        destination: Destination,
        *,
        workload: Workload | None = None,
        vcpus: int = 1,
        dump_dir: Path | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        keep_ram: bool = False,
        recover_timeout: float = RECOVER_TIMEOUT,
        cuts: CutPlan | None = None,
        fast_path: bool = True,
        multifd_channels: int = 0,
        multifd: MultifdReceiveOptions | None = None,
    ) -> None:
        """``keep_ram``: after a migration that completes, leave the RAM mapped (no longer
        registered) for the caller to read, and to close with ``session.close()``.
        ``connection``: the channel, or the migration's :class:`Channels`; when those can
        open a new channel, a channel that breaks once the guest runs here pauses the
        migration (RAM kept, vCPUs blocked on their faults) and the source's new channel,
        within ``recover_timeout`` seconds, resumes it. ``cuts``: break the channel on
        purpose after that many postcopy pages were placed (the peer then pauses too).
        ``fast_path``: once the guest runs, read the channel and place pages in C
        (:mod:`qmig.runner.fastpath`, the default); False: all in this loop, as before RUN
        (``tests/fastpath`` proves that both place, ask for and refuse the same).
        ``multifd_channels``: the source's multifd channels (``multifd-0``... in the
        channels' openers), read on threads of their own (:mod:`qmig.runner.multifd_recv`),
        with ``multifd``'s settings; 0: no multifd."""
        self.cuts = cuts
        self.channels = connection if isinstance(connection, Channels) else Channels(connection)
        self.recover_timeout = recover_timeout
        self.dest = destination
        self.workload = workload
        self.vcpus = vcpus
        self.dump_dir = dump_dir
        self.keep_ram = keep_ram
        self.idle_timeout = idle_timeout
        self.report = DestinationReport()
        self.session: RamSession | None = None
        self._machine_lock = threading.Lock()
        # Every writer of the return path holds it; with page requests sent from C, it is
        # the C's own mutex (qmig.ram.fault_requests), set when the RAM is mapped.
        self._send_lock: threading.Lock | ReturnPathLock = threading.Lock()
        self._c_requests: FaultRequests | None = None
        self._discard_prepared = False
        # (block, host offset) -> when its request went out (0 until sent): the page that
        # answers it closes the request's latency.
        self._awaiting: dict[tuple[str, int], list[int]] = {}
        self.completed = False  # the machine said MigrationCompleted
        self._broke_at: float | None = None
        self._fast: FastPath | None = None  # the C receive thread, while the guest runs here
        self.fast_path = fast_path
        self._report_lock = threading.Lock()  # placements come from two threads with preempt
        self._preempt_thread: threading.Thread | None = None
        self._preempt_stop = threading.Event()
        self._preempt_error: QmigError | None = None
        # Readable: the guest runs here now, and the preempt thread may hand its channel to a
        # C thread before the next page comes (it waits for bytes in select() meanwhile).
        self._preempt_wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._multifd = self._multifd_receiver(multifd_channels, multifd or MultifdReceiveOptions())

    @property
    def connection(self) -> Connection:
        return self.channels.main

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> DestinationReport:
        self.report.started = time.monotonic()
        buffer = bytearray(RECV_CHUNK)
        if self.connection.meter is None:  # the caller's limits, or at least the idle one
            self.connection.set_limits(Limits(self.idle_timeout, peer="the source"))
        self._bound_return_path()
        ended = False  # the migration is done here, and nothing failed
        try:
            if self._multifd is not None:
                self._multifd.start()
            self._start_preempt()
            while not self.completed:
                try:
                    self._step(buffer)
                except TransportError as error:
                    if self._preempt_error is not None:
                        raise self._preempt_error from None
                    if self._multifd is not None and self._multifd.error is not None:
                        raise self._multifd.error from None
                    if not self._pause(error.detail):
                        raise
            self._end_preempt()
            self._finish()
            ended = True
        except RemoteProtocolError:
            self._abandon()
            if self._multifd is not None and self._multifd.error is not None:
                raise self._multifd.error from None  # what cut the main channel short
            raise
        except QmigError as error:
            self._abandon()
            if self._multifd is not None and self._multifd.error is not None:
                raise self._multifd.error from None
            if self._preempt_error is not None:
                raise self._preempt_error from None
            raise self._with_context(error) from None
        finally:
            # Every thread is stopped, each within its own bound; one that did not stop is
            # the error of a run that had none (a failed run's own error comes first).
            stuck: QmigError | None = None
            for stop in (
                self._fault_requests_off,
                self._stop_fast,
                self._stop_preempt,
                self._stop_multifd,
            ):
                try:
                    stop()
                except QmigError as error:
                    stuck = stuck or error
            thread = self._preempt_thread
            if thread is None or not thread.is_alive():  # a stuck thread may still poll it
                os.close(self._preempt_wake)
            self.report.finished = time.monotonic()
            if not (self.keep_ram and self.completed and self.session):
                self._close_session()
            if stuck is not None and ended:
                raise stuck
        if self.session is not None and self.keep_ram:
            self.session.stop_serving()
        return self.report

    def _step(self, buffer: bytearray) -> None:
        """Read what the source sent and apply it."""
        count = self._receive(buffer)
        if count == 0 and self.channels.can_reopen and self.dest.can_pause:
            raise TransportError(self.connection.name, "the source closed the channel")
        with self._machine_lock:
            if count:
                self.dest.receive_data(memoryview(buffer)[:count])
            else:
                self.dest.receive_eof()
        self._drain()
        if self._fast is not None:
            self._fast.sync(self.dest.reader)
        if count == 0 and not self.completed:
            raise TransportError(self.connection.name, "the source closed the stream")
        cuts = self.cuts
        if cuts is None or not self.dest.can_pause:
            return
        if self.dest.state is DestinationState.RECOVER:
            # Mid-handshake (a RECV_BITMAP was just answered): QEMU's double failure.
            if cuts.cut_recovery_now():
                self._stop_fast()
                self._fault_requests_off()
                self.channels.cut()
                raise TransportError(self.connection.name, "channel cut during recovery")
        elif cuts.due(self.report.placed_pages["postcopy"]):
            cuts.done += 1
            self._stop_fast()
            self._fault_requests_off()
            self.channels.cut()
            raise TransportError(self.connection.name, "channel cut on purpose")

    def _pause(self, cause: str) -> bool:
        """The channel broke: pause and take the source's next channel, if the migration
        can recover here (after RUN, with a way to accept one). False: it cannot; the
        caller fails as without recovery."""
        self._stop_fast()
        self._fault_requests_off()  # the machine asks again after POSTCOPY_RESUME
        if not self.channels.can_reopen:
            return False
        with self._machine_lock:
            if not self.dest.can_pause:
                return False
            self.dest.channel_broken()
        self._stop_preempt()  # the source's pause ends its preempt channel as well
        if self._broke_at is None:
            self._broke_at = time.monotonic()
            self.report.pauses.append(
                Pause(
                    self._broke_at,
                    cause,
                    self.report.bytes_received,
                    self.report.placed_pages["postcopy"],
                )
            )
        # What the pause left to do. Replies for the broken channel are lost with it: the
        # machine asks again, after the resume, for every page it still lacks.
        with contextlib.suppress(TransportError):
            self._drain()
        try:
            self.channels.reopen(self.recover_timeout)
        except TransportError as error:
            raise TransportError(
                error.what,
                f"postcopy paused, and no new channel within {self.recover_timeout:g} s "
                f"({error.detail})",
            ) from None
        self.report.pauses[-1].channels += 1
        if self.connection.socket is not None:
            self.connection.socket.settimeout(self.idle_timeout)
        self._bound_return_path()
        with self._machine_lock:
            self.dest.new_channel()
        self._restart_preempt()
        return True

    def _bound_return_path(self) -> None:
        """Cap what the return path queues in the kernel. Its messages are a few bytes each,
        so a small buffer costs nothing; and a source that stops reading them (answering a
        flood of PINGs into a full socket) is noticed within the idle limit, not after
        autotuning has swallowed megabytes of PONGs."""
        self.connection.limit_buffers(send=RETURN_PATH_BUFFER)

    def _receive(self, buffer: bytearray) -> int:
        try:
            if self._fast is not None:
                count = self._fast.read(buffer, self.idle_timeout, self.connection.name)
                # The C thread read them from the socket: the limits and the report count
                # them as the connection would have.
                self.connection.received_elsewhere(count)
            else:
                count = self.connection.recv_into(buffer)
        except TransportError:
            raise
        except TimeoutError:
            raise TransportError(
                self.connection.name, f"no data from the source for {self.idle_timeout:.0f} s"
            ) from None
        self.report.bytes_received += count
        return count

    def _drain(self) -> None:
        """Apply every decision the machine has for the bytes it was just fed.

        The machine lock is held only to take the next decision, not while pages are placed:
        the fault thread must be able to turn a fault into a request meanwhile. That is safe
        because the machine marks pages received before it hands them out, so a fault on a
        page being placed asks for nothing and simply waits for the placement.

        Discards are gathered while they come in a row (a switchover sends them by the
        thousand, one event per command) and applied per block with one C call.

        A return path that breaks does not stop the decisions: an event taken from the
        machine is applied whatever became of the bytes sent with it (a page marked received
        must be placed), and the break is raised once the machine has no more to say.
        """
        discards: list[ev.RangesDiscarded] = []
        broken: TransportError | None = None
        while True:
            with self._machine_lock:
                event = self.dest.next_event()
                data = self._take_return_path()
            try:
                if broken is None:
                    self._send_taken(data)
            except TransportError as error:
                broken = error
            finally:
                self._release_taken(data)
            if isinstance(event, ev.RangesDiscarded):
                discards.append(event)
                continue
            if discards:
                self._discard(discards)
                discards = []
            if not isinstance(event, ev.Event):  # NEED_DATA or END
                if broken is not None:
                    raise broken
                return
            self._apply(event)

    def _discard(self, events: list[ev.RangesDiscarded]) -> None:
        """Apply discards in order, consecutive ones of a block together."""
        session = self._session()
        self._multifd_done()
        if not self._discard_prepared:
            session.prepare_discard()
            self._discard_prepared = True
        if self.report.first_discard_at is None:
            self.report.first_discard_at = time.monotonic()
        start = 0
        for end in range(1, len(events) + 1):
            if end == len(events) or events[end].block != events[start].block:
                ranges = b"".join(event.ranges.packed for event in events[start:end])
                self.report.discarded_pages += session.discard_ranges(events[start].block, ranges)
                start = end

    def _send_return_path(self, data: bytes) -> None:
        if data:
            with self._send_lock:
                self.connection.sendall(data)

    # Two threads take return-path bytes from the machine: the fault thread (its requests)
    # and the main loop (PONGs, and at a RESUME every pending request, the first naming its
    # block). They must leave in the order the machine queued them, or a REQ_PAGES can reach
    # the source before the REQ_PAGES_ID that names its block. So the bytes are taken with the
    # send lock acquired before the machine is released (the lock order is machine, then send;
    # nothing takes the machine while holding the send lock).

    def _take_return_path(self) -> bytes:
        """With the machine lock held: the queued bytes, the send lock held if there are any."""
        data = self.dest.data_to_send()
        if data:
            self._send_lock.acquire()
        return data

    def _send_taken(self, data: bytes, connection: Connection | None = None) -> None:
        if data:
            (connection or self.connection).sendall(data)

    def _release_taken(self, data: bytes) -> None:
        if data:
            self._send_lock.release()

    # --- decisions ------------------------------------------------------------------------

    def _apply(self, event: ev.Event) -> None:
        match event:
            case ev.RamBlocksAnnounced(blocks=blocks):
                self._map(blocks)
                if self._multifd is not None:
                    self._multifd.ram_ready(self._session(), self.report.blocks)
            case MultifdSyncPoint():
                if self._multifd is not None:
                    self._multifd.sync(event)
            case ev.PagesReceived(run=run, postcopy=postcopy):
                self._place(run, replace=not postcopy)
            case ev.ListenStarted():
                # From here on a missing page faults: discards are done, and every page not
                # received must be requested. Until now pages went straight into memory.
                self.report.listen_at = time.monotonic()
                self._multifd_done()
                session = self._session()
                session.register()
                # Postcopy pages go in one at a time, as QEMU places them: the page a vCPU
                # waits on is usually the first of what arrives, and no longer waits for the
                # rest of its chunk (measured at 1 GiB: fault latency p50 ~190 µs instead of
                # ~245, blocktime a third lower; the cap leaves the copies time enough).
                for block in session.blocks:
                    block.limit_data_runs(POSTCOPY_DATA_RUN)
            case ev.RangesDiscarded():
                self._discard([event])
            case ev.DeviceStateLoaded():
                self.report.devices.append(
                    m.DeviceState(event.idstr, event.instance_id, event.data)
                )
            case ev.GuestRunning():
                self.report.running_at = time.monotonic()
                self.report.postcopy = True
                self._start_fast()
                self._fault_requests_on()
                os.eventfd_write(self._preempt_wake, 1)
                self._start_guest()
            case ev.MigrationCompleted(postcopy=postcopy):
                self.completed = True
                self.report.postcopy = postcopy
                if not postcopy:
                    self._start_guest()
            case ev.Notice(what=what, detail=detail):
                self.report.notices.append(f"{what}: {detail}")
            case ev.Resumed(recoveries=recoveries):
                self.report.recoveries = recoveries
                if self._broke_at is not None:
                    self.report.pauses[-1].resumed_at = time.monotonic()
                    self.report.paused_s += time.monotonic() - self._broke_at
                    self._broke_at = None
                self._start_fast()
                self._fault_requests_on()
            case ev.PartialHostPageDropped(block=block, host_offset=host_offset):
                # The RAM places a host page whole, once all of it came: nothing of it is
                # in memory yet; what was gathered of it goes, and the whole page comes again.
                self._session().block(block).drop_staging()
                self.report.notices.append(
                    f"RAM: half-received host page {host_offset:#x} of {block!r} dropped"
                )

    def _map(self, blocks: tuple[m.RamBlockInfo, ...]) -> None:
        if self.session is not None:
            raise RemoteProtocolError("MEM_SIZE", "RAM blocks announced twice")
        specs = [
            BlockSpec(
                info.idstr,
                _round_up(info.used_length, info.page_size or HOST_PAGE_SIZE),
                info.page_size or HOST_PAGE_SIZE,
            )
            for info in blocks
        ]
        # Registered at LISTEN, as QEMU does: precopy pages are written straight into RAM.
        # THP stays on until the first discard, as in QEMU, where the kernel maps zero memory
        # with the huge zero page: each 2 MiB is read before it is written, so zero pages cost
        # nothing and writes only split that mapping (RamBlock.set_thp). Elsewhere THP goes
        # off at once: a write into untouched THP memory allocates a whole huge page,
        # compacting memory to find one (measured: precopy placement 220-540 MiB/s with THP,
        # ~1.3 GiB/s without). RamSession.close() turns it back on.
        self.session = RamSession(specs, register=False)
        if not all(block.maps_huge_zero_page for block in self.session.blocks):
            self.session.prepare_discard()
            self._discard_prepared = True
        self.session.start_faults(on_request=self._on_fault, requests=self._fault_requests())
        self.report.blocks = {info.idstr: info.used_length for info in blocks}

    def _place(self, run: m.RamPageRun, *, replace: bool, placed_ahead: bool = False) -> None:
        """Place a run of pages with one C call (``RamBlock.place_records``). Before LISTEN
        the blocks are not registered and pages are written straight into memory; a page that
        comes again (the guest changed it) simply overwrites the old one, as in QEMU. After
        LISTEN each run of missing pages goes in with one UFFDIO_COPY or ZEROPAGE.
        ``placed_ahead``: a C receive thread on the run's channel may have placed it."""
        block = self._session().block(run.block)
        if self._c_requests is not None and not replace:
            with self._machine_lock:  # requests C sent are awaited before their pages count
                self._take_requests()
        began = time.perf_counter_ns()
        block.place_records(
            run.headers, run.bodies, run.data, run.data_base, run.page_flag, replace=replace
        )
        phase = "precopy" if replace else "postcopy"
        with self._report_lock:
            self.report.placing_ns[phase] += time.perf_counter_ns() - began
            self.report.placed_pages[phase] += run.count
            counts = self.report.block_pages.setdefault(run.block, [0, 0])
            counts[0] += run.count
            counts[1] += run.zero_count
        if (self._fast is not None or placed_ahead) and not replace:
            # Pages the C thread placed are found in place here: they were placed all the
            # same, and the fault thread's waiters on them are answered now.
            block.notify_placed(run.headers)
        if self._awaiting and not replace:
            # A requested page that is now in place has been answered. list() copies the
            # keys in one step: the fault thread adds requests meanwhile.
            for key in list(self._awaiting):
                if key[0] == run.block and block.host_page_received(key[1] // block.page_size):
                    self._answered(*key)

    # --- the preempt channel (postcopy-preempt) --------------------------------------------

    def _start_preempt(self, *, at_setup: bool = True) -> None:
        """Take the preempt channel on a thread of its own, as QEMU's preempt thread: in the
        pre-7.2 variant it is accepted first, at setup and after each new main channel of a
        recovery (the source opens it right after the main one, and the destination waits
        for every channel before it loads); in the 8.0 variant whenever the source opens it,
        after a recovery (``at_setup`` False) once the bitmaps are in.

        The pre-7.2 channel is known by its order alone: it follows its main channel even
        when that one was cut during the handshake before this end accepted it. Taken on
        the thread, it would come while the main channel is gone and be set aside as the
        next main one (qmig.runner.channels), leaving the real preempt channel unread and
        its EOS never awaited on the right connection."""
        variant = self.dest.preempt
        if variant is None:
            return
        by_order = variant.opened_at_setup
        if by_order and self.channels.get(PREEMPT) is None:
            timeout = self.idle_timeout if at_setup else self.recover_timeout
            self.channels.open(PREEMPT, timeout, by_order=True)
        self._preempt_thread = threading.Thread(
            target=self._preempt_loop,
            args=(not at_setup and not by_order,),
            name="qmig-preempt",
            daemon=True,
        )
        self._preempt_thread.start()

    def _restart_preempt(self) -> None:
        if self.dest.preempt is None:
            return
        self._preempt_stop = threading.Event()
        self._preempt_thread = None
        self._start_preempt(at_setup=False)

    def _preempt_loop(self, resumed: bool) -> None:
        """``resumed``: the channel comes after a recovery, where the source's next main
        channel may reach this thread first (qmig.runner.channels): its first bytes tell,
        read here before a C thread may take the socket (:meth:`_preempt_take_over`)."""
        stop = self._preempt_stop  # this thread's own: a recovery starts another
        fast: FastPath | None = None
        try:
            connection = self.channels.get(PREEMPT)
            while connection is None and not stop.is_set():
                try:
                    connection = self.channels.open(PREEMPT, PREEMPT_POLL)
                except TransportError:
                    continue
            if connection is None:
                return
            with self._machine_lock:
                channel = self.dest.open_preempt_channel()
            buffer = bytearray(RECV_CHUNK)
            while not stop.is_set():
                if fast is None and not resumed:
                    fast = self._preempt_take_over(connection, channel)
                try:
                    count = self._preempt_receive(connection, buffer, fast)
                except TransportError:
                    if self._pausable():
                        return  # the main loop pauses; a new preempt channel follows
                    raise
                if count == 0 and self._pausable():
                    return
                if resumed and count > 0:
                    resumed = False  # only a connection's first bytes can tell
                    first = bytes(buffer[:count])
                    if channel.opens_a_resumed_main_channel(first):
                        again = Connection(connection.name, sock=connection.socket, prefix=first)
                        self.channels.turned_out_main(PREEMPT, again)
                        return  # the main loop finds its channel broken, pauses, takes this
                with self._machine_lock:
                    if count > 0:
                        channel.receive_data(memoryview(buffer)[:count])
                        self.report.preempt_bytes += count
                    elif count == 0:
                        channel.receive_eof()
                if self._drain_preempt(channel, placed_ahead=fast is not None) or count == 0:
                    return
                if fast is not None:
                    fast.sync(channel.reader)
        except QmigError as error:
            self._preempt_error = error
            with self._machine_lock:
                data = self.dest.fail("preempt channel")
            with contextlib.suppress(QmigError):
                self._send_return_path(data)
            if fast is not None:  # before the cut closes the socket it reads
                self._count_fast(fast)
                fast = None
            self._wake_main_reader()  # its C thread may be waiting on the socket
            self._fault_requests_off()
            self.channels.cut()  # the main loop stops, and reports this error
        finally:
            if fast is not None:
                self._count_fast(fast)

    def _preempt_take_over(
        self, connection: Connection, channel: PreemptChannel
    ) -> FastPath | None:
        """Once the guest runs here (the blocks are registered and a vCPU may wait on a
        page), a C thread reads the preempt channel and places its pages as they arrive
        (qmig.runner.fastpath); this thread still feeds every byte to the channel's machine.
        None: not yet, or not at all (``fast_path`` off, no socket)."""
        if not self.fast_path or self.report.running_at is None or self.session is None:
            return None
        with self._machine_lock:
            if not is_postcopy_running(self.dest.state) or channel.ended:
                return None
            fast = start_preempt_fast_path(connection, channel, self.session.blocks)
            if fast is not None:
                fast.sync(channel.reader)
        return fast

    def _preempt_receive(
        self, connection: Connection, buffer: bytearray, fast: FastPath | None
    ) -> int:
        """The preempt channel's next bytes into ``buffer``: their count, 0 at EOF, -1 when
        nothing came within PREEMPT_POLL (what waited for LISTEN may be loadable now)."""
        if fast is None:
            wake = self._preempt_wake
            ready = select.select([connection.fileno(), wake], [], [], PREEMPT_POLL)[0]
            if wake in ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(wake)
                return -1  # the guest runs: the C thread may take the channel first
            return connection.recv_into(buffer) if ready else -1
        try:
            count = fast.read(buffer, PREEMPT_POLL, connection.name)
        except TimeoutError:
            return -1
        connection.received_elsewhere(count)  # the C thread read them off the socket
        return count

    def _pausable(self) -> bool:
        """Would (or did) a broken channel pause the migration, rather than fail it?"""
        with self._machine_lock:
            return self.channels.can_reopen and (
                self.dest.can_pause
                or self.dest.state in (DestinationState.PAUSED, DestinationState.RECOVER)
            )

    def _drain_preempt(self, channel: PreemptChannel, *, placed_ahead: bool = False) -> bool:
        """Place what the preempt channel brought (``placed_ahead``: its C thread may have
        placed it already); True once it has ended."""
        while True:
            with self._machine_lock:
                event = channel.next_event()
            if event is END:
                return True
            if not isinstance(event, ev.PagesReceived):
                return False
            self._place(event.run, replace=False, placed_ahead=placed_ahead)
            with self._report_lock:
                self.report.preempt_pages += event.run.count

    def _end_preempt(self) -> None:
        """The load is complete: the pre-7.2 variant's channel ends with its EOS, which the
        end waits for (as QEMU's cleanup joins its preempt thread); the 8.0 one is read on
        until every page asked for has come (the source answered them there only; QEMU's
        cleanup waits for them too), then its thread is stopped. Each wait is bounded by the
        idle timeout: what did not end is named, never waited for longer."""
        thread = self._preempt_thread
        if thread is None:
            return
        variant = self.dest.preempt
        if variant is not None and variant.ends_with_eos:
            thread.join(self.idle_timeout)
            if thread.is_alive():
                raise TransportError(
                    "preempt channel", f"no EOS within {self.idle_timeout:g} s of the end"
                )
        else:
            # It reads on while pages asked for are missing (PreemptChannel), and ends by
            # itself once they are in; with none missing it is stopped now (it may never
            # have had a channel: a migration that ended in precopy).
            deadline = time.monotonic() + self.idle_timeout
            while thread.is_alive() and (missing := self._requests_missing()):
                if time.monotonic() >= deadline:
                    raise TransportError(
                        "preempt channel",
                        f"{missing} requested host pages not received within "
                        f"{self.idle_timeout:g} s of the end",
                    )
                thread.join(PREEMPT_POLL)
            self._stop_preempt_thread()
        if self._preempt_error is not None:
            raise self._preempt_error

    def _requests_missing(self) -> int:
        with self._machine_lock:
            self._take_requests()
            return len(self.dest.pending_requests())

    def _stop_preempt(self) -> None:
        self._stop_preempt_thread()
        self.channels.close(PREEMPT)

    def _stop_preempt_thread(self) -> None:
        """Stop the preempt channel's thread (it sees the flag within PREEMPT_POLL, outside
        a placement); TransportError if it has not stopped within STOP_TIMEOUT."""
        self._preempt_stop.set()
        thread = self._preempt_thread
        if thread is None:
            return
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise TransportError(
                "preempt channel", f"its reading thread did not stop within {STOP_TIMEOUT:g} s"
            )

    # --- multifd channels (qmig.runner.multifd_recv) ---------------------------------------

    def _multifd_receiver(
        self, count: int, options: MultifdReceiveOptions
    ) -> MultifdReceiver | None:
        if not count:
            return None
        self.dest.multifd = MultifdSyncRule(self.dest.profile, options.flush_after_each_section)
        return MultifdReceiver(
            self.channels,
            count,
            self.dest.profile.name,
            uuid=options.uuid,
            target_page_size=self.dest.reader.schema.target_page_size,
            method=options.compression,
            open_timeout=self.idle_timeout,
            sync_timeout=self.idle_timeout,
            on_placed=self._multifd_placed,
            on_error=self._multifd_failed,
            on_bytes=self._multifd_alive,
        )

    def _multifd_alive(self, count: int) -> None:
        """Bytes on a multifd channel: the source is not idle while the main channel is
        silent (it may be, for a whole pass of RAM), and they count for its rate."""
        meter = self.connection.meter
        if meter is not None:
            meter.got_elsewhere(count)

    def _multifd_failed(self) -> None:
        """A channel failed: end the main channel's reads, so that the main loop stops and
        reports the error."""
        self._wake_main_reader()

    def _wake_main_reader(self) -> None:
        """End the main channel's reads: a shutdown wakes a blocked recv or poll (this loop's
        or its C thread's), where a close would not."""
        sock = self.connection.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _multifd_placed(
        self, block: str, pages: int, zero: int, spent_ns: int, offsets: array[int]
    ) -> None:
        # Received, for a postcopy recovery's bitmap (before this channel posts its SYNC, so
        # before the switchover's discards clear what the source dirtied since).
        tracker = self.dest.blocks[block]
        normal = pages - zero
        mark_received(tracker.state, offsets[:normal], tracker.target_page_size)
        mark_received(tracker.state, offsets[normal:], tracker.target_page_size)
        with self._report_lock:
            self.report.placing_ns["precopy"] += spent_ns
            self.report.placed_pages["precopy"] += pages
            self.report.multifd_pages += pages
            counts = self.report.block_pages.setdefault(block, [0, 0])
            counts[0] += pages
            counts[1] += zero

    def _multifd_done(self) -> None:
        """Postcopy begins (discards or LISTEN): multifd carried precopy, and every page it
        sent before the switchover's sync is in place; one that comes later is refused."""
        if self._multifd is not None and not self._multifd.postcopy:
            self._multifd.switch()

    def _stop_multifd(self) -> None:
        if self._multifd is not None:
            self._multifd.stop()
            self.report.multifd = self._multifd.summary()
            if self.dest.multifd is not None:
                rule = self.dest.multifd
                self.report.multifd["flush_after_each_section"] = rule.flush_after_each_section

    def _answered(self, block: str, host_offset: int) -> None:
        """A page arrived: if it was requested, that request's round trip is over."""
        sent = self._awaiting.pop((block, host_offset), None)
        if sent is not None and sent[0]:
            ram = self._session().block(block)
            placed = ram.placed_at(host_offset // ram.page_size) or time.monotonic_ns()
            waited = max(0, placed - sent[0])
            self.report.request_placed_ns.append(waited)
            self.report.request_log.append((sent[0], waited, block, host_offset))

    def _start_guest(self) -> None:
        if self.workload is None or self.session is None or self.session.vcpus.threads:
            return
        largest = max(self.session.blocks, key=lambda block: block.used_length)
        share = largest.used_length // self.vcpus
        share -= share % largest.page_size
        for index in range(self.vcpus):
            workload = Workload(
                self.workload.pattern,
                write=self.workload.write,
                touches=self.workload.touches,
                seed=self.workload.seed + index,
                hot_fraction=self.workload.hot_fraction,
                hot_share=self.workload.hot_share,
                rate=self.workload.rate,
            )
            self.session.start_vcpu(largest.idstr, workload, index * share, share)

    def _start_fast(self) -> None:
        if self.fast_path and self._fast is None and self.session is not None:
            self._fast = start_fast_path(self.connection, self.dest, self.session.blocks)

    def _stop_fast(self) -> None:
        """Stop the C receive thread before its channel closes; the runner reads on."""
        if self._fast is not None:
            fast, self._fast = self._fast, None  # stopped once, even if it does not stop
            self._count_fast(fast)

    def _count_fast(self, fast: FastPath) -> None:
        """Stop a C receive thread (main or preempt channel) and add its figures to the
        report's (a preempt channel's records are counted apart as well)."""
        stats, waits = fast.stop()
        with self._report_lock:  # the two channels' threads end independently
            for name in ("bytes", "records", "placed", "existing", "place_errors", "syncs"):
                figures = self.report.fast_path
                figures[name] = figures.get(name, 0) + getattr(stats, name)
            if fast.bare:
                figures["preempt_records"] = figures.get("preempt_records", 0) + stats.records
            self.report.fast_path_wait_ns += waits

    def _on_fault(self, request: PageRequest) -> None:
        """Called on the fault thread: ask the source for the page, now. With requests sent
        from C, only for a fault that came while its sending was off: sent the C way if it
        is on now (one last-block state), else by the machine (paused: kept for the resume)."""
        requests = self._c_requests
        with self._machine_lock:
            if self.dest.state is DestinationState.FAILED:  # the loop failed meanwhile
                return
            if requests is not None:
                self._take_requests()  # the machine's last block is the C's from here
                tracker = self.dest.blocks.get(request.block)
                if tracker is not None and (
                    request.offset in tracker.requested or tracker.host_page_present(request.offset)
                ):
                    return  # what the machine would ask nothing for
                while (
                    done := requests.send(request.block, request.offset, request.fault_ns)
                ) == -2:
                    self._take_requests()
                if done:
                    self._take_requests()
                    return
            asked = self.dest.page_fault(request.block, request.offset)
            data = self._take_return_path()
            # The channel these bytes were made for: a pause may replace it before they go,
            # and a REQ_PAGES that relies on the old channel's last block must not open the
            # new one (the machine asks again there, naming the block, after the resume).
            connection = self.connection
            sent = [0]
            if asked is not None:  # registered before sending: the answer may come at once
                self._awaiting[(asked.block, asked.start)] = sent
        try:
            # Stamped before the send: the answer may be placed before this thread runs
            # again (the page was already on its way).
            sent[0] = time.monotonic_ns()
            self._send_taken(data, connection)
        except (TransportError, ValueError):
            # The channel broke (or the main loop, pausing, closed it already: a closed
            # socket's descriptor is -1): the request stays pending in the machine and is
            # sent again after the resume.
            return
        finally:
            self._release_taken(data)
        if asked is not None:
            self.report.requests += 1
            self.report.request_sent_ns.append(time.monotonic_ns() - request.fault_ns)
            self.report.request_sent_at_ns.append(sent[0])

    # --- page requests from C (qmig.ram.fault_requests) --------------------------------------

    def _fault_requests(self) -> FaultRequests | None:
        """With the fast path, the fault thread sends page requests from C; None: it hands
        them to :meth:`_on_fault` (``fast_path`` off, a stream with no socket, or a profile
        whose page requests the fast builder declines), or a connection that changes what
        it sends on purpose (``receive --delay-requests``: the C would write past it)."""
        sock = self.connection.socket
        if not self.fast_path or sock is None or isinstance(self.connection, MisbehavingConnection):
            return None
        builder = PageRequests(self.dest.reader.schema)
        if builder.req_pages is None or builder.req_pages_id is None:
            return None
        requests = FaultRequests(list(self._session().blocks), builder)
        self._send_lock = requests.lock  # before the fault thread runs: nobody sends yet
        self._c_requests = requests
        return requests

    def _fault_requests_on(self) -> None:
        """The guest runs here (RUN, or POSTCOPY_RESUME once its replies are out): the C
        asks for pages on this channel, going on from the machine's last block."""
        requests, sock = self._c_requests, self.connection.socket
        if requests is None or sock is None or not self.dest.return_path_open:
            return
        with self._machine_lock:
            self._take_requests()
            if is_postcopy_running(self.dest.state):
                requests.enable(sock.fileno(), self.dest.last_requested_block)

    def _fault_requests_off(self) -> None:
        """Before the channel goes (paused, cut, ended): faults are held for the machine,
        and what the C sent is told to it, its last block included."""
        requests = self._c_requests
        if requests is None:
            return
        with self._machine_lock:
            requests.disable()
            self._take_requests()

    def _take_requests(self) -> None:
        """Tell the machine, in order, what the C sent; time each (machine lock held)."""
        faults = self.session.faults if self.session is not None else None
        if faults is None or self._c_requests is None:
            return
        taken = faults.take_sent()
        for sent in taken:
            if self.dest.state is not DestinationState.FAILED:
                self.dest.request_sent_elsewhere(
                    sent.block, sent.host_offset, sent=bool(sent.sent_ns)
                )
            if not sent.sent_ns:
                continue
            # Written to the socket by the C: the limits count them as if sent here.
            self.connection.sent_elsewhere(self._c_requests.size(sent.block, sent.with_id))
            key = (sent.block, sent.host_offset)
            self._awaiting[key] = [sent.sent_ns]
            self.report.requests += 1
            self.report.request_sent_ns.append(sent.done_ns - sent.read_ns)
            self.report.request_sent_at_ns.append(sent.sent_ns)
            ram = self._session().block(sent.block)
            if ram.host_page_received(sent.host_offset // ram.page_size):
                self._answered(*key)

    # --- the end --------------------------------------------------------------------------

    def _finish(self) -> None:
        session = self.session
        if session is None:
            return
        if self.workload is not None:
            try:
                results = session.vcpus.join(timeout=self.idle_timeout)
            except RamError as error:
                # Blocked on a page that never came: name the pages still awaited.
                raise TransportError("guest workload", f"{error}; {self._awaited_text()}") from None
            self.report.workload = [vars(result) for result in results]
        if session.faults is not None:
            with self._machine_lock:
                self._take_requests()
            stats = session.faults.stats(self.vcpus if self.workload else None)
            self.report.faults = {
                "faults": stats.faults,
                "requests": stats.requests,
                "repeat_faults": stats.repeat_faults,
                "late_faults": stats.late_faults,
                "stray_faults": stats.stray_faults,
                "latency_ns": vars(stats.latency),
                "blocktime_ns": stats.blocktime_ns,
                "all_blocked_ns": stats.all_blocked_ns,
                "blocktime_ns_by_thread": stats.blocktime_ns_by_thread,
                # QEMU 10.1's query-migrate form: postcopy_latency_ns, postcopy_latency_dist.
                **qemu_latency_figures(session.faults.latencies_ns()),
            }
        if self.dump_dir is not None:
            self.dump(self.dump_dir)

    def _awaited_text(self) -> str:
        """The host pages asked for and not in place, for an error line."""
        with self._machine_lock:
            self._take_requests()
            pending = self.dest.pending_requests()
        if not pending:
            return "no requested page is missing"
        shown = ", ".join(f"{block} 0x{offset:x}" for block, offset in pending[:4])
        more = f" and {len(pending) - 4} more" if len(pending) > 4 else ""
        return f"requested and not received: {shown}{more}"

    def dump(self, directory: Path) -> None:
        """Each block's contents to ``DIR/<idstr>.bin``, once every page is in place."""
        directory.mkdir(parents=True, exist_ok=True)
        session = self._session()
        for idstr, used in self.report.blocks.items():
            block = session.block(idstr)
            path = directory / (idstr.replace("/", "_") + ".bin")
            with path.open("wb") as file:
                step = 64 << 20
                for offset in range(0, used, step):
                    file.write(block.read(offset, min(step, used - offset)))

    def _abandon(self) -> None:
        self._fault_requests_off()  # no request after the SHUT
        with self._machine_lock:
            data = self.dest.fail("error")
        if data:
            try:
                with self._send_lock:
                    self.connection.sendall(data)
            except (TransportError, ValueError):  # broken, or closed by a failed pause
                pass

    def _with_context(self, error: QmigError) -> QmigError:
        """Name where the migration was when the transport failed."""
        if isinstance(error, TransportError):
            phase = self.dest.phase_name
            return TransportError(
                error.what,
                f"{error.detail} during {phase}",
                self.dest.reader.offset,
            )
        return error

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()

    def _session(self) -> RamSession:
        if self.session is None:
            raise RemoteProtocolError("RAM", "page data before the MEM_SIZE block list")
        return self.session


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's RAM in bytes (MemTotal), or None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemTotal":
                return int(value.split()[0]) * 1024  # the kernel's kB are KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit
