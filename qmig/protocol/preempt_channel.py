"""The destination's side of a postcopy-preempt channel, sans-IO.

Fed the channel's bytes, it hands out the same :class:`~qmig.protocol.events.PagesReceived`
events as the main channel, for the same machine: a page is marked received in the one map
whichever channel brought it, so a page that comes on both is placed once (the RAM refuses
the second copy, as QEMU's received bitmap and UFFDIO_COPY do). Its host pages are gathered
apart from the main channel's.

As QEMU's preempt thread, it loads only once the destination listens (from LISTEN on): what
comes before waits in its buffer. EOS ends it; nothing after EOS is read. In the pre-7.2
variant it is read up to that EOS even once the load is over. In the 8.0 variant nothing ends
it but the destination, once the load is over, and not before every page it asked for has
come: the source sends a requested page on this channel only, so the main channel can end
before the answer to a late request is read here (QEMU's postcopy_ram_incoming_cleanup waits
for its page_requested_count to reach zero before it shuts the channel down).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmig.errors import RemoteProtocolError
from qmig.protocol import events as ev
from qmig.protocol.states import DESTINATION_STOPS_READING, DestinationState, is_postcopy_running
from qmig.wire import messages as m
from qmig.wire.reader import END, NEED_DATA, Record
from qmig.wire.reading.preempt import PreemptReader

if TYPE_CHECKING:
    from qmig.protocol.destination import Destination


class PreemptChannel:
    def __init__(self, destination: Destination) -> None:
        self._dest = destination
        self.reader = PreemptReader(destination.reader)
        self.pages = 0  # target pages received on this channel
        self.bytes = 0
        self._fill: dict[str, tuple[int, int]] = {}

    def opens_a_resumed_main_channel(self, first: bytes | bytearray | memoryview) -> bool:
        """Do a new connection's first bytes show it to be the source's resumed main channel
        (a RECV_BITMAP command) and not a preempt one? Only content can tell them apart when
        the order misleads (see qmig.runner.channels); it can, because a RAM record's first
        byte is the top of its be64 offset, which would have to reach 2^59 bytes to equal
        the COMMAND section type."""
        schema = self._dest.reader.schema
        opening = schema.build_command(m.RecvBitmap(""))[: schema.command_length_at]
        return bytes(first[: len(opening)]) == opening

    @property
    def ended(self) -> bool:
        """EOS was read (the pre-7.2 variant's end)."""
        return self.reader.ended

    @property
    def reads_to_eos(self) -> bool:
        """The pre-7.2 variant's channel is read up to its EOS even once the load is over
        (QEMU's cleanup waits for the preempt thread, which exits there)."""
        variant = self._dest.preempt
        return variant is not None and variant.ends_with_eos and not self.ended

    @property
    def awaits_requested_pages(self) -> bool:
        """The load is over and pages the destination asked for are still to come (on this
        channel: the source answered them here, and nowhere else)."""
        dest = self._dest
        return dest.state is DestinationState.END and bool(dest.pending_requests())

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._dest._check_usable()
        self.bytes += len(data)
        self.reader.feed(data)

    def receive_eof(self) -> None:
        self._dest._check_usable()
        self.reader.feed_eof()

    def next_event(self) -> ev.Event | ev.Sentinel:
        """The next pages to place, NEED_DATA, or END (EOS read, or the load is over)."""
        dest = self._dest
        dest._check_usable()
        if (
            dest.state in DESTINATION_STOPS_READING
            and not self.reads_to_eos
            and not self.awaits_requested_pages
        ):
            return END
        loading = is_postcopy_running(dest.state) or dest.state is DestinationState.END
        if not loading or dest.state is DestinationState.PAUSED:
            return NEED_DATA  # not listening yet: the bytes wait, as in QEMU's socket
        while True:
            try:
                record = self.reader.next_record()
            except RemoteProtocolError as error:
                raise dest._failed(error) from None
            if record is NEED_DATA or record is END:
                return record
            assert isinstance(record, Record)
            message = record.message
            if isinstance(message, m.RamPageRun):
                if message.block not in dest.blocks:
                    raise dest._failed(
                        RemoteProtocolError(
                            "preempt channel RAM",
                            f"block {message.block!r} is not one the main channel announced",
                            record.offset,
                        )
                    )
                try:
                    dest._on_pages(message, record, self._fill)
                except RemoteProtocolError as error:
                    raise dest._failed(
                        RemoteProtocolError(
                            f"preempt channel {error.what}", error.detail, error.offset
                        )
                    ) from None
                self.pages += message.count
                return dest._pending.pop()  # the event _on_pages just queued
            if isinstance(message, m.RamEos):
                return END
