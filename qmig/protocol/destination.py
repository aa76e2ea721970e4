"""The destination of a migration, sans-IO: stream bytes in, decisions and return-path bytes out.

Drive it like h11's connection::

    dest = Destination(version="7.2")
    dest.receive_data(chunk)            # bytes from the source
    while (event := dest.next_event()) is not NEED_DATA: ...   # apply to RAM
    dest.page_fault("pc.ram", 0x5000)   # the guest touched a missing page
    sock.sendall(dest.data_to_send())   # PONGs, page requests, SHUT

Rules come from QEMU's destination: the state table in :mod:`qmig.protocol.states` (which
command is legal in which state, where it leads, what EOF means in each state), plus the
checks that depend on more than the state (PING without a return path, the ADVISE length
against the postcopy-ram setting, page sizes, discard ranges). A violation raises
:class:`~qmig.errors.RemoteProtocolError` naming the command and the byte where it starts,
and queues SHUT(1); calls after that raise :class:`~qmig.errors.LocalProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qmig.errors import (
    HostSupportError,
    IllegalStateError,
    LocalProtocolError,
    MalformedError,
    RemoteProtocolError,
    TruncatedError,
)
from qmig.protocol import events as ev
from qmig.protocol.multifd import MultifdSyncRule
from qmig.protocol.preempt import PreemptVariant, preempt_variant
from qmig.protocol.preempt_channel import PreemptChannel
from qmig.protocol.ram_config import HOST_PAGE_SIZE, RamConfig
from qmig.protocol.recv_bitmap import mark_placed, received_bitmap
from qmig.protocol.states import (
    DESTINATION_STOPS_READING,
    DestinationInput,
    DestinationState,
    Ignored,
    Refused,
    destination_refusal,
    destination_rules,
    is_postcopy_running,
)
from qmig.sparse import zeroed
from qmig.wire import messages as m
from qmig.wire.discard import DiscardRanges, apply_to_state
from qmig.wire.page_requests import PageRequests
from qmig.wire.ramscan import RamScanner
from qmig.wire.reader import END, NEED_DATA, Record, StreamReader
from qmig.wire.schema import RESUME_ACK_VALUE


@dataclass
class BlockTracker:
    """What the destination knows about one RAMBlock: its size and which pages it holds."""

    info: m.RamBlockInfo
    page_size: int
    target_page_size: int
    # Per target page: 0 = missing.
    state: bytearray = field(repr=False, default_factory=bytearray)
    requested: set[int] = field(default_factory=set)  # host-page offsets asked for
    discarded_pages: int = 0

    def __post_init__(self) -> None:
        # Resident only where pages arrive: MEM_SIZE may claim terabytes (qmig.sparse).
        self.state = zeroed(-(-self.info.used_length // self.target_page_size))

    def host_page_present(self, host_offset: int) -> bool:
        first = host_offset // self.target_page_size
        count = self.page_size // self.target_page_size
        return self.state.find(b"\0", first, first + count) < 0


class Destination:
    """QEMU's incoming side, for one migration."""

    def __init__(
        self,
        version: str | None = None,
        *,
        postcopy_ram: bool = True,
        host_page_size: int = HOST_PAGE_SIZE,
        ram: RamConfig | None = None,
        local_page_sizes: dict[str, int] | None = None,
        preempt: PreemptVariant | None = None,
        preempt_from_machine: bool = False,
    ) -> None:
        """``ram``: the destination's own RAM (page size, blocks, limit); by default ordinary
        RAM of the host's pages, the blocks MEM_SIZE announces, no limit. ``preempt``:
        postcopy-preempt is on (a second channel, see :meth:`open_preempt_channel`);
        ``preempt_from_machine``: its variant is the one the CONFIGURATION's machine type
        gets with this QEMU version (as QEMU's x-preempt-pre-7-2 follows the machine)."""
        self.reader = StreamReader(
            version, local_page_sizes=local_page_sizes, host_page_size=host_page_size
        )
        self.reader.coalesce_discards = True  # a switchover's hundreds of them, as one record
        self.profile = self.reader.profile
        self.rules = destination_rules(self.profile)
        self.postcopy_ram = postcopy_ram
        self.host_page_size = host_page_size
        self.ram = ram or RamConfig(page_size=host_page_size)
        self.page_sizes = self.ram.page_sizes(host_page_size)
        self.state = DestinationState.NONE
        # Where a failed migration stopped: QEMU's state after the refused command (some
        # commands store their state before they check the old one).
        self.state_before_failure: DestinationState | None = None
        # Not a state: OPEN_RETURN_PATH may come in any state, and only decides whether
        # PONG and SHUT can be sent.
        self.return_path_open = False
        self.listen_thread_started = False
        self.blocks: dict[str, BlockTracker] = {}
        self.device_sections: dict[int, m.SectionFull | m.SectionStart] = {}
        self.pongs_sent = 0
        self.requests_sent = 0
        self.recoveries = 0  # POSTCOPY_RESUMEs taken
        self.channels = 1
        self.error: RemoteProtocolError | None = None
        self._scanner = RamScanner(self.reader.schema)
        self._page_requests = PageRequests(self.reader.schema)
        self._rp_out = bytearray()
        self._last_requested_block: str | None = None
        self._pending: list[ev.Event] = []
        self._current_section: m.SectionFull | m.SectionStart | None = None
        self._host_page_fill: dict[str, tuple[int, int]] = {}
        self.preempt = preempt
        self._preempt_from_machine = preempt_from_machine
        self.preempt_channel: PreemptChannel | None = None
        # Multifd: which RAM records are sync points (qmig.protocol.multifd); None: no multifd.
        self.multifd: MultifdSyncRule | None = None

    def open_preempt_channel(self) -> PreemptChannel:
        """The preempt channel connected: read it with the object returned."""
        self._check_usable()
        if self.preempt is None:
            raise LocalProtocolError("destination", "postcopy-preempt is off: no second channel")
        self.preempt_channel = PreemptChannel(self)
        self.channels += 1
        return self.preempt_channel

    # --- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._check_usable()
        self._check_connected()
        self.reader.feed(data)

    def receive_eof(self) -> None:
        """The source closed the stream."""
        self._check_usable()
        self._check_connected()
        self.reader.feed_eof()

    # --- postcopy recovery ----------------------------------------------------------------

    @property
    def can_pause(self) -> bool:
        """Would a broken channel pause the migration now (rather than fail it)?"""
        entry = self.rules.table[self.state].get(DestinationInput.CHANNEL_BROKEN)
        return entry is DestinationState.PAUSED

    def channel_broken(self) -> bool:
        """The channel failed (reset, or closed before the stream's end). Once the guest
        runs here this pauses the migration, as QEMU does: every received page, the received
        map and the pending requests are kept. Returns True when paused; False when the
        migration failed instead (before RUN, as in QEMU). Bytes of an unfinished record
        are dropped, and with them a half-received host page (it is asked for again)."""
        self._check_usable()
        entry = self.rules.table[self.state].get(DestinationInput.CHANNEL_BROKEN)
        if entry is not DestinationState.PAUSED:
            if entry is DestinationState.END:
                return False  # a precopy EOF was read: the state is loaded (see EOF_READ)
            self.fail("channel broken")
            return False
        self.state = DestinationState.PAUSED
        self._rp_out.clear()  # nothing more goes down the broken return path
        self._drop_partial_host_pages()
        self._pending.append(ev.Paused())
        return True

    def new_channel(self) -> None:
        """The source reconnected (QEMU's migrate-recover): read the new channel from its
        first byte. Nothing is resent at its start: no header, no CONFIGURATION."""
        self._check_usable()
        if self.rules.table[self.state].get(DestinationInput.NEW_CHANNEL) is None:
            raise LocalProtocolError(
                "destination", f"a new channel needs a paused migration (state {self.state.name})"
            )
        self.state = DestinationState.RECOVER
        self.reader.new_channel()
        self.channels += 1
        self._pending.clear()

    def _check_connected(self) -> None:
        if self.state is DestinationState.PAUSED:
            raise LocalProtocolError(
                "destination", "the migration is paused: no channel until new_channel()"
            )

    def _drop_partial_host_pages(self) -> None:
        for idstr, (host, count) in self._host_page_fill.items():
            if count:
                tracker = self.blocks[idstr]
                first = host // tracker.target_page_size
                tracker.state[first : first + count] = bytes(count)
                self._pending.append(ev.PartialHostPageDropped(idstr, host))
        self._host_page_fill.clear()

    def pages_placed_elsewhere(self, block: str, placed: bytes | bytearray | memoryview) -> int:
        """Target pages of ``block`` in place already, put there by a placement outside this
        machine (the runner's C threads) whose records the machine has not read, and may
        never read (a pause drops them with the channel): received from now on. The
        RECV_BITMAP reply counts them received (QEMU's receivedmap is set as a page is
        placed), so that the source does not send them again after a recovery, and a
        request for one is no longer awaited (QEMU drops a request as it places its page).
        ``placed``: one bit per target page of the block, page i at bit i % 8 of byte
        i // 8. Returns how many target pages this machine had counted missing."""
        self._check_usable()
        tracker = self.blocks.get(block)
        if tracker is None:
            raise LocalProtocolError("pages placed elsewhere", f"no RAMBlock {block!r}")
        return mark_placed(tracker.state, placed, len(tracker.state))

    def pending_requests(self) -> list[tuple[str, int]]:
        """Host pages asked for and not here yet, (block, offset), in block and offset order."""
        pending = []
        for idstr, tracker in self.blocks.items():
            tracker.requested = {
                at for at in tracker.requested if not tracker.host_page_present(at)
            }
            pending += [(idstr, at) for at in sorted(tracker.requested)]
        return pending

    def next_event(self) -> ev.Event | ev.Sentinel:
        """The next decision for the runner, or NEED_DATA / END."""
        self._check_usable()
        if self._pending:
            return self._pending.pop(0)
        if self.state in DESTINATION_STOPS_READING:
            return END
        while True:
            try:
                record = self.reader.next_record()
            except RemoteProtocolError as error:
                if self.state is DestinationState.EOF_READ:
                    # After a precopy EOF, QEMU only reports a missing, wrong or short
                    # VMDESCRIPTION ("Expected vmdescription section"): the state is loaded.
                    self._pending.append(ev.Notice(error.what, error.detail, error.offset))
                    self._on_vmdescription(None, None)
                    return self._pending.pop(0)
                raise self._failed(error) from None
            if record is NEED_DATA:
                return NEED_DATA
            if record is END:
                self._end_of_input()
                return self._pending.pop(0) if self._pending else END
            assert isinstance(record, Record)
            try:
                self._handle(record)
            except RemoteProtocolError as error:
                raise self._failed(error) from None
            if self._pending:
                return self._pending.pop(0)

    def page_fault(self, block: str, offset: int) -> ev.PageRequested | None:
        """The guest touched ``offset`` in ``block``; request it unless it is here or asked."""
        self._check_usable()
        tracker = self.blocks.get(block)
        if tracker is None:
            raise LocalProtocolError("page fault", f"no RAMBlock {block!r}")
        if offset >= tracker.info.used_length:
            raise LocalProtocolError("page fault", f"offset {offset:#x} outside block {block!r}")
        host_offset = offset - offset % tracker.page_size
        if tracker.host_page_present(host_offset) or host_offset in tracker.requested:
            return None
        tracker.requested.add(host_offset)
        if self.state in (DestinationState.PAUSED, DestinationState.RECOVER):
            return None  # kept: sent with every pending request after POSTCOPY_RESUME
        return self._request(block, host_offset, tracker)

    @property
    def last_requested_block(self) -> str | None:
        """The block the last request sent named (REQ_PAGES names none: it is this one)."""
        return self._last_requested_block

    def request_sent_elsewhere(self, block: str, host_offset: int, *, sent: bool) -> None:
        """A request for the host page at ``host_offset`` was built and written outside the
        machine (by C, from the messages this machine's schema builds, deciding between
        REQ_PAGES and REQ_PAGES_ID by :attr:`last_requested_block` as :meth:`page_fault`
        does). Told in the order they were sent, the machine stays the one account of what
        was asked and of the last block; ``sent`` False: the write failed, and the page is
        asked for again after a recovery, as any pending request."""
        self._check_usable()
        tracker = self.blocks.get(block)
        if tracker is None:
            raise LocalProtocolError("page request", f"no RAMBlock {block!r}")
        tracker.requested.add(host_offset - host_offset % tracker.page_size)
        if sent:
            self._last_requested_block = block
            self.requests_sent += 1

    def _request(self, block: str, host_offset: int, tracker: BlockTracker) -> ev.PageRequested:
        message: m.ReqPages | m.ReqPagesId
        if block == self._last_requested_block:
            message = m.ReqPages(host_offset, tracker.page_size)
        else:
            message = m.ReqPagesId(host_offset, tracker.page_size, block)
            self._last_requested_block = block
        self._rp_out += self._page_requests.build(message)
        self.requests_sent += 1
        return ev.PageRequested(block, host_offset, tracker.page_size, message)

    def data_to_send(self) -> bytes:
        """Return-path bytes queued so far (PONGs, page requests, SHUT)."""
        out = bytes(self._rp_out)
        self._rp_out.clear()
        return out

    def fail(self, reason: str) -> bytes:
        """End the migration on this side (for a local failure): SHUT(1) if the RP is open."""
        if self.state not in (DestinationState.END, DestinationState.FAILED):
            self.state_before_failure = self.state
            self.state = DestinationState.FAILED
            self._shut(1)
        return self.data_to_send()

    # --- the rules ----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.state is DestinationState.FAILED:
            raise LocalProtocolError("destination", "the migration already failed (state FAILED)")

    @property
    def phase_name(self) -> str:
        """Where the migration is (or was, when it failed), in words for error messages."""
        state = self.state
        if state is DestinationState.FAILED and self.state_before_failure is not None:
            state = self.state_before_failure
        if state in (DestinationState.NONE, DestinationState.ADVISE):
            return "precopy"
        return state.name

    def _failed(self, error: RemoteProtocolError) -> RemoteProtocolError:
        if isinstance(error, TruncatedError):
            error = TruncatedError(error.what, error.offset, during=self.phase_name)
        if error.state is None:
            error.state = self.state.name
        self.error = error
        if self.state_before_failure is None:
            self.state_before_failure = self.state
        self.state = DestinationState.FAILED
        self._shut(1)
        return error

    def _shut(self, status: int) -> None:
        if self.return_path_open:
            self._rp_out += self.reader.schema.build_rp(m.Shut(status))

    def _transition(self, action: DestinationInput, offset: int) -> DestinationState | None:
        """Move as the table says for ``action`` in the current state, or refuse it. None:
        the table ignores it here (reported as a notice)."""
        old = self.state
        entry = self.rules.table[old].get(action)
        if isinstance(entry, Ignored):
            self._pending.append(ev.Notice(action.value, entry.reason, offset))
            return None
        if not isinstance(entry, DestinationState):
            stored = self.rules.sets_before_check.get(action)
            if stored is not None:
                self.state_before_failure = stored
            detail = entry.reason if isinstance(entry, Refused) else destination_refusal(old)
            raise IllegalStateError(action.value, detail, offset, state=old.name)
        listening = self.listen_thread_started and self.rules.listen_once
        if action is DestinationInput.LISTEN and listening:
            self.state_before_failure = entry
            raise IllegalStateError(
                action.value, "already has a listen thread", offset, state=old.name
            )
        self.state = entry
        return entry

    def _handle(self, record: Record) -> None:
        message = record.message
        handler = _HANDLERS.get(type(message))
        if handler is not None:
            handler(self, message, record)

    def _on_header(self, message: m.StreamHeader, record: Record) -> None:
        pass

    def _on_configuration(self, message: m.Configuration, record: Record) -> None:
        if self.preempt is not None and self._preempt_from_machine:
            self.preempt = preempt_variant(self.profile, message.machine_type)
        if self.multifd is not None:
            self.multifd.machine(message.machine_type)
        self._pending.append(ev.StreamOpened(message))

    def _on_open_return_path(self, message: m.OpenReturnPath, record: Record) -> None:
        if self.return_path_open:
            self._pending.append(
                ev.Notice("OPEN_RETURN_PATH", "called when RP already open", record.offset)
            )
        self.return_path_open = True

    def _on_ping(self, message: m.Ping, record: Record) -> None:
        if not self.return_path_open:
            raise RemoteProtocolError(
                "PING", f"{message.value:#x} received with no return path", record.offset
            )
        self._rp_out += self.reader.schema.build_rp(m.Pong(message.value))
        self.pongs_sent += 1

    def _on_advise(self, message: m.PostcopyAdvise, record: Record) -> None:
        self._transition(DestinationInput.ADVISE, record.offset)
        if not message.ram_postcopy:
            if self.postcopy_ram:
                raise MalformedError(
                    "POSTCOPY_ADVISE",
                    "RAM postcopy is enabled but have 0 byte advise",
                    record.offset,
                )
            return
        if not self.postcopy_ram:
            raise MalformedError(
                "POSTCOPY_ADVISE",
                "RAM postcopy is disabled but have 16 byte advise",
                record.offset,
            )
        # QEMU's order: the summary of page sizes, then the target page size. The summary
        # must equal the destination's own (its RAM's page sizes are its configuration, not
        # the source's to choose); QEMU prints both in hex without a prefix.
        summary = message.page_size_summary or 0
        local = self.ram.page_size_summary(self.host_page_size)
        if summary != local:
            raise RemoteProtocolError(
                "POSTCOPY_ADVISE",
                f"Postcopy needs matching RAM page sizes (s={summary:x} d={local:x})",
                record.offset,
            )
        target = self.reader.schema.target_page_size
        if message.target_page_size != target:
            raise RemoteProtocolError(
                "POSTCOPY_ADVISE",
                f"Postcopy needs matching target page sizes (s={message.target_page_size} "
                f"d={target})",
                record.offset,
            )
        self._pending.append(
            ev.PostcopyAdvised(message.page_size_summary, message.target_page_size)
        )

    def _on_discard(self, message: m.PostcopyRamDiscard, record: Record) -> None:
        self._discard(message.block, DiscardRanges.of(message.ranges), record, ((0, -1),))

    def _on_discards(self, message: m.PostcopyRamDiscards, record: Record) -> None:
        """Consecutive commands of one block: as if each came alone, at once (see
        ``PostcopyRamDiscards``). Commands after the first find the state they leave."""
        ranges = DiscardRanges.of(message.ranges)
        self._discard(message.block, ranges, record, message.commands)

    def _discard(
        self,
        block: str,
        ranges: DiscardRanges,
        record: Record,
        commands: tuple[tuple[int, int], ...],
    ) -> None:
        """Apply the ranges of ``commands`` ((offset in the record, ranges; -1: all)). A bad
        range is reported where its command is, as if the commands had come one by one
        (those before it are not applied then: the migration has failed either way)."""
        self._transition(DestinationInput.RAM_DISCARD, record.offset)
        tracker = self.blocks.get(block)
        if tracker is None:
            raise RemoteProtocolError(
                "POSTCOPY_RAM_DISCARD", f"failed to find block {block!r}", record.offset
            )
        # Validated and applied to the tracker in one C call (switchover is downtime, and a
        # randomly dirtying guest makes a thousand commands of 12 ranges each).
        bad, cleared = apply_to_state(
            ranges,
            tracker.page_size,
            tracker.info.used_length,
            tracker.target_page_size,
            tracker.state,
        )
        if bad is not None:
            at = before = 0  # the command holding the bad range, and the ranges before it
            for relative, count in commands:
                if count < 0 or bad < before + count:
                    at = relative
                    break
                before += count
            raise _bad_range(block, tracker, ranges[bad], record.offset + at, bad - before)
        tracker.discarded_pages += cleared
        if ranges:
            self._pending.append(ev.RangesDiscarded(block, ranges))

    def _on_listen(self, message: m.PostcopyListen, record: Record) -> None:
        self._transition(DestinationInput.LISTEN, record.offset)
        self.listen_thread_started = True
        self._pending.append(ev.ListenStarted())

    def _on_run(self, message: m.PostcopyRun, record: Record) -> None:
        self._transition(DestinationInput.RUN, record.offset)
        self._pending.append(ev.GuestRunning())

    def _on_colo(self, message: m.EnableColo, record: Record) -> None:
        raise RemoteProtocolError("ENABLE_COLO", "COLO is not supported by qmig", record.offset)

    def _on_resume(self, message: m.PostcopyResume, record: Record) -> None:
        """QEMU's order: RESUME_ACK(1), then every request still pending, the first naming
        its block (the source forgot the last one), and only then new faults."""
        if self._transition(DestinationInput.RESUME, record.offset) is None:
            return
        self._rp_out += self.reader.schema.build_rp(m.ResumeAck(RESUME_ACK_VALUE))
        self._last_requested_block = None
        resent = 0
        for idstr, host_offset in self.pending_requests():
            self._request(idstr, host_offset, self.blocks[idstr])
            resent += 1
        self.recoveries += 1
        self._pending.append(ev.Resumed(self.recoveries, resent))

    def _on_recv_bitmap(self, message: m.RecvBitmap, record: Record) -> None:
        tracker = self.blocks.get(message.block)
        if tracker is None:
            raise RemoteProtocolError(
                "RECV_BITMAP", f"block {message.block!r} not found", record.offset
            )
        if self._transition(DestinationInput.RECV_BITMAP, record.offset) is None:
            return
        bits = tracker.info.used_length // tracker.target_page_size
        bitmap = received_bitmap(tracker.state, bits)
        self._rp_out += self.reader.schema.build_rp(m.RpRecvBitmap(message.block, bitmap))

    def _on_section(self, message: Any, record: Record) -> None:
        if isinstance(message, m.SectionStart | m.SectionFull) and message.idstr != "ram":
            self._current_section = message

    def _on_device(self, message: m.DeviceState, record: Record) -> None:
        section = self._current_section
        version = section.version_id if section is not None else 0
        self._pending.append(
            ev.DeviceStateLoaded(message.idstr, message.instance_id, version, message.data)
        )

    def _on_mem_size(self, message: m.MemSize, record: Record) -> None:
        """The source's RAMBlocks: checked against the destination's own RAM (its limit,
        then, with a declared list, each block as QEMU's ram_load does), all before any
        block is tracked or mapped."""
        if is_postcopy_running(self.state):
            raise MalformedError(
                "RAM",
                f"unknown combination of migration flags {self.profile.ram_flags['MEM_SIZE']:#x}"
                " (postcopy mode)",
                record.offset,
            )
        limit = self.ram.max_ram
        claimed = message.total  # the reader has checked that the blocks add up to it
        if limit is not None and claimed > limit:
            raise RemoteProtocolError(
                "RAM",
                f"MEM_SIZE claims {claimed:#x} bytes of RAM, more than this destination's "
                f"limit of {limit:#x}",
                record.offset,
            )
        for info in message.blocks:
            self._check_block(info, record)
        trackers = {}
        for info in message.blocks:
            try:
                trackers[info.idstr] = BlockTracker(
                    info, info.page_size or self.host_page_size, self.reader.schema.target_page_size
                )
            except (OSError, OverflowError, ValueError, HostSupportError):
                raise RemoteProtocolError(
                    "RAM",
                    f"block {info.idstr!r} of {info.used_length:#x} bytes is more than this "
                    "host can track",
                    record.offset,
                ) from None
        self.blocks.update(trackers)
        self._pending.append(ev.RamBlocksAnnounced(message.blocks))

    def _check_block(self, info: m.RamBlockInfo, record: Record) -> None:
        page_size = info.page_size or self.host_page_size
        if page_size not in self.page_sizes:
            raise RemoteProtocolError(
                "RAM",
                f"block {info.idstr!r} needs {page_size:#x} byte pages, which this "
                "destination's RAM does not have",
                record.offset,
            )
        if self.ram.blocks is None:
            return  # the blocks are whatever the source says
        own = self.ram.declared(info.idstr)
        if own is None:
            raise RemoteProtocolError(
                "RAM", f'Unknown ramblock "{info.idstr}", cannot accept migration', record.offset
            )
        # qemu_ram_resize: the length is rounded up to host pages; a block that is not
        # resizeable must have that size, a resizeable one may grow up to its maximum.
        wanted = -(-info.used_length // self.host_page_size) * self.host_page_size
        if wanted == own.size:
            return
        if own.max_size is None:
            raise RemoteProtocolError(
                "RAM",
                f"Size mismatch: {own.idstr}: {wanted:#x} != {own.size:#x}",
                record.offset,
            )
        if wanted > own.max_size:
            raise RemoteProtocolError(
                "RAM",
                f"Size too large: {own.idstr}: {wanted:#x} > {own.max_size:#x}",
                record.offset,
            )

    def _on_pages(
        self,
        run: m.RamPageRun,
        record: Record,
        fill: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        """``fill``: the host pages being gathered on the channel the run came on (each
        channel has its own, as QEMU's do); the main channel's by default."""
        tracker = self.blocks.get(run.block)
        if tracker is None:
            raise MalformedError("RAM", f"can't find block {run.block!r}", record.offset)
        postcopy = is_postcopy_running(self.state)
        if postcopy and tracker.page_size > tracker.target_page_size:
            self._check_host_page_order(
                tracker, run, record, self._host_page_fill if fill is None else fill
            )
        self._scanner.account(run.data, run.data_base, run.headers, run.bodies, tracker.state)
        self._pending.append(ev.PagesReceived(run, postcopy))

    def _check_host_page_order(
        self,
        tracker: BlockTracker,
        run: m.RamPageRun,
        record: Record,
        fills: dict[str, tuple[int, int]],
    ) -> None:
        """Postcopy: all target pages of one host page arrive together, as QEMU requires."""
        per_host = tracker.page_size // tracker.target_page_size
        mask = tracker.target_page_size - 1
        current, count = fills.get(tracker.info.idstr, (-1, 0))
        sequential = self.profile.postcopy_host_page_order == "sequential"
        for header in run.headers:
            offset = header & ~mask
            host = offset - offset % tracker.page_size
            if count and host != current:
                raise MalformedError(
                    "RAM",
                    f"non-same host page detected: {offset:#x} while {current:#x} is incomplete",
                    record.offset,
                )
            if sequential and offset != host + count * tracker.target_page_size:
                raise MalformedError(
                    "RAM", f"non-sequential target page {offset:#x}", record.offset
                )
            current, count = host, count + 1
            if count == per_host:
                count = 0
        fills[tracker.info.idstr] = (current, count)

    def _on_ram_sync(self, message: m.RamEos | m.RamMultifdFlush, record: Record) -> None:
        # Once postcopy runs, RAM is loaded by ram_load_postcopy, which syncs nothing.
        if self.multifd is not None and not is_postcopy_running(self.state):
            point = self.multifd.sync_point(message, record.offset)
            if point is not None:
                self._pending.append(point)

    def _on_xbzrle(self, message: m.RamXbzrle, record: Record) -> None:
        if is_postcopy_running(self.state):
            raise MalformedError(
                "RAM",
                f"unknown combination of migration flags "
                f"{self.profile.ram_flags['XBZRLE']:#x} (postcopy mode)",
                record.offset,
            )
        raise RemoteProtocolError(
            "RAM", "XBZRLE pages are not supported by qmig's destination", record.offset
        )

    def _on_compressed(self, message: m.RamCompressed, record: Record) -> None:
        raise RemoteProtocolError("RAM", "received an unexpected compressed page", record.offset)

    def _on_eof(self, message: m.Eof, record: Record) -> None:
        if record.depth:
            return  # a package's own end: the outer stream goes on
        if self._transition(DestinationInput.EOF, record.offset) is DestinationState.END:
            self._complete(postcopy=True)

    def _on_vmdescription(self, message: m.VmDescription | None, record: Record | None) -> None:
        """The VMDESCRIPTION after a precopy EOF; None: it is missing or damaged, which QEMU
        only reports."""
        offset = self.reader.offset if record is None else record.offset
        self._transition(DestinationInput.VMDESCRIPTION, offset)
        self._complete(postcopy=False)

    def _complete(self, *, postcopy: bool) -> None:
        self._shut(0)
        self._pending.append(ev.MigrationCompleted(postcopy))

    def _end_of_input(self) -> None:
        if self.state is DestinationState.EOF_READ:
            self._on_vmdescription(None, None)


def _bad_range(
    block: str, tracker: BlockTracker, span: m.DiscardRange, offset: int, index: int
) -> MalformedError:
    """The error for the discard range ``index`` of the command at ``offset``."""
    at = offset + 5 + 3 + len(block) + 16 * index
    if span.start % tracker.page_size or span.length % tracker.page_size:
        return MalformedError(
            "POSTCOPY_RAM_DISCARD",
            f"range {span.start:#x}+{span.length:#x} of {block!r} is not "
            f"aligned to its {tracker.page_size:#x} byte pages",
            at,
        )
    used = tracker.info.used_length
    return MalformedError(
        "POSTCOPY_RAM_DISCARD",
        f"range {span.start:#x}+{span.length:#x} is outside block "
        f"{block!r} (used length {used:#x})",
        at,
    )


_HANDLERS: dict[type, Any] = {
    m.StreamHeader: Destination._on_header,
    m.Configuration: Destination._on_configuration,
    m.OpenReturnPath: Destination._on_open_return_path,
    m.Ping: Destination._on_ping,
    m.PostcopyAdvise: Destination._on_advise,
    m.PostcopyRamDiscard: Destination._on_discard,
    m.PostcopyRamDiscards: Destination._on_discards,
    m.PostcopyListen: Destination._on_listen,
    m.PostcopyRun: Destination._on_run,
    m.EnableColo: Destination._on_colo,
    m.PostcopyResume: Destination._on_resume,
    m.RecvBitmap: Destination._on_recv_bitmap,
    m.SectionStart: Destination._on_section,
    m.SectionFull: Destination._on_section,
    m.DeviceState: Destination._on_device,
    m.MemSize: Destination._on_mem_size,
    m.RamPageRun: Destination._on_pages,
    m.RamXbzrle: Destination._on_xbzrle,
    m.RamEos: Destination._on_ram_sync,
    m.RamMultifdFlush: Destination._on_ram_sync,
    m.RamCompressed: Destination._on_compressed,
    m.Eof: Destination._on_eof,
    m.VmDescription: Destination._on_vmdescription,
}
