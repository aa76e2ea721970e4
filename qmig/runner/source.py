"""Running a :class:`~qmig.protocol.source.Source` over a connection.

One thread: it sends the stream in chunks under a bandwidth cap and, whenever it would wait
(for the cap, or for room in the socket), reads the return path, so that page requests jump
the queue. The guest dirtier runs in steps of the same loop until switchover.

The cap is applied as QEMU applies its own: a quota of bytes per 100 ms window, sent as fast
as the socket takes it, then nothing from the migration's own loop until the next window
(requested pages on the main channel included); the switchover (sent while the guest is
stopped) and a precopy migration's completion do not wait, though their bytes count. The
preempt channel's urgent pages follow the thread that sends them in the QEMU of the profile
(``preempt_sender``): from 8.0 on (either variant) the return-path thread sends them as the
request is read, so they do not wait; QEMU 7.2's migration thread sends them, so a request
read once the window's quota is spent waits for the next window, and goes first in it (their
bytes count on the preempt channel's own QEMUFile, never against the main channel's quota).
Whether urgent pages use up the window's quota is the profile's too
(``preempt_in_rate_limit``): from QEMU 8.1 one counter of every channel's bytes makes the
rate, so the main channel's background pages get what the preempt channel left.

Requests are answered from C as they are read (``SourcePlan.fast_answer``, see
:mod:`qmig.runner.answer`, joined to this loop by :mod:`qmig.runner.answer_control`): on the
8.0 preempt variant's channel, or, without preempt, on the main channel between the pieces of
stream this loop writes (each piece is built and written holding the channel,
:meth:`AnswerControl.turn <qmig.runner.answer_control.AnswerControl.turn>`), where a RAM record
may go and the window has quota left; what the thread cannot answer at once is this loop's,
first in its next piece. A pause stops the thread (its channels are gone, and the bitmap sync
gives the machine new dirty maps); once the migration is back in postcopy on the new channels,
a new thread takes the return path over at the first byte that starts a message. The pre-7.2
preempt variant has no thread: its urgent pages are the migration thread's, as in QEMU 7.2.

A requested page waits behind every byte already queued towards the destination: the
unsent rest of the current chunk, the source's socket send buffer and the destination's
receive buffer. Linux autotunes both buffers to megabytes on loopback, which at the
destination's placement rate is tens of milliseconds per request. So the runner keeps its
send buffer small in postcopy (``SourcePlan.send_buffer``, set once the switchover is out;
precopy keeps the kernel's autotuning, which streams fastest, into a real QEMU by far; the
destination bounds its receive buffer), sends postcopy in small chunks, and never blocks in
``sendall``: it selects for room and for return-path data together, so a REQ_PAGES is read
as soon as it arrives and its pages go out in the next chunk.

With the send buffer that small, no write may fill it alone
(:meth:`SourceRunner._limit_send_buffer`): loopback's segment is 64 KiB, as large as the
whole buffer, so a bigger write went out as one full segment, and nothing could follow until
it was acknowledged. A receiver acknowledges at once every second full segment, or a read
that opens a window its buffer had closed; a lone segment whose window stays open (an
autotuned or large receive buffer) waits for the delayed-ACK timer, 40 ms. The main channel
then moved 64 KiB per tick, about 1.5 MiB/s whatever the cap, whenever no return-path
message came along to carry the acknowledgement back: with preempt, as soon as the vCPUs
were blocked on pages already sent there, which then waited up to half a second.

The runner follows the machine by its events, not by looking at it: PhaseChanged says where
it is, PassCompleted when to decide what follows a precopy pass. A pass completion is acted
on once the bytes that ended the pass are written, never from inside a write (which reads
the return path while it waits), so the stream's bytes stay in the machine's order.
"""

from __future__ import annotations

import select
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qmig.errors import TransportError
from qmig.protocol import events as ev
from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.runner.answer import FastAnswer
from qmig.runner.answer_control import AnswerControl
from qmig.runner.cap_window import CapWindow
from qmig.runner.channels import PREEMPT, Channels, CutPlan
from qmig.runner.multifd_send import MultifdSender
from qmig.runner.pauses import Pause
from qmig.runner.source_ram import Dirtier
from qmig.runner.source_report import SourceReport
from qmig.transport import Connection
from qmig.wire.reader import NEED_DATA

CHUNK = 256 << 10  # precopy: stream bytes per data_to_send
# One C sweep's bytes at most (SourceRunner._sweep): it writes them in pieces of
# POSTCOPY_CHUNK with the answer thread's requests going first between them, but this loop
# reads nothing else of the return path meanwhile.
SWEEP = 1 << 20
POSTCOPY_CHUNK = 32 << 10  # postcopy: what a newly requested page may queue behind, at most
SEND_BUFFER = 32 << 10  # SO_SNDBUF (the kernel doubles it)
STALL_TIMEOUT = 60.0  # the destination took no bytes and said nothing for this long
SHUT_TIMEOUT = 60.0
CAP_WINDOW = 0.1  # seconds: the cap's quota is its rate × this per window (BUFFER_DELAY)
MAX_PRECOPY_PASSES = 30
RECOVER_TIMEOUT = 60.0  # a recovery handshake (or a new channel) that takes longer fails
PREEMPT_TIMEOUT = 30.0  # opening the preempt channel (and the PONG it waits for)
# States in which a broken channel pauses the migration instead of failing it.
RECOVERABLE = frozenset({SourceState.POSTCOPY, SourceState.COMPLETING, SourceState.RECOVER})


@dataclass
class SourcePlan:
    """When to switch: after ``postcopy_after`` precopy passes, or never (precopy only)."""

    postcopy_after: int | None = 1
    bandwidth: float | None = None  # bytes per second, None: unlimited
    converge_pages: int = 64  # precopy only: stop when at most this many pages are dirty
    # SO_SNDBUF from the switch to postcopy on; None: leave the kernel's autotuning.
    send_buffer: int | None = SEND_BUFFER
    postcopy_chunk: int = POSTCOPY_CHUNK
    cuts: CutPlan | None = None  # break the channel on purpose (fault injection)
    recover_timeout: float = RECOVER_TIMEOUT
    # Requests answered by a C thread as they are read (see qmig.runner.answer): on the 8.0
    # preempt variant's channel, or without preempt on the main channel; a new thread after
    # each recovery. False: by this loop.
    fast_answer: bool = False
    # Beside that thread: the background sweep's pages written from C too
    # (qmig.runner.sweep.c), the machine picking where each batch starts and learning what
    # went out. False: built by the machine, written by this loop.
    fast_sweep: bool = True


class SourceRunner:
    def __init__(
        self,
        connection: Connection | Channels,
        source: Source,
        plan: SourcePlan,
        *,
        dirtier: Dirtier | None = None,
        on_progress: Callable[[str, int], None] | None = None,
    ) -> None:
        """``connection``: the channel, or the migration's :class:`Channels` (which can open
        a new one: a broken channel in postcopy is then recovered, as QEMU's source does
        when resumed, instead of failing the migration)."""
        self.channels = connection if isinstance(connection, Channels) else Channels(connection)
        self.source = source
        self.plan = plan
        self.dirtier = dirtier
        self.on_progress = on_progress
        self.report = SourceReport()
        self._sent = 0
        self._clock = 0.0
        self._rp_buffer = bytearray(64 << 10)
        self._answered = 0  # requests whose pages are all in the socket
        self._piece = CHUNK  # the most one write hands the main channel's socket
        # The bandwidth cap's window (see _wait_for_credit): when it began, bytes sent in it.
        self._window = CapWindow(
            plan.bandwidth, CAP_WINDOW, every_channel=source.profile.preempt_in_rate_limit
        )
        # QEMU 7.2: the migration thread sends the preempt channel's pages, so the cap's
        # spent window holds them as it holds the main channel's (see _urgent_held).
        self._urgent_capped = (
            source.preempt is not None and source.profile.preempt_sender == "migration-thread"
        )
        self.phase = source.state  # as the machine's PhaseChanged events last said
        self._passes_done: deque[ev.PassCompleted] = deque()
        self.multifd: MultifdSender | None = None
        if source.multifd is not None:
            self.multifd = MultifdSender(self.channels, source.multifd)
        self._answers = AnswerControl(
            source,
            self.channels,
            self.report,
            self._window,
            enabled=plan.fast_answer,
            stall_timeout=STALL_TIMEOUT,
            await_room=self._await_room,
        )
        # Requests the C thread answered, by their index in the report: read → written (ns).
        self._fast_served: dict[int, int] = {}
        self._cut_due = False  # the plan's cut is due: see _maybe_cut, _cut

    @property
    def connection(self) -> Connection:
        return self.channels.main

    def run(self) -> SourceReport:
        try:
            return self._run()
        finally:
            self._answers.stop()

    def _run(self) -> SourceReport:
        source, plan = self.source, self.plan
        self.report.started = self._clock = self._window.at = time.monotonic()
        if source.preempt is not None and source.preempt.opened_at_setup:
            self.channels.open(PREEMPT, PREEMPT_TIMEOUT)
        if self.multifd is not None:
            self.multifd.open()
        source.start()
        self._take_events()
        if plan.postcopy_after == 0:
            self._switch_over()
        while self.phase in (SourceState.PRECOPY, SourceState.PASS_COMPLETE):
            data = source.data_to_send(CHUNK)
            self._take_events()
            self._send(data)
            while self._passes_done:
                self._end_of_pass(self._passes_done.popleft())
        while True:
            try:
                self._postcopy_to_the_end()
                break
            except TransportError as error:
                if self._cut_due:
                    self._cut()
                if not (self.channels.can_reopen and self.phase in RECOVERABLE):
                    raise
                self._recover(error)
        self.report.finished = time.monotonic()
        self.report.passes = source.stats.passes
        self.report.pongs = list(source.pongs)
        self.report.recoveries = source.stats.recoveries
        self.report.channels = self.channels.opened
        self._answers.stop()
        self.report.preempt_pages = source.preempt_pages
        if self.multifd is not None:
            self.report.multifd_bytes = list(self.multifd.bytes_sent)
        return self.report

    def _postcopy_to_the_end(self) -> None:
        source = self.source
        while self.phase is SourceState.POSTCOPY:
            known = len(self.report.requests)
            self._send_urgent()
            # As in QEMU's migration thread: nothing goes out on the main channel once the
            # window's quota is spent; within a window requested pages go first, and past it.
            self._wait_for_credit()
            self._send_urgent()  # held ones first, before the window's burst is made
            with self._answers.turn():
                requested = source.requested_data()
                if requested:
                    self._send(requested, capped=False)
                elif not self._sweep():
                    # The window's quota goes as one burst of pieces back to back, each built
                    # within what the window has left and written whole: QEMU checks the rate
                    # before each page and sends the page that crosses it whole, so a window
                    # never ends inside a page's record, and the pages its burst did not reach
                    # are still dirty (a request for one goes on the preempt channel at once).
                    # A piece is a chunk at most: no more pages leave the dirty map ahead of
                    # the socket than QEMU's buffer holds, and the C thread answering on the
                    # main channel waits for one piece, not the whole burst.
                    with self._answers.picking():
                        data = source.data_to_send(self._piece_budget())
                    self._take_events()
                    self._send(data, capped=False)
            if known > self._answered and source.pending_requests == 0:
                self._served(known)
        # The end of the stream; after precopy, the last pages, sent with the guest stopped:
        # QEMU's completion does not wait for the cap either.
        with self._answers.turn():
            with self._answers.picking():
                data = source.data_to_send(CHUNK)
            self._take_events()
            self._send(data, capped=False)
        self._send_urgent()  # the pre-7.2 variant's EOS
        # Every page is in the socket now: requests that came with the last of the stream,
        # or come after it, are answered by it.
        self._served(len(self.report.requests))
        deadline = time.monotonic() + SHUT_TIMEOUT
        while self.phase is SourceState.COMPLETING:
            if time.monotonic() > deadline:
                raise TransportError(
                    self.connection.name,
                    f"no SHUT from the destination within {SHUT_TIMEOUT:.0f} s",
                )
            self._poll_return_path(1.0)
            self._served(len(self.report.requests))

    # --- postcopy recovery ----------------------------------------------------------------

    def _recover(self, error: TransportError) -> None:
        """Pause, then resume on a new channel until RESUME_ACK (QEMU's postcopy-paused,
        then ``migrate`` with ``resume: true``). A new channel that breaks during the
        handshake pauses again and is replaced again, until the recovery timeout."""
        source = self.source
        broke = time.monotonic()
        deadline = broke + self.plan.recover_timeout
        pause = Pause(broke, error.detail, self._sent, source.stats.postcopy_pages)
        self.report.pauses.append(pause)
        self._answers.pause()
        if source.state is not SourceState.PAUSED:
            source.channel_broken()
            self._take_events()
        self.channels.close(PREEMPT)  # QEMU's pause shuts the preempt channel down too
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(
                    self.connection.name,
                    f"postcopy paused ({error.detail}) and not resumed within "
                    f"{self.plan.recover_timeout:g} s",
                )
            self.channels.reopen(left)
            pause.channels += 1
            preempt = source.preempt
            if preempt is not None and preempt.opened_at_setup:
                # As at setup: right after the main channel (the destination waits for both).
                self.channels.open(PREEMPT, max(0.1, deadline - time.monotonic()))
            source.resume()
            self._take_events()
            try:
                self._handshake(deadline)
                break
            except TransportError as again:
                error = again
                source.channel_broken()  # a double failure: pause again
                self._take_events()
        pause.resumed_at = time.monotonic()
        self.report.paused_s += pause.resumed_at - broke
        self._limit_send_buffer()
        # A new thread on the new channels (the 8.0 variant's preempt channel was opened
        # again after the bitmap sync): the requests the destination sends again after
        # POSTCOPY_RESUME that the handshake read are the machine's, the rest the thread's.
        self._answers.want(self.phase)

    def _handshake(self, deadline: float) -> None:
        """RECV_BITMAPs out, bitmaps in, POSTCOPY_RESUME out, RESUME_ACK in."""
        cuts = self.plan.cuts
        while self.phase is SourceState.RECOVER:
            data = self.source.data_to_send(0)
            if data:
                self._send(data, capped=False)
                if cuts is not None and cuts.cut_recovery_now():
                    self.channels.cut()
                    raise TransportError(self.connection.name, "channel cut during recovery")
            if time.monotonic() > deadline:
                raise TransportError(self.connection.name, "no RESUME_ACK in time")
            self._poll_return_path(0.5)
            if self.source.awaiting_preempt_channel:
                self.channels.open(PREEMPT, max(0.1, deadline - time.monotonic()))
                self.source.preempt_channel_opened()

    def _maybe_cut(self) -> None:
        """Fault injection: break the channel once the plan's page count is reached and the
        destination runs (a break before RUN fails a migration rather than pausing it). No
        more of the stream is written; the channel breaks once the loop has let go of it
        (:meth:`_cut`)."""
        cuts = self.plan.cuts
        if cuts is None or self.phase is not SourceState.POSTCOPY:
            return
        if cuts.due(self.source.stats.postcopy_pages) and self.source.destination_runs:
            cuts.done += 1
            self._cut_due = True
            raise TransportError(self.connection.name, "channel cut on purpose")

    def _cut(self) -> None:
        """The deliberate cut: the answer thread stopped first, then the channel broken.
        The thread reads the return path from the main socket (and without preempt writes
        there): closed under it, its descriptor could be another file's by the time it reads
        or writes again. Stopping it joins it, and it may be waiting for the wire, which the
        loop holds while it writes a piece of stream: so this runs once the write that made
        the cut due has let go of the wire."""
        self._cut_due = False
        self._answers.pause()
        self.channels.cut()

    def _served(self, upto: int) -> None:
        """Every request before ``upto`` has its pages in the socket (or had them already)."""
        now = time.monotonic()
        requests = self.report.requests
        for index in range(self._answered, upto):
            served = self._fast_served.pop(index, None)
            if served is None:
                served = int((now - requests[index][0]) * 1e9)
            self.report.served_ns.append(served)
        self._answered = upto

    def _end_of_pass(self, event: ev.PassCompleted) -> None:
        source, plan = self.source, self.plan
        self._sync_dirty()
        passes = event.passes
        if plan.postcopy_after is not None and passes >= plan.postcopy_after:
            self._switch_over()
        elif plan.postcopy_after is None and (
            source.dirty_pages() <= plan.converge_pages or passes >= MAX_PRECOPY_PASSES
        ):
            self._stop_guest()
            source.complete_precopy()
        else:
            source.begin_pass()
        self._take_events()

    def _sweep(self) -> bool:
        """The background sweep's next batch written from C (``SourcePlan.fast_sweep``),
        beside the answer thread; False: no thread, or not now (requests queued, the stream's
        end), the machine's own :meth:`Source.data_to_send` instead.

        Within the loop's turn: the machine orders the batch (and opens a section first if
        need be), the C sweep takes its pages from the dirty map and writes them (where the
        thread answers on the main channel, its answers go first between two writes), and
        the machine learns what went out (and closes the section once full). The turn lets
        go of the channel as the sweep returns, since what follows writes nothing: the
        thread answers meanwhile, and a full section's end goes out in a turn of its own."""
        fast = self._answers.fast
        if fast is None or not self.plan.fast_sweep:
            return False
        source = self.source
        order = source.sweep_order(self._sweep_budget())
        if order is None:
            return False
        self._send(source.data_to_send(0), capped=False)  # a section's start
        window = self._window
        result = fast.sweep(order, batch=self._piece, credit=window.credit(), window_end=window.end)
        self._sent += result.bytes
        window.used += result.bytes  # before the thread is let go: its credit is what is left
        self._answers.let_go()
        source.swept(
            order, pages=result.pages, last=result.last, zeros=result.zeros, size=result.bytes
        )
        totals = self.report.fast_answer
        totals["swept_pages"] = totals.get("swept_pages", 0) + result.pages
        if self.on_progress is not None:
            self.on_progress(self._label(), result.bytes)
        self._take_events()
        if end := source.data_to_send(0):  # a full section's end: the wire held again
            with self._answers.turn():
                self._send(end, capped=False)
        self._maybe_cut()
        return True

    def _sweep_budget(self) -> int:
        """The bytes of one C sweep: what the window has left (at least a page), SWEEP at
        most. One piece where a cut is planned, which counts pages between sweeps; and under
        a cap beside a preempt thread, whose pages the window may count (QEMU 8.1+) and which
        the sweep does not stop for: the window's credit is then taken again each piece."""
        credit = self._window.credit()
        beside_preempt = credit is not None and not self._answers.main
        one_piece = self.plan.cuts is not None or beside_preempt
        most = self.plan.postcopy_chunk if one_piece else SWEEP
        if credit is None:
            return most
        return min(most, max(credit, self.source.target_page_size))

    def _piece_budget(self) -> int:
        """The bytes of background stream to build now: a chunk at most, and under a cap
        what the window has left once the answer thread's pages are counted in (at least a
        page: QEMU sends the page that crosses the quota)."""
        chunk = self.plan.postcopy_chunk
        credit = self._window.credit()
        if credit is None:
            return chunk
        return min(chunk, max(credit, self.source.target_page_size))

    def _send_urgent(self) -> None:
        """Postcopy-preempt: requested pages out on the preempt channel at once, whatever
        the main channel is in the middle of (QEMU 8.0's return-path thread sends them as
        it reads the request; the cap does not hold them either). QEMU 7.2's are held while
        the window's quota is spent (:meth:`_urgent_held`)."""
        if self.source.preempt is None or self._urgent_held():
            return
        with self._answers.picking():
            data = self.source.preempt_data()
        if not data:
            return
        if not self._answers.write(data):
            channel = self.channels.get(PREEMPT)
            if channel is None:
                raise TransportError(self.connection.name, "pages to send and no preempt channel")
            channel.sendall(data)
        self.report.preempt_bytes += len(data)
        self._window.count(len(data), preempt=True)
        known = len(self.report.requests)
        if known > self._answered and self.source.pending_requests == 0:
            self._served(known)

    def _urgent_held(self) -> bool:
        """Does the cap hold the preempt channel's pages now? Only where the migration
        thread sends them (QEMU 7.2), in postcopy, while the window's quota is spent: QEMU
        7.2's return-path thread queues the request and wakes the migration thread
        (migration_make_urgent_request), whose qemu_savevm_state_iterate returns before the
        RAM code while the main file is over its quota (qemu_file_rate_limit). The next
        window sends them first (:meth:`_wait_for_credit`)."""
        window = self._window
        if not self._urgent_capped or window.rate is None or self.phase is not SourceState.POSTCOPY:
            return False
        return window.spent(time.monotonic())

    def _open_preempt_late(self) -> None:
        """The 8.0 variant: the preempt channel opens as postcopy starts, once the main
        channel has had a PONG back, so that it is the destination's second connection."""
        self._send(self.source.data_to_send(0), capped=False)  # the PING, if still queued
        deadline = time.monotonic() + PREEMPT_TIMEOUT
        while not self.source.pongs:
            if time.monotonic() > deadline:
                raise TransportError(
                    self.connection.name, "no PONG before the preempt channel was to open"
                )
            self._poll_return_path(0.1)
        self.channels.open(PREEMPT, PREEMPT_TIMEOUT)

    def _switch_over(self) -> None:
        preempt = self.source.preempt
        if preempt is not None and not preempt.opened_at_setup:
            self._open_preempt_late()
        self._stop_guest()
        self.source.start_postcopy()
        self._take_events()
        # The switchover (discards, then the package that ends in RUN) goes out through the
        # buffer precopy streamed with. After it, a requested page waits behind whatever is
        # queued, so the buffer shrinks (the kernel takes nothing more until it drains).
        # Sent during the downtime, so not held to the cap (nor is QEMU's).
        self._send(self.source.data_to_send(0), capped=False)
        self._limit_send_buffer()
        self._answers.want(self.phase)

    def _limit_send_buffer(self) -> None:
        """Postcopy's small send buffer (``SourcePlan.send_buffer``), and writes of at most
        half what the kernel keeps for it (it doubles the value): at least two segments fit,
        and the receiver acknowledges the second at once, instead of after its delayed-ACK
        timer (see the module's notes)."""
        send_buffer = self.plan.send_buffer
        if send_buffer is None:
            return
        self.connection.limit_buffers(send=send_buffer)
        self._piece = max(1, min(CHUNK, self.plan.postcopy_chunk, send_buffer))

    def _stop_guest(self) -> None:
        self._advance_dirtier()
        self._sync_dirty()
        self.dirtier = None
        self.report.stopped = time.monotonic()

    def _sync_dirty(self) -> None:
        if self.dirtier is None:
            return
        for block, pages in self.dirtier.collect().items():
            self.source.sync_dirty(block, pages)

    def _advance_dirtier(self) -> None:
        now = time.monotonic()
        if self.dirtier is not None:
            self.dirtier.step(now - self._clock)
        self._clock = now

    def _send(self, data: bytes, *, capped: bool = True) -> None:
        """Write ``data`` whole; ``capped``: each piece waits for the cap first. With
        multifd, the packets and main-channel bytes the machine made before ``data`` first."""
        if self.multifd is not None:
            self._send_multifd_steps(capped)
        self._send_main(data, capped=capped)

    def _send_multifd_steps(self, capped: bool) -> None:
        assert self.multifd is not None
        steps = self.source.take_multifd_steps()
        if not steps:
            return
        written = self.multifd.drain(
            steps, lambda data: self._send_main(data, capped=capped), self._packet_out(capped)
        )
        self._sent += written
        if self.on_progress is not None:
            self.on_progress(self._label(), written)

    def _packet_out(self, capped: bool) -> Callable[[int], None]:
        """Before each packet of ``size`` bytes: the cap's wait, and its bytes spent."""

        def spend(size: int) -> None:
            if capped and self.plan.bandwidth is not None:
                self._wait_for_credit()
            self._window.used += size

        return spend

    def _send_main(self, data: bytes, *, capped: bool = True) -> None:
        view = memoryview(data)
        while view:
            # Capped: no more than the window's quota has left (QEMU checks it per page).
            most = min(self._piece, self._wait_for_credit()) if capped else self._piece
            piece = view[:most]
            sent = self._write(piece)
            view = view[sent:]
            self._sent += sent
            self._window.used += sent
            if self.on_progress is not None:
                self.on_progress(self._label(), sent)
            self._advance_dirtier()
            self._maybe_cut()

    def _write(self, piece: memoryview) -> int:
        """Send some of ``piece`` once the socket has room; read the return path first
        whenever it has data, so requests are taken in while the stream is backed up."""
        while True:
            self._await_room()
            if sent := self.connection.send_some(piece):
                return sent

    def _await_room(self) -> None:
        """Until the socket takes more bytes, reading the return path meanwhile."""
        connection = self.connection
        deadline = time.monotonic() + STALL_TIMEOUT
        while True:
            readable, writable, _ = select.select([self._return_path()], [connection], [], 1.0)
            if readable:
                self._read_return_path()
            if writable:
                return
            if time.monotonic() > deadline:
                raise TransportError(
                    connection.name,
                    f"the destination took no data for {STALL_TIMEOUT:.0f} s during "
                    f"{self._label()}",
                )

    def _wait_for_credit(self) -> int:
        """Wait until the cap lets more bytes out, serving the return path meanwhile; the
        bytes it lets out now (at least a target page, as QEMU sends at least one per turn).

        The cap works as QEMU's rate limit does: a quota of a window's worth of bytes (the
        cap / 10) per 100 ms window, sent as fast as the socket takes it; once it is spent,
        nothing more until the window ends, and the next starts afresh (unused quota is lost
        with its window). So each window's quota goes out as one burst that the socket
        buffers hold, and a page requested on the main channel waits behind it, or for the
        next window: QEMU checks the rate before its RAM code may send anything, requested
        pages included. Requests read while waiting are queued (and, where the return-path
        thread sends the preempt channel's pages, QEMU 8.0 on, sent there at once)."""
        window = self._window
        if window.rate is None:
            return CHUNK
        quota = window.quota
        while True:
            now = time.monotonic()
            if window.roll(now) and self._urgent_capped and self.phase is SourceState.POSTCOPY:
                # What the spent window held goes first in the new one, ahead of the piece
                # this wait was for (QEMU 7.2's ram_save_iterate takes queued requests before
                # any dirty page, past the quota while any are queued).
                self._send_urgent()
            if window.used < max(quota, 1):  # a cap under 10 B/s: a page per window
                return max(quota - window.used, self.source.target_page_size)
            self._poll_return_path(window.end - now)

    def _poll_return_path(self, timeout: float) -> None:
        ready, _, _ = select.select([self._return_path()], [], [], timeout)
        if ready:
            self._read_return_path()

    def _return_path(self) -> Connection | FastAnswer:
        """Where the return path's bytes come from: the socket, or the C answer thread."""
        return self.connection if self._answers.fast is None else self._answers.fast

    def _read_return_path(self) -> None:
        count = self._answers.read_into(self._rp_buffer, self.connection)
        if count == 0:
            if self.channels.can_reopen and self.phase in RECOVERABLE:
                # The destination's end of a broken channel: pause, do not fail.
                raise TransportError(self.connection.name, "the destination closed the channel")
            self.source.receive_eof()
            return
        self.source.receive_data(bytes(self._rp_buffer[:count]))
        self._take_events()
        if self._answers.wanted:
            self._answers.start(self.phase)  # the handover waited for the end of a message
        if self.phase is SourceState.POSTCOPY:
            self._send_urgent()

    def _take_events(self) -> None:
        """Everything the machine has said since last time."""
        while (event := self.source.next_event()) is not NEED_DATA:
            match event:
                case ev.PhaseChanged(new=new):
                    self.phase = new
                case ev.PassCompleted():
                    self._passes_done.append(event)
                    self.report.pass_ends.append(time.monotonic())
                case ev.RequestReceived(block=block, start=start, already_sent=already):
                    self._note_request(block, start, already)

    def _note_request(self, block: str, start: int, already_sent: bool) -> None:
        """A request, read now, or earlier by the C thread (which answered it then, and
        knew then whether its pages had gone out already: the machine, told of the thread's
        pages before it reads the request, finds them all clean)."""
        requests = self.report.requests
        answered = self._answers.answered(block, start)
        if answered is not None:
            read_ns, sent_ns, already_sent = answered
            self._fast_served[len(requests)] = sent_ns - read_ns
            requests.append((read_ns / 1e9, block, start))
        else:
            requests.append((time.monotonic(), block, start))
        self.report.already_sent.append(already_sent)

    def _label(self) -> str:
        """The phase as progress reports name it (a finished pass is still precopy)."""
        if self.phase is SourceState.PASS_COMPLETE:
            return SourceState.PRECOPY.value
        return self.phase.value

    def stats(self) -> dict[str, Any]:
        return vars(self.source.stats)
