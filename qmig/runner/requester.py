"""The destination's page requests: a fault becomes a request, and each request is timed.

The fault thread asks the machine for a request and sends it on the return path at once
(:meth:`PageRequester.on_fault`); once the guest runs here (and with the fast path), the fault
thread writes requests from C itself, and the machine is told of each before its page counts
(:mod:`qmig.ram.fault_requests`, :meth:`PageRequester.take`). A request's round trip ends when
its page is placed (:meth:`PageRequester.placed`).
"""

from __future__ import annotations

import threading
import time

from qmig.errors import TransportError
from qmig.protocol.destination import Destination
from qmig.protocol.states import DestinationState, is_postcopy_running
from qmig.ram.blocks import RamBlock
from qmig.ram.fault_requests import FaultRequests
from qmig.ram.faults import PageRequest
from qmig.ram.session import RamSession
from qmig.runner.channels import Channels
from qmig.runner.destination_report import DestinationReport
from qmig.runner.misbehave import MisbehavingConnection
from qmig.runner.return_path import ReturnPath
from qmig.wire.page_requests import PageRequests


class PageRequester:
    """The requests of one migration's destination: ``machine_lock`` guards ``dest``."""

    def __init__(
        self,
        dest: Destination,
        channels: Channels,
        machine_lock: threading.Lock,
        return_path: ReturnPath,
        report: DestinationReport,
    ) -> None:
        self._dest = dest
        self._channels = channels
        self._machine_lock = machine_lock
        self._return_path = return_path
        self._report = report
        self._session: RamSession | None = None
        self._c_requests: FaultRequests | None = None
        # (block, host offset) -> when its request went out (0 until sent): the page that
        # answers it closes the request's latency.
        self._awaiting: dict[tuple[str, int], list[int]] = {}

    def start(self, session: RamSession, *, from_c: bool) -> FaultRequests | None:
        """The RAM is mapped; what its fault thread sends page requests with. With
        ``from_c`` (the fast path), the fault thread sends them from C; None: it hands them
        to :meth:`on_fault` (``from_c`` off, a stream with no socket, or a profile whose page
        requests the fast builder declines), or a connection that changes what it sends on
        purpose (``receive --delay-requests``: the C would write past it)."""
        self._session = session
        connection = self._channels.main
        if not from_c or connection.socket is None or isinstance(connection, MisbehavingConnection):
            return None
        builder = PageRequests(self._dest.reader.schema)
        if builder.req_pages is None or builder.req_pages_id is None:
            return None
        requests = FaultRequests(list(session.blocks), builder)
        self._return_path.lock = requests.lock  # before the fault thread runs: nobody sends yet
        self._c_requests = requests
        return requests

    def on_fault(self, request: PageRequest) -> None:
        """Called on the fault thread: ask the source for the page, now. With requests sent
        from C, only for a fault that came while its sending was off: sent the C way if it
        is on now (one last-block state), else by the machine (paused: kept for the resume)."""
        requests = self._c_requests
        with self._machine_lock:
            if self._dest.state is DestinationState.FAILED:  # the loop failed meanwhile
                return
            if requests is not None:
                self.take()  # the machine's last block is the C's from here
                tracker = self._dest.blocks.get(request.block)
                if tracker is not None and (
                    request.offset in tracker.requested or tracker.host_page_present(request.offset)
                ):
                    return  # what the machine would ask nothing for
                while (
                    done := requests.send(request.block, request.offset, request.fault_ns)
                ) == -2:
                    self.take()
                if done:
                    self.take()
                    return
            asked = self._dest.page_fault(request.block, request.offset)
            data = self._return_path.take()
            # The channel these bytes were made for: a pause may replace it before they go,
            # and a REQ_PAGES that relies on the old channel's last block must not open the
            # new one (the machine asks again there, naming the block, after the resume).
            connection = self._channels.main
            sent = [0]
            if asked is not None:  # registered before sending: the answer may come at once
                self._awaiting[(asked.block, asked.start)] = sent
        try:
            # Stamped before the send: the answer may be placed before this thread runs
            # again (the page was already on its way).
            sent[0] = time.monotonic_ns()
            self._return_path.send_taken(data, connection)
        except (TransportError, ValueError):
            # The channel broke (or the main loop, pausing, closed it already: a closed
            # socket's descriptor is -1): the request stays pending in the machine and is
            # sent again after the resume.
            return
        finally:
            self._return_path.release(data)
        if asked is not None:
            self._report.requests += 1
            self._report.request_sent_ns.append(time.monotonic_ns() - request.fault_ns)
            self._report.request_sent_at_ns.append(sent[0])

    # --- page requests from C (qmig.ram.fault_requests) --------------------------------------

    def on(self) -> None:
        """The guest runs here (RUN, or POSTCOPY_RESUME once its replies are out): the C
        asks for pages on this channel, going on from the machine's last block."""
        requests, sock = self._c_requests, self._channels.main.socket
        if requests is None or sock is None or not self._dest.return_path_open:
            return
        with self._machine_lock:
            self.take()
            if is_postcopy_running(self._dest.state):
                requests.enable(sock.fileno(), self._dest.last_requested_block)

    def off(self) -> None:
        """Before the channel goes (paused, cut, ended): faults are held for the machine,
        and what the C sent is told to it, its last block included."""
        requests = self._c_requests
        if requests is None:
            return
        with self._machine_lock:
            requests.disable()
            self.take()

    def take(self) -> None:
        """Tell the machine, in order, what the C sent; time each (machine lock held)."""
        session, requests = self._session, self._c_requests
        if session is None or session.faults is None or requests is None:
            return
        taken = session.faults.take_sent()
        for sent in taken:
            if self._dest.state is not DestinationState.FAILED:
                self._dest.request_sent_elsewhere(
                    sent.block, sent.host_offset, sent=bool(sent.sent_ns)
                )
            if not sent.sent_ns:
                continue
            # Written to the socket by the C: the limits count them as if sent here.
            self._channels.main.sent_elsewhere(requests.size(sent.block, sent.with_id))
            key = (sent.block, sent.host_offset)
            self._awaiting[key] = [sent.sent_ns]
            self._report.requests += 1
            self._report.request_sent_ns.append(sent.done_ns - sent.read_ns)
            self._report.request_sent_at_ns.append(sent.sent_ns)
            ram = session.block(sent.block)
            if ram.host_page_received(sent.host_offset // ram.page_size):
                self._answered(*key)

    def take_now(self) -> None:
        """:meth:`take`, with the machine lock."""
        with self._machine_lock:
            self.take()

    def pending(self) -> list[tuple[str, int]]:
        """The host pages asked for and not in place, (block, offset); what the C sent is
        told to the machine first."""
        with self._machine_lock:
            self.take()
            return self._dest.pending_requests()

    def awaited_text(self) -> str:
        """The host pages asked for and not in place, for an error line."""
        pending = self.pending()
        if not pending:
            return "no requested page is missing"
        shown = ", ".join(f"{block} 0x{offset:x}" for block, offset in pending[:4])
        more = f" and {len(pending) - 4} more" if len(pending) > 4 else ""
        return f"requested and not received: {shown}{more}"

    # --- answers ------------------------------------------------------------------------------

    def placing(self) -> None:
        """Postcopy pages are about to be placed: requests C sent are awaited before their
        pages count."""
        if self._c_requests is not None:
            self.take_now()

    def placed(self, block: RamBlock) -> None:
        """Postcopy pages of ``block`` were placed: a requested page that is now in place has
        been answered."""
        if self._awaiting:
            # list() copies the keys in one step: the fault thread adds requests meanwhile.
            for key in list(self._awaiting):
                if key[0] == block.idstr and block.host_page_received(key[1] // block.page_size):
                    self._answered(*key)

    def _answered(self, block: str, host_offset: int) -> None:
        """A page arrived: if it was requested, that request's round trip is over."""
        sent = self._awaiting.pop((block, host_offset), None)
        if sent is not None and sent[0]:
            assert self._session is not None
            ram = self._session.block(block)
            placed = ram.placed_at(host_offset // ram.page_size) or time.monotonic_ns()
            waited = max(0, placed - sent[0])
            self._report.request_placed_ns.append(waited)
            self._report.request_log.append((sent[0], waited, block, host_offset))
