"""Running a :class:`~qmig.protocol.destination.Destination` over a connection, onto real RAM.

The main thread reads the stream, feeds the machine and applies its decisions to a
:class:`~qmig.ram.session.RamSession`: map the blocks when MEM_SIZE announces them, discard
ranges, place pages with userfaultfd, start the guest workload at RUN. Other threads share the
machine with it, under one lock, each joined to it by a module of its own: the fault thread's
page requests (:mod:`qmig.runner.requester`, on a return path whose writers keep the machine's
order, :mod:`qmig.runner.return_path`), the preempt channel's reader
(:mod:`qmig.runner.preempt_recv`), the multifd channels' (:mod:`qmig.runner.multifd_dest`)
and, once the guest runs here, the C receive threads (:mod:`qmig.runner.fastpath`). Nothing
here reads guest memory before every page is in place.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from qmig.errors import QmigError, RemoteProtocolError, TransportError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.multifd import MultifdSyncPoint
from qmig.protocol.states import DestinationState
from qmig.ram.blocks import HOST_PAGE_SIZE, BlockSpec, RamBlock
from qmig.ram.errors import RamError
from qmig.ram.session import RamSession
from qmig.ram.workload import Workload
from qmig.runner.channels import Channels, CutPlan
from qmig.runner.destination_report import DestinationReport, fault_figures
from qmig.runner.fastpath import FastPath, start_fast_path
from qmig.runner.multifd_dest import multifd_receiver
from qmig.runner.multifd_recv import MultifdReceiveOptions
from qmig.runner.pauses import Pause
from qmig.runner.preempt_recv import PreemptReceiver
from qmig.runner.requester import PageRequester
from qmig.runner.return_path import ReturnPath
from qmig.transport import Connection, Limits
from qmig.wire import messages as m

RECV_CHUNK = 1 << 20
POSTCOPY_DATA_RUN = 1  # data pages per UFFDIO_COPY after LISTEN (see _apply)
IDLE_TIMEOUT = 60.0
RECOVER_TIMEOUT = 600.0  # paused: how long to wait for the source's new channel


class DestinationRunner:
    # What reads the preempt channel (a subclass may watch it at work).
    preempt_receiver: type[PreemptReceiver] = PreemptReceiver
    # The userfaultfd events its RAM's descriptor asks for (RamSession's ``events``): none,
    # qmig serves page faults only; a subclass may ask for some, to meet them.
    uffd_events = 0

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
        self._return_path = ReturnPath(destination, self.channels)
        self._requests = PageRequester(
            destination, self.channels, self._machine_lock, self._return_path, self.report
        )
        self._discard_prepared = False
        self.completed = False  # the machine said MigrationCompleted
        self._broke_at: float | None = None
        self._fast: FastPath | None = None  # the C receive thread, while the guest runs here
        self.fast_path = fast_path
        self._report_lock = threading.Lock()  # placements come from two threads with preempt
        self._preempt = self.preempt_receiver(
            self.channels,
            destination,
            self._machine_lock,
            report=self.report,
            report_lock=self._report_lock,
            return_path=self._return_path,
            requests=self._requests,
            idle_timeout=idle_timeout,
            recover_timeout=recover_timeout,
            chunk=RECV_CHUNK,
            place=lambda run, ahead: self._place(run, replace=False, placed_ahead=ahead),
            count_fast=self._count_fast,
            wake_main=self._wake_main_reader,
            fast_blocks=self._fast_blocks,
        )
        self._multifd = multifd_receiver(
            self.channels,
            destination,
            multifd_channels,
            multifd or MultifdReceiveOptions(),
            report=self.report,
            report_lock=self._report_lock,
            idle_timeout=idle_timeout,
            on_error=self._wake_main_reader,
        )

    @property
    def connection(self) -> Connection:
        return self.channels.main

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> DestinationReport:
        self.report.started = time.monotonic()
        buffer = bytearray(RECV_CHUNK)
        if self.connection.meter is None:  # the caller's limits, or at least the idle one
            self.connection.set_limits(Limits(self.idle_timeout, peer="the source"))
        self._return_path.bound()
        ended = False  # the migration is done here, and nothing failed
        try:
            if self._multifd is not None:
                self._multifd.start()
            self._preempt.start()
            while not self.completed:
                try:
                    self._step(buffer)
                except TransportError as error:
                    if self._preempt.error is not None:
                        raise self._preempt.error from None
                    if self._multifd is not None and self._multifd.error is not None:
                        raise self._multifd.error from None
                    if not self._pause(error.detail):
                        raise
            self._preempt.end()
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
            if self._preempt.error is not None:
                raise self._preempt.error from None
            raise self._with_context(error) from None
        finally:
            # Every thread is stopped, each within its own bound; one that did not stop is
            # the error of a run that had none (a failed run's own error comes first).
            stuck: QmigError | None = None
            for stop in (
                self._requests.off,
                self._stop_fast,
                self._preempt.stop,
                self._stop_multifd,
            ):
                try:
                    stop()
                except QmigError as error:
                    stuck = stuck or error
            self._preempt.close()
            self.report.finished = time.monotonic()
            # Kept only after a migration that ended well: one whose preempt channel failed
            # at its end completed its main stream, and its fault thread must stop too.
            if not (self.keep_ram and ended and self.session):
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
        if self.dest.state is DestinationState.RECOVER:
            # Before a RECV_BITMAP is answered, or a POSTCOPY_RESUME asks for the rest.
            self._learn_placed_pages()
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
                self._requests.off()
                self.channels.cut()
                raise TransportError(self.connection.name, "channel cut during recovery")
        elif cuts.due(self.report.placed_pages["postcopy"]):
            cuts.done += 1
            self._stop_fast()
            self._requests.off()
            self.channels.cut()
            raise TransportError(self.connection.name, "channel cut on purpose")

    def _pause(self, cause: str) -> bool:
        """The channel broke: pause and take the source's next channel, if the migration
        can recover here (after RUN, with a way to accept one). False: it cannot; the
        caller fails as without recovery."""
        self._stop_fast()
        self._requests.off()  # the machine asks again after POSTCOPY_RESUME
        if not self.channels.can_reopen:
            return False
        with self._machine_lock:
            if not self.dest.can_pause:
                return False
            self.dest.channel_broken()
        self._preempt.stop()  # the source's pause ends its preempt channel as well
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
        self._learn_placed_pages()
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
        self._return_path.bound()
        with self._machine_lock:
            self.dest.new_channel()
        self._preempt.restart()
        return True

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
                data = self._return_path.take()
            try:
                if broken is None:
                    self._return_path.send_taken(data)
            except TransportError as error:
                broken = error
            finally:
                self._return_path.release(data)
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
                self._requests.on()
                self._preempt.guest_running()
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
                self._requests.on()
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
        self.session = RamSession(specs, register=False, events=self.uffd_events)
        if not all(block.maps_huge_zero_page for block in self.session.blocks):
            self.session.prepare_discard()
            self._discard_prepared = True
        self.session.start_faults(
            on_request=self._requests.on_fault,
            requests=self._requests.start(self.session, from_c=self.fast_path),
        )
        self.report.blocks = {info.idstr: info.used_length for info in blocks}

    def _place(self, run: m.RamPageRun, *, replace: bool, placed_ahead: bool = False) -> None:
        """Place a run of pages with one C call (``RamBlock.place_records``). Before LISTEN
        the blocks are not registered and pages are written straight into memory; a page that
        comes again (the guest changed it) simply overwrites the old one, as in QEMU. After
        LISTEN each run of missing pages goes in with one UFFDIO_COPY or ZEROPAGE.
        ``placed_ahead``: a C receive thread on the run's channel may have placed it."""
        block = self._session().block(run.block)
        if not replace:
            self._requests.placing()
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
        if not replace:
            self._requests.placed(block)

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

    # --- the other readers: the C receive threads, the preempt and multifd channels ----------

    def _start_fast(self) -> None:
        if self.fast_path and self._fast is None and self.session is not None:
            self._fast = start_fast_path(self.connection, self.dest, self.session.blocks)

    def _fast_blocks(self) -> Iterable[RamBlock] | None:
        """The RAM a C receive thread may place into now: once the guest runs here, with the
        fast path; None before, or without it."""
        if not self.fast_path or self.report.running_at is None or self.session is None:
            return None
        return self.session.blocks

    def _learn_placed_pages(self) -> None:
        """Paused: the machine learns which pages are in place from the RAM's received map
        (the record of every placement, as QEMU's receivedmap), among them pages a C thread
        placed though the machine has not read their records (what its ring held when it
        was stopped). Its RECV_BITMAP then counts them received, so that the source does not
        send them again, and its POSTCOPY_RESUME does not ask for them again. The pause's
        figures say what the map holds, and how many of those pages the machine learned of
        here."""
        session = self.session
        if session is None:
            return
        learned = 0
        with self._machine_lock:
            for block in session.blocks:
                learned += self.dest.pages_placed_elsewhere(block.idstr, block.received.copy())
        if not self.report.pauses:
            return
        pause = self.report.pauses[-1]
        pause.received_pages = sum(block.received.count() for block in session.blocks)
        pause.placed_ahead = (pause.placed_ahead or 0) + learned

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

    def _wake_main_reader(self) -> None:
        """End the main channel's reads: a shutdown wakes a blocked recv or poll (this loop's
        or its C thread's), where a close would not."""
        sock = self.connection.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

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

    # --- the end --------------------------------------------------------------------------

    def _finish(self) -> None:
        session = self.session
        if session is None:
            return
        if self.workload is not None:
            try:
                results = session.vcpus.join(timeout=self.idle_timeout)
            except RamError as error:
                self._fault_thread_failed()  # the likelier cause of a vCPU left blocked
                # Blocked on a page that never came: name the pages still awaited.
                awaited = self._requests.awaited_text()
                raise TransportError("guest workload", f"{error}; {awaited}") from None
            self.report.workload = [vars(result) for result in results]
        if session.faults is not None:
            self._requests.take_now()
            stats = session.faults.stats(self.vcpus if self.workload else None)
            self.report.faults = fault_figures(stats, session.faults.latencies_ns())
            self._fault_thread_failed()
        if self.dump_dir is not None:
            self.dump(self.dump_dir)

    def _fault_thread_failed(self) -> None:
        """Raise what stopped the fault thread, if anything did (a failed read, or registered
        RAM changed under it): the pages it serves can no longer be trusted."""
        faults = self._session().faults
        if faults is not None and isinstance(faults.error, QmigError):
            raise faults.error from None

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
        self._requests.off()  # no request after the SHUT
        with self._machine_lock:
            data = self.dest.fail("error")
        # Broken, or closed by a failed pause.
        with contextlib.suppress(TransportError, ValueError):
            self._return_path.send(data)

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
