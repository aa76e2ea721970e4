"""The source of a migration, sans-IO: RAM views and events in, stream bytes out.

Drive it like this::

    src = Source(blocks, devices=devices, version="7.2")
    src.start()
    sock.sendall(src.data_to_send(1 << 20))
    src.receive_data(return_path_bytes)   # REQ_PAGES jump the queue
    while (event := src.next_event()) is not NEED_DATA:
        ...  # PhaseChanged, PassCompleted (sync the dirty log, then begin_pass() or
             # start_postcopy()), PONG, SHUT, requests

Its states and what moves them are the table in :mod:`qmig.protocol.states`; every change
of state is reported as a :class:`~qmig.protocol.events.PhaseChanged` event, in order.

It sends what a QEMU 7.2 source sends, in its order: header, CONFIGURATION,
OPEN_RETURN_PATH, PING(1), POSTCOPY_ADVISE, the ``ram`` SECTION_START with MEM_SIZE, precopy
SECTION_PARTs; at switchover the discards (at most the profile's per-command number of
ranges), PING(2), PACKAGED(LISTEN, device state, PING(3), RUN), PING(4); then postcopy
SECTION_PARTs with requested pages first, SECTION_END and EOF. A page is sent when it is
dirty: never sent, or changed (and so discarded) since it was sent. Nothing else is resent.

The machine reads guest RAM through the buffers it is given (it never maps or writes
memory) and keeps the dirty map, one byte per target page.
"""

from __future__ import annotations

import json
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from qmig.errors import LocalProtocolError, QmigError, RemoteProtocolError
from qmig.host import HOST_PAGE_SIZE
from qmig.protocol import events as ev
from qmig.protocol.multifd_source import MultifdPlan, MultifdSendOptions, PacketOut
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.recv_bitmap import bitmap_size, missing_pages
from qmig.protocol.states import (
    LOCAL_SOURCE_INPUTS,
    SOURCE_STOPS_READING,
    Ignored,
    Refused,
    SourceInput,
    SourceState,
    source_refusal,
    source_table,
)
from qmig.wire import messages as m
from qmig.wire.ramscan import RamScanner
from qmig.wire.reader import END, NEED_DATA, Record, ReturnPathReader
from qmig.wire.schema import RESUME_ACK_VALUE, schema_for

RAM_SECTION_ID = 2
FIRST_DEVICE_SECTION_ID = 3
DIRTY = 1


@dataclass
class SourceBlock:
    """One RAMBlock of the source guest: a read-only view of its memory and its dirty map."""

    idstr: str
    used_length: int
    ram: Any  # a buffer of at least used_length bytes
    page_size: int = HOST_PAGE_SIZE  # what backs it: ordinary memory unless told
    dirty: bytearray = field(default_factory=bytearray, repr=False)

    def __post_init__(self) -> None:
        if len(memoryview(self.ram)) < self.used_length:
            raise LocalProtocolError("source", f"block {self.idstr!r} memory is too small")


@dataclass(frozen=True)
class DeviceSnapshot:
    """One device's saved state, as opaque bytes (a SECTION_FULL payload)."""

    idstr: str
    instance_id: int
    version_id: int
    data: bytes
    section_id: int | None = None


@dataclass(frozen=True)
class SweepOrder:
    """The background sweep's next batch (see :meth:`Source.sweep_order`): from target page
    ``start`` of block ``block`` (the ``index``-th), the dirty pages in order, ``limit`` of
    them and then the rest of the last one's host page; the first record names the block if
    ``named``, every other one CONTINUEs it."""

    block: str
    index: int
    start: int
    limit: int
    named: bool


@dataclass
class SourceStats:
    precopy_pages: int = 0
    precopy_zero_pages: int = 0
    precopy_bytes: int = 0
    postcopy_pages: int = 0
    postcopy_zero_pages: int = 0
    postcopy_bytes: int = 0
    requested_pages: int = 0
    requests: int = 0
    discard_commands: int = 0
    discarded_pages: int = 0
    passes: int = 0
    recoveries: int = 0  # RESUME_ACKs taken
    resent_pages: int = 0  # target pages the received bitmaps said were missing


class Source:
    """QEMU's outgoing side, for one migration."""

    def __init__(
        self,
        blocks: Sequence[SourceBlock],
        *,
        version: str | None = None,
        machine_type: str | None = None,
        postcopy_ram: bool = True,
        return_path: bool = True,
        devices: Sequence[DeviceSnapshot] = (),
        pages_per_section: int = 512,
        host_page_size: int = HOST_PAGE_SIZE,
        configuration: m.Configuration | None = None,
        vmdescription: bytes | None = None,
        preempt: PreemptVariant | None = None,
        multifd: MultifdSendOptions | None = None,
    ) -> None:
        """``preempt``: postcopy-preempt is on: requested pages go out on the preempt
        channel (:meth:`preempt_data`), whose variant says when it opens and how it ends.
        ``multifd``: precopy pages go out in packets on extra channels
        (:meth:`take_multifd_steps`; :mod:`qmig.protocol.multifd_source` decides)."""
        self.schema = schema_for(version)
        self.profile = self.schema.profile
        self.target_page_size = self.schema.target_page_size
        self.blocks = list(blocks)
        self.by_name = {block.idstr: block for block in self.blocks}
        # None: what the version's `-machine pc` names (QEMU's source is as new as it).
        self.machine_type = machine_type or self.profile.default_machine_type
        # A replay passes the captured CONFIGURATION and VMDESCRIPTION, to resend them as is.
        self.configuration = configuration or m.Configuration(self.machine_type)
        self.vmdescription = vmdescription
        self.postcopy_ram = postcopy_ram
        self.return_path = return_path or postcopy_ram
        self.devices = list(devices)
        self.pages_per_section = pages_per_section
        self.host_page_size = host_page_size
        self.state = SourceState.IDLE
        self._table = source_table()
        self._overruns = _range_check(self.profile.request_range_check)
        self.stats = SourceStats()
        self.pongs: list[int] = []
        # The PING the package puts right before RUN: the destination answers it as it
        # reaches RUN (see :attr:`destination_runs`).
        self._run_ping: int | None = None
        self._scanner = RamScanner(self.schema)
        self._rp = ReturnPathReader(version)
        self._out = bytearray()
        self._events: deque[ev.Event] = deque()
        self._cursor = (0, 0)  # (block index, target page index) of the precopy sweep
        self._requests: deque[tuple[SourceBlock, int]] = deque()  # (block, target page)
        # Host pages (block, first target page) queued by a request since the queue was last
        # empty: a later request for one finds it sent by then (see _sent_before, which
        # forgets them once the queue is empty).
        self._queued: set[tuple[str, int]] = set()
        self._last_request_block: SourceBlock | None = None
        self._ping = 0
        self._discard_templates: dict[tuple[str, int], bytes] = {}
        # Every RAM SECTION_PART opens and closes with the same bytes: build them once, not
        # per section (construct costs more than a section of zero pages).
        self._part_open = self.schema.build_section(m.SectionPart(RAM_SECTION_ID))
        self._section_bytes = pages_per_section * (self.target_page_size + 8)
        # The block the open section's records last named: later records of the same block
        # CONTINUE it, as QEMU's do, and only the first of a section or of a new block names.
        self._named_block: SourceBlock | None = None
        # Postcopy keeps one SECTION_PART open across sends, closed every pages_per_section
        # pages: a section per small send would cost the destination a header, a named
        # record and a footer for every few pages.
        self._postcopy_section_open = False
        self._postcopy_section_pages = 0
        self._postcopy_started = False
        self._bitmaps_awaited: set[str] = set()  # recovery: blocks whose bitmap is to come
        self._part_close = self.schema.build_ram_flag("EOS") + self.schema.build_footer(
            RAM_SECTION_ID
        )
        self.preempt = preempt
        if preempt is not None and not postcopy_ram:
            raise LocalProtocolError("source", "postcopy-preempt requires postcopy-ram")
        self._preempt_out = bytearray()
        self.awaiting_preempt_channel = False  # recovery: the bitmaps are in, see _on_bitmap
        self._preempt_named: SourceBlock | None = None  # the preempt channel's last block
        self.preempt_pages = 0  # target pages sent on the preempt channel
        for block in self.blocks:
            block.dirty = bytearray(b"\x01") * self._pages(block)
        self.multifd: MultifdPlan | None = None
        # Main-channel bytes and packets in the order they must leave: the main bytes made
        # since are data_to_send's, and go after these.
        self._multifd_steps: list[bytes | PacketOut] = []
        self._multifd_queued = 0  # their bytes: count against data_to_send's budget
        if multifd is not None:
            self.multifd = MultifdPlan(
                self.profile,
                multifd,
                machine_type=self.configuration.machine_type,
                target_page_size=self.target_page_size,
                postcopy=postcopy_ram,
            )

    # --- the plan -------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the stream's opening: header, configuration, commands, the ram START."""
        after = self._next(SourceInput.START)
        schema = self.schema
        out = self._out
        out += schema.header.build(m.StreamHeader(self.profile.stream_version))
        out += schema.configuration.build(self.configuration)
        if self.return_path:
            out += schema.build_command(m.OpenReturnPath())
            self._send_ping()
        if self.postcopy_ram:
            summary = 0
            for block in self.blocks:
                summary |= block.page_size
            out += schema.build_command(m.PostcopyAdvise(summary, self.target_page_size))
        out += schema.build_section(m.SectionStart(RAM_SECTION_ID, "ram", 0, 4))
        infos = tuple(
            m.RamBlockInfo(
                block.idstr,
                block.used_length,
                block.page_size
                if self.postcopy_ram and block.page_size != self.host_page_size
                else None,
            )
            for block in self.blocks
        )
        out += schema.build_mem_size(m.MemSize(sum(b.used_length for b in self.blocks), infos))
        if self.multifd is not None:
            self._multifd_sync(flush_flag=not self.multifd.per_section)
        out += schema.build_ram_flag("EOS") + schema.build_footer(RAM_SECTION_ID)
        self.stats.passes = 1
        self._enter(after)

    def begin_pass(self) -> None:
        """Start another precopy pass over whatever is dirty now."""
        after = self._next(SourceInput.BEGIN_PASS)
        self._cursor = (0, 0)
        self.stats.passes += 1
        self._enter(after)

    def sync_dirty(self, block: str, pages: Iterable[int]) -> None:
        """Target pages of ``block`` the guest wrote since the last sync (QEMU's bitmap sync)."""
        self._next(SourceInput.SYNC_DIRTY)
        dirty = self.by_name[block].dirty
        for page in pages:
            dirty[page] = DIRTY

    def dirty_pages(self) -> int:
        return sum(block.dirty.count(DIRTY) for block in self.blocks)

    @property
    def pending_requests(self) -> int:
        """Host pages requested on the return path and not yet put in the stream."""
        return len(self._requests)

    def start_postcopy(self) -> None:
        """Switch over: the guest is stopped; discard what changed, hand over devices and run."""
        after = self._next(SourceInput.START_POSTCOPY)
        if not self.postcopy_ram:
            raise LocalProtocolError("source", "postcopy-ram is off: cannot start postcopy")
        if self.multifd is not None:
            self._multifd_before_postcopy()
        for block in self.blocks:
            self._canonicalise_host_pages(block)
            self._send_discards(block)
        self._send_ping()
        package = self.schema.build_command(m.PostcopyListen())
        package += self._device_sections()
        package += self._ping_bytes()
        self._run_ping = self._ping
        if self.profile.package_loaded_ping is not None and self.return_path:
            package += self.schema.build_command(m.Ping(self.profile.package_loaded_ping))
        package += self.schema.build_command(m.PostcopyRun())
        self._out += self.schema.build_packaged(package)
        self._send_ping()
        self._cursor = (0, 0)
        self._postcopy_started = True
        self._enter(after)

    @property
    def destination_runs(self) -> bool:
        """Has the destination answered the package's PING before RUN? It reads the package
        in order, so it has reached RUN: QEMU sets its postcopy state to running there, and
        only from then on does a broken channel pause it instead of failing the migration
        (its listen thread may read past the package before the main thread reaches RUN)."""
        return self._run_ping is not None and self._run_ping in self.pongs

    # --- postcopy recovery ----------------------------------------------------------------

    def channel_broken(self) -> None:
        """The connection to the destination broke. In postcopy this pauses the migration
        (QEMU's postcopy-paused): what was queued for the old channel is dropped, and so
        are the queued page requests (the destination asks again after the resume). Any
        earlier it is a LocalProtocolError: the migration has failed."""
        if self.state is SourceState.COMPLETING and not self._postcopy_started:
            raise LocalProtocolError(
                "source", "the connection broke during precopy completion (state completing)"
            )
        after = self._next(SourceInput.CHANNEL_BROKEN)
        self._out.clear()
        self._preempt_out.clear()
        self._preempt_named = None
        self.awaiting_preempt_channel = False
        self._requests.clear()
        self._postcopy_section_open = False
        self._named_block = None
        self._bitmaps_awaited.clear()
        self._enter(after)

    def resume(self) -> None:
        """Resume on a new channel (QEMU's ``migrate`` with ``resume: true``): ask for each
        block's received bitmap. Once all are in, POSTCOPY_RESUME follows; RESUME_ACK
        brings the migration back to postcopy. Nothing else opens the new channel."""
        after = self._next(SourceInput.RESUME)
        self._rp.new_channel()
        self._rp.bitmap_sizes = {
            block.idstr: bitmap_size(block.used_length // self.target_page_size)
            for block in self.blocks
        }
        self._last_request_block = None
        for block in self.blocks:
            self._out += self.schema.build_command(m.RecvBitmap(block.idstr))
        self._bitmaps_awaited = {block.idstr for block in self.blocks}
        self._enter(after)

    def _on_bitmap(self, message: m.RpRecvBitmap, record: Record) -> None:
        """The complement of a block's received bitmap is its new dirty map: whatever the
        destination lacks (never sent, or lost with the old channel) goes out again."""
        self._next(SourceInput.RECV_BITMAP, record.name, record.offset)
        block = self.by_name.get(message.block)
        if block is None:  # the reader knows the blocks; this guards a reader without them
            self._fail(
                RemoteProtocolError(
                    record.name, f"invalid block name {message.block!r}", record.offset
                )
            )
        pages = block.used_length // self.target_page_size
        dirty = missing_pages(message.bitmap, pages)
        dirty += bytes(self._pages(block) - pages)  # a partial last page: not in the bitmap
        block.dirty = dirty
        self._canonicalise_host_pages(block)
        missing = block.dirty.count(DIRTY)
        self.stats.resent_pages += missing
        self._events.append(ev.BitmapReceived(block.idstr, missing))
        self._bitmaps_awaited.discard(block.idstr)
        if not self._bitmaps_awaited:
            if self.preempt is not None and not self.preempt.opened_at_setup:
                # QEMU 8.0+ opens the preempt channel again here, after the bitmap sync (so
                # that the main one is the first the destination sees), and only then
                # resumes. The pre-7.2 variant opened it with the main one, as at setup.
                self.awaiting_preempt_channel = True
            else:
                self._out += self.schema.build_command(m.PostcopyResume())

    def preempt_channel_opened(self) -> None:
        """Recovery with postcopy-preempt: the new preempt channel is up; POSTCOPY_RESUME
        follows on the main one."""
        if not self.awaiting_preempt_channel:
            raise LocalProtocolError("source", "no preempt channel is awaited")
        self.awaiting_preempt_channel = False
        self._out += self.schema.build_command(m.PostcopyResume())

    def _on_resume_ack(self, message: m.ResumeAck, record: Record) -> None:
        if message.value != RESUME_ACK_VALUE:
            self._fail(
                RemoteProtocolError(
                    record.name, f"illegal resume_ack value {message.value}", record.offset
                )
            )
        after = self._next(SourceInput.RESUME_ACK, record.name, record.offset)
        if after is self.state:
            return  # outside recovery: QEMU's state change does not apply
        # The sweep starts over; the first record of the new section names its block.
        self._cursor = (0, 0)
        self._named_block = None
        self._postcopy_section_open = False
        self.stats.recoveries += 1
        self._enter(after)

    def complete_precopy(self) -> None:
        """Finish without postcopy: the guest is stopped; send what is dirty, devices, EOF."""
        after = self._next(SourceInput.COMPLETE_PRECOPY)
        schema = self.schema
        out = self._out
        out += schema.build_section(m.SectionEnd(RAM_SECTION_ID))
        self._cursor = (0, 0)
        while (batch := self._next_dirty_batch(1 << 30)) is not None:
            out += self._page_records(*batch, postcopy=False)
        if self.multifd is not None:
            # Per section: the EOS waits for a sync. Per round: the sweep has passed the last
            # block, which syncs and says so.
            self._multifd_sync(flush_flag=not self.multifd.per_section)
        out += schema.build_ram_flag("EOS") + schema.build_footer(RAM_SECTION_ID)
        out += self._device_sections()
        out += schema.eof.build(m.Eof())
        description = self.vmdescription
        if description is None:
            description = self._vmdescription()
        out += schema.vmdescription.build(m.VmDescription(description))
        self._enter(after)
        if not self.return_path:
            self._move(SourceInput.NO_RETURN_PATH)

    # --- output ---------------------------------------------------------------------------

    def data_to_send(self, budget: int = 1 << 20) -> bytes:
        """Up to about ``budget`` bytes of stream (at least one section while pages remain)."""
        if self.state is SourceState.PRECOPY and self._queued_bytes() < budget:
            # A precopy section holds up to pages_per_section pages whatever the budget (which
            # it may overshoot by that much): QEMU's are larger still, and each section costs
            # the destination a header, a named first record and a footer to parse. More
            # sections follow while a whole page still fits in the budget: a section of zero
            # pages is only a few kilobytes.
            self._precopy_section(self._section_bytes)
            room = self.target_page_size + 8
            while self.state is SourceState.PRECOPY and budget - self._queued_bytes() > room:
                self._precopy_section(self._section_bytes)
        elif self.state is SourceState.POSTCOPY and len(self._out) < budget:
            self._postcopy_section(budget - len(self._out))
        out = bytes(self._out)
        self._out.clear()
        return out

    def _queued_bytes(self) -> int:
        return len(self._out) + self._multifd_queued

    def preempt_data(self) -> bytes:
        """Postcopy-preempt: the bytes for the preempt channel (requested pages, each host
        page whole, and EOS at the end in the pre-7.2 variant)."""
        if self.state is SourceState.POSTCOPY and self._requests:
            self._urgent_pages()
        out = bytes(self._preempt_out)
        self._preempt_out.clear()
        return out

    def _urgent_pages(self) -> None:
        """Every queued request onto the preempt channel. The background sweep stays where
        it is: it goes on on the main channel, where it was."""
        while self._requests:
            block, first = self._requests.popleft()
            per_host = block.page_size // self.target_page_size
            wanted = array("Q", (p for p in range(first, first + per_host) if block.dirty[p]))
            if wanted:
                data = self._page_records(
                    block, wanted, postcopy=True, requested=True, preempt=True
                )
                self._preempt_out += data
                self.preempt_pages += len(wanted)

    @property
    def preempt_block(self) -> str | None:
        """The block the preempt channel's last record named (its CONTINUE state), or None."""
        return None if self._preempt_named is None else self._preempt_named.idstr

    def forget_preempt_block(self) -> None:
        """The next preempt record names its block whatever came before (another writer may
        have written on the channel since this machine last did)."""
        self._preempt_named = None

    def answered_elsewhere(
        self, block: str, pages: Sequence[int], *, zeros: int, size: int, main: bool = False
    ) -> None:
        """Requested target ``pages`` of ``block`` were written outside this machine (the
        runner's C answer thread): they are clean, counted as requested postcopy pages, and
        are not answered again. On the preempt channel (QEMU 8.0's return-path thread writes
        them there) that channel's last block is ``block``. On the main channel (``main``:
        QEMU's migration thread sends queued requests before its next background page) they
        went between this machine's records: its next record names its block, and the
        background sweep goes on after them, as it does after a request it answers itself."""
        source_block = self.by_name[block]
        for page in pages:
            source_block.dirty[page] = 0
        if main:
            self._named_block = None
            self._sweep_after(source_block, max(pages))
        else:
            self._preempt_named = source_block
            self.preempt_pages += len(pages)
        self._count_postcopy(len(pages), zeros, size)
        self.stats.requested_pages += len(pages)

    @property
    def records_may_follow(self) -> bool:
        """Postcopy: the main-channel stream taken so far ends inside a RAM section's records,
        where another writer's page records may go (not between sections, nor after the
        end)."""
        return self.state is SourceState.POSTCOPY and self._postcopy_section_open

    @property
    def last_request_block(self) -> str | None:
        """The block the return path's last REQ_PAGES_ID named (a REQ_PAGES asks for more
        of it), or None: none yet on this channel."""
        block = self._last_request_block
        return None if block is None else block.idstr

    @property
    def return_path_between_messages(self) -> bool:
        """Every return-path byte fed so far was read as whole messages: another reader may
        take the return path over from the next byte."""
        return self._rp.fed == self._rp.offset

    def requested_data(self) -> bytes:
        """Postcopy: the pages asked for on the return path and not yet in the stream, and
        nothing else. A runner sends them as soon as they are asked for, ahead of the
        background sweep and outside its bandwidth cap, as QEMU's source does (its RAM loop
        goes on past the rate limit while requests are queued). Stream bytes still queued
        (the switchover, if not taken yet) come first; with no request, nothing is taken."""
        if self.state is not SourceState.POSTCOPY or not self._requests:
            return b""
        if self.preempt is not None:
            return b""  # they go on the preempt channel: preempt_data()
        self._postcopy_section(0, sweep=False)
        out = bytes(self._out)
        self._out.clear()
        return out

    def _precopy_section(self, budget: int) -> None:
        batch = self._next_dirty_batch(self._pages_for(budget))
        if batch is None:
            if self.multifd is not None and not self.multifd.per_section:
                self._multifd_round_end()
            self._move(SourceInput.PASS_SENT)
            return
        self._out += self._part_open
        self._named_block = None
        self._out += self._page_records(*batch, postcopy=False)
        if self.multifd is not None and self.multifd.per_section:
            self._multifd_sync(flush_flag=False)
        self._out += self._part_close

    def _postcopy_section(self, budget: int, *, sweep: bool = True) -> None:
        if self.preempt is not None:
            self._urgent_pages()
        self._open_postcopy_section()
        records = bytearray()
        allowed = pages = (
            self._pages_for(budget)
            if sweep
            else len(self._requests)
            * max(block.page_size // self.target_page_size for block in self.blocks)
        )
        while self._requests and pages > 0:
            block, first = self._requests.popleft()
            per_host = block.page_size // self.target_page_size
            wanted = array("Q", (p for p in range(first, first + per_host) if block.dirty[p]))
            if wanted:
                records += self._page_records(block, wanted, postcopy=True, requested=True)
                pages -= len(wanted)
            self._sweep_after(block, first)
        if sweep and pages > 0 and not self._requests:
            batch = self._next_dirty_batch(pages, wrap=True)
            if batch is not None:
                records += self._page_records(*batch, postcopy=True)
                pages -= len(batch[1])
        if records:
            self._out += records
            self._postcopy_section_pages += allowed - pages
            if self._postcopy_section_pages >= self.pages_per_section:
                self._close_postcopy_section()
        elif sweep and not self._requests and self.dirty_pages() == 0:
            self._finish_postcopy()

    def _sweep_after(self, block: SourceBlock, page: int) -> None:
        """The background sweep goes on after the host page of ``block`` that holds target
        ``page``, as QEMU's source goes on after a requested page: a guest that faulted
        there is likely to touch the pages that follow next."""
        per_host = block.page_size // self.target_page_size
        self._cursor = (self.blocks.index(block), page - page % per_host + per_host)

    def _open_postcopy_section(self) -> None:
        """A RAM SECTION_PART for postcopy's records, unless one is open; its first record
        names its block."""
        if self._postcopy_section_open:
            return
        self._out += self._part_open
        self._named_block = None
        self._postcopy_section_open = True
        self._postcopy_section_pages = 0

    def _close_postcopy_section(self) -> None:
        self._out += self._part_close
        self._postcopy_section_open = False

    def _finish_postcopy(self) -> None:
        if self._postcopy_section_open:
            self._close_postcopy_section()
        schema = self.schema
        self._out += schema.build_section(m.SectionEnd(RAM_SECTION_ID))
        self._out += schema.build_ram_flag("EOS") + schema.build_footer(RAM_SECTION_ID)
        self._out += schema.eof.build(m.Eof())
        if self.preempt is not None and self.preempt.ends_with_eos:
            self._preempt_out += schema.build_ram_flag("EOS")
        self._move(SourceInput.STREAM_SENT)

    def _count_postcopy(self, pages: int, zeros: int, size: int) -> None:
        """``pages`` target pages sent in postcopy (on either channel, by this machine or a
        writer beside it), ``zeros`` of them ZERO records, ``size`` bytes."""
        self.stats.postcopy_pages += pages
        self.stats.postcopy_zero_pages += zeros
        self.stats.postcopy_bytes += size

    def _pages_for(self, budget: int) -> int:
        return max(1, min(self.pages_per_section, budget // (self.target_page_size + 8)))

    def _next_dirty_batch(
        self, limit: int, *, wrap: bool = False
    ) -> tuple[SourceBlock, array[int]] | None:
        """Up to ``limit`` dirty target pages of one block, from the sweep's cursor on
        (``wrap``: see :meth:`_next_dirty_start`)."""
        found = self._next_dirty_start(wrap=wrap)
        if found is None:
            return None
        index, start = found
        block = self.blocks[index]
        pages = array("Q")
        at = start
        while at >= 0 and len(pages) < limit:
            end = block.dirty.find(0, at)
            end = len(block.dirty) if end < 0 else end
            take = min(end, at + limit - len(pages))
            pages.extend(range(at, take))
            at = block.dirty.find(DIRTY, take) if take < len(block.dirty) else -1
        # Host pages go out whole: finish the last one started.
        per_host = block.page_size // self.target_page_size
        last = pages[-1]
        for extra in range(last + 1, last - last % per_host + per_host):
            if block.dirty[extra]:
                pages.append(extra)
        self._cursor = (index, pages[-1] + 1)
        return block, pages

    def _next_dirty_start(self, *, wrap: bool = False) -> tuple[int, int] | None:
        """(block index, target page) of the first dirty page from the sweep's cursor on; None
        (the cursor past the last block) when there is none. ``wrap`` (postcopy's sweep, which
        a request may have moved past dirty pages): then from the start once more."""
        found = self._dirty_from_cursor()
        if found is None and wrap and self._cursor != (0, 0):
            self._cursor = (0, 0)
            found = self._dirty_from_cursor()
        return found

    def _dirty_from_cursor(self) -> tuple[int, int] | None:
        """The first dirty page from the cursor to the last block's end (no wrap)."""
        index, page = self._cursor
        while index < len(self.blocks):
            start = self.blocks[index].dirty.find(DIRTY, page)
            if start >= 0:
                return index, start
            index, page = index + 1, 0
        self._cursor = (index, 0)
        return None

    # --- the background sweep beside the machine --------------------------------------------

    def sweep_order(self, budget: int) -> SweepOrder | None:
        """Postcopy, no request queued: the main channel's background sweep's next batch,
        for a writer beside this machine to take from the dirty map and write (the runner's
        C sweep, ``qmig_answer_sweep``), exactly as :meth:`data_to_send` would take and write
        it; the stream's bytes before it (a section's start) wait in ``data_to_send(0)``.
        None: there is none, or it is not the sweep's turn (requests first, the stream's
        end): :meth:`data_to_send`'s to do. Queued requests whose pages went out already
        are settled first (:meth:`_settle_sent_requests`). Report what was written with
        :meth:`swept`."""
        if self.state is not SourceState.POSTCOPY:
            return None
        self._settle_sent_requests()
        if self._requests:
            return None
        found = self._next_dirty_start(wrap=True)
        if found is None:
            return None
        self._open_postcopy_section()
        index, start = found
        block = self.blocks[index]
        return SweepOrder(
            block.idstr, index, start, self._pages_for(budget), block is not self._named_block
        )

    def _settle_sent_requests(self) -> None:
        """Main channel: the queued requests, from the queue's head, whose pages have all
        gone out (the sweep sent them before the request came, or the runner's C thread
        answered it). Serving one writes nothing and moves the sweep on after its page
        (:meth:`_postcopy_section`); that is done here, so that :meth:`sweep_order` orders
        a batch with them queued, as :meth:`data_to_send` would write one. (The runner's
        loop serves every queued request through :meth:`requested_data` before it asks for
        an order, so there none is left by then.)"""
        if self.preempt is not None:
            return  # they go to the preempt channel, and the sweep stays where it is
        requests = self._requests
        while requests:
            block, first = requests[0]
            end = min(first + block.page_size // self.target_page_size, len(block.dirty))
            if block.dirty.count(0, first, end) != end - first:
                return
            requests.popleft()
            self._sweep_after(block, first)

    def swept(self, order: SweepOrder, *, pages: int, last: int, zeros: int, size: int) -> None:
        """What the writer wrote for ``order``: ``pages`` target pages from ``order.start``
        on, ending with ``last`` (their dirty bytes it cleared), ``zeros`` of them ZERO
        records, ``size`` bytes in all; where the runner's C thread answered requests
        between two of its writes, it went on after them as :meth:`_postcopy_section` goes
        on after a request (:meth:`answered_elsewhere` tells of those). Its next record
        continues the block, the sweep goes on after ``last``, and the section closes once
        it holds pages_per_section pages (its end waits in ``data_to_send(0)``)."""
        if not pages:
            return
        self._named_block = self.blocks[order.index]
        self._cursor = (order.index, last + 1)
        self._count_postcopy(pages, zeros, size)
        self._postcopy_section_pages += pages
        if self._postcopy_section_pages >= self.pages_per_section:
            self._close_postcopy_section()

    def _page_records(
        self,
        block: SourceBlock,
        pages: array[int],
        *,
        postcopy: bool,
        requested: bool = False,
        preempt: bool = False,
    ) -> bytes:
        """``preempt``: for the preempt channel, which names blocks on its own."""
        if self.multifd is not None and not postcopy:
            return self._multifd_pages(block, pages)
        if preempt:
            name = None if block is self._preempt_named else block.idstr
            self._preempt_named = block
        else:
            name = None if block is self._named_block else block.idstr
            self._named_block = block
        data, zeros = self._scanner.emit(block.ram, pages, name)
        first, last = pages[0], pages[-1]
        if last - first + 1 == len(pages):  # a contiguous batch, the usual case: one slice
            block.dirty[first : last + 1] = bytes(len(pages))
        else:
            for page in pages:
                block.dirty[page] = 0
        if postcopy:
            self._count_postcopy(len(pages), zeros, len(data))
            if requested:
                self.stats.requested_pages += len(pages)
        else:
            self.stats.precopy_pages += len(pages)
            self.stats.precopy_zero_pages += zeros
            self.stats.precopy_bytes += len(data)
        return data

    # --- multifd ---------------------------------------------------------------------------

    def take_multifd_steps(self) -> list[bytes | PacketOut]:
        """Multifd: the main-channel bytes and packets made so far, in the order they must
        be written, all ahead of what :meth:`data_to_send` returns next (send these first)."""
        steps = self._multifd_steps
        self._multifd_steps = []
        self._multifd_queued = 0
        return steps

    def _multifd_emit(self, packets: list[PacketOut]) -> None:
        """Packets go after every main-channel byte made before them."""
        if not packets:
            return
        if self._out:
            self._multifd_steps.append(bytes(self._out))
            self._multifd_queued += len(self._out)
            self._out.clear()
        self._multifd_steps.extend(packets)
        for packet in packets:
            self._multifd_queued += packet.size
            self.stats.precopy_zero_pages += packet.zero_pages
            self.stats.precopy_bytes += packet.size

    def _multifd_pages(self, block: SourceBlock, pages: array[int]) -> bytes:
        """Precopy pages with multifd: zero pages as ZERO records on the main channel when the
        zero-page detection is legacy, everything else queued for the packets."""
        plan = self.multifd
        assert plan is not None
        records = b""
        queued = pages
        if plan.zero_pages_on_main:
            queued, zero = plan.split_zero(block.ram, pages)
            if zero:
                name = None if block is self._named_block else block.idstr
                self._named_block = block
                records, zeros = self._scanner.emit(block.ram, zero, name)
                self.stats.precopy_zero_pages += zeros
        if queued:
            self._multifd_emit(plan.queue(block, queued))
        first, last = pages[0], pages[-1]
        if last - first + 1 == len(pages):
            block.dirty[first : last + 1] = bytes(len(pages))
        else:
            for page in pages:
                block.dirty[page] = 0
        self.stats.precopy_pages += len(pages)
        self.stats.precopy_bytes += len(records)
        return records

    def _multifd_sync(self, *, flush_flag: bool) -> None:
        """Flush the queue and sync every channel; ``flush_flag``: then say so on the main
        channel (RAM_SAVE_FLAG_MULTIFD_FLUSH, which the destination waits on)."""
        assert self.multifd is not None
        self._multifd_emit(self.multifd.sync())
        if flush_flag:
            self._out += self.schema.build_ram_flag("MULTIFD_FLUSH")

    def _multifd_round_end(self) -> None:
        """Per round: the sweep passed the last block; QEMU syncs there, inside the RAM
        section it is sending (here a section of its own)."""
        self._out += self._part_open
        self._named_block = None
        self._multifd_sync(flush_flag=True)
        self._out += self._part_close

    def _multifd_before_postcopy(self) -> None:
        """QEMU 10.1+: multifd carried precopy; before the switch the source flushes what is
        queued and syncs the channels, in a RAM section of its own, so that no packet lands
        on a page the destination already runs with."""
        assert self.multifd is not None
        self._out += self._part_open
        self._named_block = None
        self._multifd_sync(flush_flag=not self.multifd.per_section)
        self._out += self._part_close

    def _send_ping(self) -> None:
        self._out += self._ping_bytes()

    def _ping_bytes(self) -> bytes:
        if not self.return_path:
            return b""
        self._ping += 1
        return self.schema.build_command(m.Ping(self._ping))

    def _canonicalise_host_pages(self, block: SourceBlock) -> None:
        """A host page with any dirty target page is dirty as a whole (and is discarded)."""
        per_host = block.page_size // self.target_page_size
        if per_host == 1:
            return
        dirty = block.dirty
        at = dirty.find(DIRTY)
        while at >= 0:
            first = at - at % per_host
            dirty[first : first + per_host] = b"\x01" * per_host
            at = dirty.find(DIRTY, first + per_host)

    def _send_discards(self, block: SourceBlock) -> None:
        # Switchover is downtime: a guest dirtying pages at random leaves tens of thousands of
        # runs, so the runs are found and packed as big-endian (start, length) pairs in C, and
        # only each command's prefix comes from the schema (see _discard_command).
        packed, pages = self._scanner.dirty_ranges(block.dirty, block.used_length)
        self.stats.discarded_pages += pages
        step = 16 * self.profile.max_discard_ranges
        view = memoryview(packed)
        full = (  # the prefix of a command with the most ranges, built once
            self._discard_command(block.idstr, bytes(step))[:-step] if len(packed) >= step else b""
        )
        out = self._out
        for first in range(0, len(packed), step):
            if first + step <= len(packed):
                out += full
                out += view[first : first + step]
            else:
                out += self._discard_command(block.idstr, packed[first:])
            self.stats.discard_commands += 1

    def _discard_command(self, idstr: str, packed: bytes) -> bytes:
        """POSTCOPY_RAM_DISCARD for ``packed`` (start, length) pairs, as big-endian u64s.

        The schema builds the command with as many zero ranges (once per block and count);
        the ranges are its last bytes, so the real ones replace them."""
        count = len(packed) // 16
        key = (idstr, count)
        template = self._discard_templates.get(key)
        if template is None:
            zeros = (m.DiscardRange(0, 0),) * count
            built = self.schema.build_command(m.PostcopyRamDiscard(idstr, zeros))
            template = self._discard_templates[key] = built[: len(built) - len(packed)]
        return template + packed

    def _device_sections(self) -> bytes:
        out = bytearray()
        for number, device in enumerate(self.devices):
            section_id = (
                device.section_id
                if device.section_id is not None  # 0 is a real id (QEMU's "timer")
                else FIRST_DEVICE_SECTION_ID + number
            )
            out += self.schema.build_section(
                m.SectionFull(section_id, device.idstr, device.instance_id, device.version_id)
            )
            out += device.data
            out += self.schema.build_footer(section_id)
        return bytes(out)

    def _vmdescription(self) -> bytes:
        """A VMDESCRIPTION that delimits each device's state as one opaque buffer."""
        devices = [
            {
                "name": device.idstr,
                "instance_id": device.instance_id,
                "vmsd_name": device.idstr,
                "version": device.version_id,
                "fields": [{"name": "data", "type": "buffer", "size": len(device.data)}],
            }
            for device in self.devices
        ]
        return json.dumps({"page_size": self.target_page_size, "devices": devices}).encode()

    # --- the return path ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state in SOURCE_STOPS_READING:
            return
        self._rp.feed(data)
        self._drain_return_path()

    def receive_eof(self) -> None:
        self._rp.feed_eof()
        self._drain_return_path()
        self._move(SourceInput.RETURN_PATH_CLOSED, "return path", self._rp.offset)

    @property
    def pass_complete(self) -> bool:
        """A precopy pass is out (the state PASS_COMPLETE; runners take PassCompleted)."""
        return self.state is SourceState.PASS_COMPLETE

    def next_event(self) -> ev.Event | ev.Sentinel:
        """The next event (state changes, pass completions, return-path messages), or
        NEED_DATA."""
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    def _drain_return_path(self) -> None:
        while self.state not in SOURCE_STOPS_READING:
            try:
                record = self._rp.next_record()
            except RemoteProtocolError as error:
                self._fail(error)
            if record is NEED_DATA or record is END:
                return
            assert isinstance(record, Record)
            self._on_message(record)

    def _fail(self, error: RemoteProtocolError) -> NoReturn:
        if error.state is None:
            error.state = self.state.value
        self._enter(SourceState.FAILED)
        raise error

    def _on_message(self, record: Record) -> None:
        message = record.message
        if isinstance(message, m.Pong):
            self.pongs.append(message.value)
            self._events.append(ev.PongReceived(message.value))
        elif isinstance(message, m.Shut):
            self._on_shut(message, record)
        elif isinstance(message, m.ReqPagesId | m.ReqPages):
            self._on_request(message, record)
        elif isinstance(message, m.RpRecvBitmap):
            self._on_bitmap(message, record)
        elif isinstance(message, m.ResumeAck):
            self._on_resume_ack(message, record)
        else:
            self._events.append(ev.Notice(record.name, "ignored by qmig's source", record.offset))

    def _on_shut(self, message: m.Shut, record: Record) -> None:
        if message.status != 0:
            self._fail(
                RemoteProtocolError(
                    "SHUT", f"the destination reported an error ({message.status})", record.offset
                )
            )
        after = self._next(SourceInput.SHUT, "SHUT", record.offset)
        self._events.append(ev.DestinationShut(message.status))
        self._enter(after)

    def _on_request(self, message: m.ReqPages | m.ReqPagesId, record: Record) -> None:
        """QEMU's order (migrate_handle_rp_req_pages, ram_save_queue_pages): alignment to
        the source's host pages, then the block, then the range inside it."""
        name = record.name
        self._next(SourceInput.REQUEST, name, record.offset)
        start, length = message.start, message.length
        if start % self.host_page_size or length % self.host_page_size:
            self._fail(
                RemoteProtocolError(
                    name,
                    f"misaligned page request, start: {start:#x} len: {length:#x}",
                    record.offset,
                )
            )
        if isinstance(message, m.ReqPagesId):
            block = self.by_name.get(message.block)
            if block is None:
                self._fail(RemoteProtocolError(name, f"no block {message.block!r}", record.offset))
            self._last_request_block = block
        else:
            # The return-path reader refuses a REQ_PAGES with no REQ_PAGES_ID before it
            # (QEMU's "no previous block"), so a block has been named by now.
            block = self._last_request_block
        assert block is not None
        if self._overruns(start, length, block.used_length):
            self._fail(
                RemoteProtocolError(
                    name,
                    f"request overrun start={start:#x} len={length:#x} "
                    f"blocklen={block.used_length:#x}",
                    record.offset,
                )
            )
        self.stats.requests += 1
        per_host = block.page_size // self.target_page_size
        first = start // self.target_page_size
        last = (start + length) // self.target_page_size
        host_pages = range(first - first % per_host, last, per_host)
        already = self._sent_before(block, first, last, host_pages)
        queued = self._queued
        for page in host_pages:
            self._requests.append((block, page))
            queued.add((block.idstr, page))
        self._events.append(ev.RequestReceived(block.idstr, start, length, already))

    def _sent_before(self, block: SourceBlock, first: int, last: int, host_pages: range) -> bool:
        """Will a request for target pages ``first`` to ``last`` (its ``host_pages``) find
        them all sent when it is served, as QEMU's migration thread finds a queued page that
        is no longer dirty (get_queued_page_not_dirty)? Requests are served in order, before
        any other page goes out: a page clean now was sent before the request came (or
        answered by the runner's C thread, which tells the runner itself), and one that an
        earlier request still queued asks for goes out for that one."""
        queued = self._queued
        if not self._requests:
            queued.clear()  # every host page queued so far has been served: clean, or sent
        dirty = block.dirty
        end = min(last, len(dirty))
        if dirty.count(0, first, end) == end - first:  # one C-level count, the usual answer
            return True
        if not queued:
            return False
        name, per_host = block.idstr, block.page_size // self.target_page_size
        for page in host_pages:
            low, high = max(page, first), min(page + per_host, end)
            if (name, page) not in queued and dirty.count(0, low, high) != high - low:
                return False
        return True

    # --- helpers --------------------------------------------------------------------------

    def _pages(self, block: SourceBlock) -> int:
        return -(-block.used_length // self.target_page_size)

    def _next(
        self, action: SourceInput, what: str = "source", offset: int | None = None
    ) -> SourceState:
        """The state the table gives ``action`` now, or the error for an illegal one: the
        runner's (LocalProtocolError) or the destination's (RemoteProtocolError)."""
        entry = self._table[self.state].get(action)
        if isinstance(entry, SourceState):
            return entry
        if isinstance(entry, Ignored):
            self._events.append(ev.Notice(what, entry.reason, offset))
            return self.state
        detail = entry.reason if isinstance(entry, Refused) else source_refusal(self.state, action)
        if action in LOCAL_SOURCE_INPUTS:
            raise LocalProtocolError(what, f"{detail} (state {self.state.value})", offset)
        self._fail(RemoteProtocolError(what, detail, offset, state=self.state.value))

    def _move(self, action: SourceInput, what: str = "source", offset: int | None = None) -> None:
        self._enter(self._next(action, what, offset))

    def _enter(self, state: SourceState) -> None:
        """Move to ``state`` and say so (nothing when it is the state already)."""
        old = self.state
        if state is old:
            return
        self.state = state
        self._events.append(ev.PhaseChanged(old, state))
        if state is SourceState.PASS_COMPLETE:
            self._events.append(ev.PassCompleted(self.stats.passes))


def _range_check(rule: str) -> Callable[[int, int, int], bool]:
    """The profile's REQ_PAGES range rule: does (start, length) overrun a block's used length?"""
    match rule:
        case "last-byte":
            # 7.2 on: the request's last byte must be inside the block, computed in u64, so
            # a zero-length request at 0 (its "last byte" wraps to 2^64 - 1) is refused too.
            # A range that wraps past 2^64 is refused whatever QEMU's sum says.
            return lambda start, length, used: (
                (start + length - 1) % (1 << 64) >= used or start + length > used
            )
        case "end":  # 2.9: start + length must not pass the block's end
            return lambda start, length, used: start + length > used
        case _:
            raise QmigError("profile", f"unknown request_range_check rule {rule!r}")
