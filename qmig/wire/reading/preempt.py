"""The postcopy-preempt channel, read into :class:`Record` values.

The channel carries bare RAM records, with the same schema as a ``ram`` section's (and the
same C fast path for runs of pages): no header, no sections, no footers. Only ZERO and PAGE
records belong on it, and EOS, which ends it; QEMU's loader refuses any other flag there
("unknown combination of migration flags ... (postcopy mode)"). Blocks are the ones the main
channel's MEM_SIZE announced: the reader shares that list with the main reader, and keeps its
own "last block" for CONTINUE records, as QEMU keeps one per channel.

Offsets count from the channel's first byte. Every error names the channel.
"""

from __future__ import annotations

from qmig.errors import MalformedError, RemoteProtocolError, TruncatedError
from qmig.wire import messages as m
from qmig.wire.reading.framing import RAM_IDSTR, Frame, FramingContext, Mode, Section
from qmig.wire.reading.records import END, NEED_DATA, Record, Sentinel
from qmig.wire.reading.stream import StreamReader

CHANNEL = "preempt channel"


class PreemptReader(StreamReader):
    """Reads a preempt channel; ``main`` is the main channel's reader (for its blocks)."""

    def __init__(self, main: StreamReader) -> None:
        super().__init__(
            schema=main.schema,
            local_page_sizes=main.local_page_sizes,
            host_page_size=main.host_page_size,
            max_record=main.max_record,
        )
        # The same block list (a dict the main reader fills), a "last block" of its own.
        self.context = FramingContext(
            target_page_size=main.schema.target_page_size, ram_blocks=main.context.ram_blocks
        )
        self.context.advise = main.context.advise
        self._frame = Frame(Mode.RAM, Section(0, RAM_IDSTR, 0, self.profile.ram_section_version))
        self.ended = False  # EOS read: QEMU's preempt thread reads nothing after it
        self._start = 0  # where the current connection's bytes begin
        self._magic = self.profile.magic.to_bytes(4, "big")

    @property
    def channel_start(self) -> int:
        """Where the current connection's first byte is (for the C reader's header check)."""
        return self._start

    def new_channel(self, offset: int = 0) -> None:
        """The channel was opened again (postcopy recovery): bare RAM records from its first
        byte, the first naming its block; an unfinished record of the old one is dropped.
        Offsets count from ``offset`` (where it starts in a recording of several)."""
        self._init_input()
        self._base = offset
        self._start = offset
        self._frame = Frame(Mode.RAM, Section(0, RAM_IDSTR, 0, self.profile.ram_section_version))
        self.context.current_block = None
        self.ended = False

    def next_record(self) -> Record | Sentinel:
        try:
            return super().next_record()
        except TruncatedError as error:
            raise TruncatedError(f"{CHANNEL} {error.what}", error.offset) from None
        except RemoteProtocolError as error:
            if error.what.startswith(CHANNEL):
                raise
            raise MalformedError(f"{CHANNEL} {error.what}", error.detail, error.offset) from None

    def _next(self) -> Record | Sentinel:
        if self.ended:
            return END
        if self._pos >= len(self._buf):
            if self._eof:
                return END  # closed between records: the runner decides what that means
            return NEED_DATA
        head = self.schema.ram_header_size
        if len(self._buf) - self._pos < head:
            return super()._next()  # a short header: NEED_DATA, or truncated at EOF
        raw = bytes(self._buf[self._pos : self._pos + head])
        if self.offset == self._start and raw.startswith(self._magic):
            raise MalformedError(
                CHANNEL,
                "a migration stream header: this channel carries bare RAM records, no header",
                self._start,
            )
        flags = self.profile.ram_flags
        record_flags = int.from_bytes(raw, "big") & self.schema.flag_mask
        kind = record_flags & ~flags["CONTINUE"]
        if kind == flags["EOS"] and not record_flags & flags["CONTINUE"]:
            self.ended = True
            return self._emit(m.RamEos(), head, RAM_IDSTR)
        if kind not in (flags["ZERO"], flags["PAGE"]):
            raise MalformedError(
                CHANNEL,
                f"unknown combination of migration flags {record_flags:#x} (postcopy mode): "
                "only RAM page records and EOS belong on this channel",
                self.offset,
            )
        if not record_flags & flags["CONTINUE"]:
            self._check_named_block(head)
        return self._read_ram()

    def _check_named_block(self, head: int) -> None:
        """A record that names its block must name one the main channel announced."""
        at = self._pos + head
        if at + self.schema.name_length_size > len(self._buf):
            return  # the schema's parse waits for the name
        size = self.schema.name_length_size
        length = int.from_bytes(self._buf[at : at + size], "big")
        if at + size + length > len(self._buf):
            return
        name = bytes(self._buf[at + size : at + size + length]).decode("latin-1")
        if name not in self.context.ram_blocks:
            raise MalformedError(
                CHANNEL,
                f"block {name!r} is not one the main channel announced"
                + ("" if self.context.ram_blocks else " (no MEM_SIZE yet)"),
                self.offset + head,
            )
