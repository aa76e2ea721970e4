"""A destination's postcopy-preempt channel: read on a thread of its own, its pages placed.

The thread takes the channel (by its order, or whenever the source opens it: see
:meth:`PreemptReceiver.start`), feeds its bytes to the channel's machine
(:class:`~qmig.protocol.preempt_channel.PreemptChannel`) and places the pages it brings; once
the guest runs here, a C thread reads the channel and places its pages as they arrive
(:mod:`qmig.runner.fastpath`), and this thread still feeds every byte to the machine. A pause
stops the thread (the source's pause ends its preempt channel as well), and a recovery starts
another. A failure on the channel fails the migration: the machine sends its SHUT, and the
main channel is cut, so that the main loop stops and reports this error.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterable

from qmig.errors import QmigError, TransportError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.preempt_channel import PreemptChannel
from qmig.protocol.states import DestinationState, is_postcopy_running
from qmig.ram.blocks import RamBlock
from qmig.runner.channels import PREEMPT, Channels
from qmig.runner.destination_report import DestinationReport
from qmig.runner.fastpath import FastPath, start_preempt_fast_path
from qmig.runner.requester import PageRequester
from qmig.runner.return_path import ReturnPath
from qmig.transport import Connection
from qmig.wire import messages as m
from qmig.wire.reader import END

PREEMPT_POLL = 0.1  # the preempt thread's wait for bytes, and then for LISTEN
STOP_TIMEOUT = 5.0  # a reading thread told to stop has stopped within this


class PreemptReceiver:
    """The preempt channel of one migration's destination: ``machine_lock`` guards ``dest``
    (and the channel's machine), ``report_lock`` the report's placement figures.

    What it asks of the runner: ``place`` a run of the channel's pages (True: its C thread
    may have placed them already); ``count_fast``: stop a C receive thread and count its
    figures; ``wake_main``: end the main channel's reads (a failure here ends the migration);
    ``fast_blocks``: the RAM a C thread may place into now, None while it may not (the guest
    does not run here yet, or the fast path is off)."""

    def __init__(
        self,
        channels: Channels,
        dest: Destination,
        machine_lock: threading.Lock,
        *,
        report: DestinationReport,
        report_lock: threading.Lock,
        return_path: ReturnPath,
        requests: PageRequester,
        idle_timeout: float,
        recover_timeout: float,
        chunk: int,
        place: Callable[[m.RamPageRun, bool], None],
        count_fast: Callable[[FastPath], None],
        wake_main: Callable[[], None],
        fast_blocks: Callable[[], Iterable[RamBlock] | None],
    ) -> None:
        self._channels = channels
        self._dest = dest
        self._machine_lock = machine_lock
        self._report = report
        self._report_lock = report_lock
        self._return_path = return_path
        self._requests = requests
        self._idle_timeout = idle_timeout
        self._recover_timeout = recover_timeout
        self._chunk = chunk
        self._place = place
        self._count_fast = count_fast
        self._wake_main = wake_main
        self._fast_blocks = fast_blocks
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: QmigError | None = None
        # Readable: the guest runs here now, and the preempt thread may hand its channel to a
        # C thread before the next page comes (it waits for bytes in select() meanwhile).
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def start(self, *, at_setup: bool = True) -> None:
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
        variant = self._dest.preempt
        if variant is None:
            return
        by_order = variant.opened_at_setup
        if by_order and self._channels.get(PREEMPT) is None:
            timeout = self._idle_timeout if at_setup else self._recover_timeout
            self._channels.open(PREEMPT, timeout, by_order=True)
        self.thread = threading.Thread(
            target=self._loop,
            args=(not at_setup and not by_order,),
            name="qmig-preempt",
            daemon=True,
        )
        self.thread.start()

    def restart(self) -> None:
        if self._dest.preempt is None:
            return
        self._stop = threading.Event()
        self.thread = None
        self.start(at_setup=False)

    def guest_running(self) -> None:
        """The guest runs here: the thread may hand its channel to a C thread now."""
        os.eventfd_write(self._wake, 1)

    def _loop(self, resumed: bool) -> None:
        """``resumed``: the channel comes after a recovery, where the source's next main
        channel may reach this thread first (qmig.runner.channels): its first bytes tell,
        read here before a C thread may take the socket (:meth:`take_over`)."""
        stop = self._stop  # this thread's own: a recovery starts another
        fast: FastPath | None = None
        try:
            connection = self._channels.get(PREEMPT)
            while connection is None and not stop.is_set():
                try:
                    connection = self._channels.open(PREEMPT, PREEMPT_POLL)
                except TransportError:
                    continue
            if connection is None:
                return
            with self._machine_lock:
                channel = self._dest.open_preempt_channel()
            buffer = bytearray(self._chunk)
            while not stop.is_set():
                if fast is None and not resumed:
                    fast = self.take_over(connection, channel)
                try:
                    count = self.receive(connection, buffer, fast)
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
                        self._channels.turned_out_main(PREEMPT, again)
                        return  # the main loop finds its channel broken, pauses, takes this
                with self._machine_lock:
                    if count > 0:
                        channel.receive_data(memoryview(buffer)[:count])
                        self._report.preempt_bytes += count
                    elif count == 0:
                        channel.receive_eof()
                if self._drain(channel, placed_ahead=fast is not None) or count == 0:
                    return
                if fast is not None:
                    fast.sync(channel.reader)
        except QmigError as error:
            self.error = error
            with self._machine_lock:
                data = self._dest.fail("preempt channel")
            with contextlib.suppress(QmigError):
                self._return_path.send(data)
            if fast is not None:  # before the cut closes the socket it reads
                self._count_fast(fast)
                fast = None
            self._wake_main()  # its C thread may be waiting on the socket
            self._requests.off()
            self._channels.cut()  # the main loop stops, and reports this error
        finally:
            if fast is not None:
                self._count_fast(fast)

    def take_over(self, connection: Connection, channel: PreemptChannel) -> FastPath | None:
        """Once the guest runs here (the blocks are registered and a vCPU may wait on a
        page), a C thread reads the preempt channel and places its pages as they arrive
        (qmig.runner.fastpath); this thread still feeds every byte to the channel's machine.
        None: not yet, or not at all (``fast_path`` off, no socket)."""
        blocks = self._fast_blocks()
        if blocks is None:
            return None
        with self._machine_lock:
            if not is_postcopy_running(self._dest.state) or channel.ended:
                return None
            fast = start_preempt_fast_path(connection, channel, blocks)
            if fast is not None:
                fast.sync(channel.reader)
        return fast

    def receive(self, connection: Connection, buffer: bytearray, fast: FastPath | None) -> int:
        """The preempt channel's next bytes into ``buffer``: their count, 0 at EOF, -1 when
        nothing came within PREEMPT_POLL (what waited for LISTEN may be loadable now)."""
        if fast is None:
            wake = self._wake
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
            return self._channels.can_reopen and (
                self._dest.can_pause
                or self._dest.state in (DestinationState.PAUSED, DestinationState.RECOVER)
            )

    def _drain(self, channel: PreemptChannel, *, placed_ahead: bool = False) -> bool:
        """Place what the preempt channel brought (``placed_ahead``: its C thread may have
        placed it already); True once it has ended."""
        while True:
            with self._machine_lock:
                event = channel.next_event()
            if event is END:
                return True
            if not isinstance(event, ev.PagesReceived):
                return False
            self._place(event.run, placed_ahead)
            with self._report_lock:
                self._report.preempt_pages += event.run.count

    def end(self) -> None:
        """The load is complete: the pre-7.2 variant's channel ends with its EOS, which the
        end waits for (as QEMU's cleanup joins its preempt thread); the 8.0 one is read on
        until every page asked for has come (the source answered them there only; QEMU's
        cleanup waits for them too), then its thread is stopped. Each wait is bounded by the
        idle timeout: what did not end is named, never waited for longer."""
        thread = self.thread
        if thread is None:
            return
        variant = self._dest.preempt
        if variant is not None and variant.ends_with_eos:
            thread.join(self._idle_timeout)
            if thread.is_alive():
                raise TransportError(
                    "preempt channel", f"no EOS within {self._idle_timeout:g} s of the end"
                )
        else:
            # It reads on while pages asked for are missing (PreemptChannel), and ends by
            # itself once they are in; with none missing it is stopped now (it may never
            # have had a channel: a migration that ended in precopy).
            deadline = time.monotonic() + self._idle_timeout
            while thread.is_alive() and (missing := len(self._requests.pending())):
                if time.monotonic() >= deadline:
                    raise TransportError(
                        "preempt channel",
                        f"{missing} requested host pages not received within "
                        f"{self._idle_timeout:g} s of the end",
                    )
                thread.join(PREEMPT_POLL)
            self.stop_thread()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stop_thread()
        self._channels.close(PREEMPT)

    def stop_thread(self) -> None:
        """Stop the preempt channel's thread (it sees the flag within PREEMPT_POLL, outside
        a placement); TransportError if it has not stopped within STOP_TIMEOUT."""
        self._stop.set()
        thread = self.thread
        if thread is None:
            return
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise TransportError(
                "preempt channel", f"its reading thread did not stop within {STOP_TIMEOUT:g} s"
            )

    def close(self) -> None:
        """Once every thread was told to stop: the wake-up's descriptor goes, unless a thread
        that did not stop may still poll it."""
        thread = self.thread
        if thread is None or not thread.is_alive():  # a stuck thread may still poll it
            os.close(self._wake)
