"""The destination's postcopy receive path in C, beside the protocol machine it mirrors.

Once the guest runs here, a C thread (``qmig/ram/fastpath.c``) owns the channel's socket:
it reads it, places every page record it can follow the moment it arrives (no Python, no
GIL), and hands every byte on to the runner, which feeds the machine as before, in gathered
pieces while the thread follows (GATHER). The machine
stays the one authority over the stream: it reads the page records again (their pages are
found in place, and the runner accounts for them as placed), and everything else, commands,
sections, EOF and errors, is its alone. The C reader follows only a ram section's records,
its EOS and footer and the next ram section's header; at anything else it stops placing
until :meth:`FastPath.sync` tells it, from the machine's reader, where the next record
starts. ``tests/fastpath`` proves that what the two place agrees.

One thread reads one channel, and holds nothing of the migration but the blocks it places
into (their bitmaps are shared, atomically, with every other placer): the postcopy-preempt
channel gets a FastPath of its own (:func:`start_preempt_fast_path`), synced from that
channel's reader. Its records are a ram section's without the section: the thread follows
them with the channel's own last block, and leaves its EOS, a stream header at its start and
anything else to the channel's machine, which reports them as without the fast path.

A broken channel ends the thread's reading; the runner reads what it had buffered, then
the error, and pauses as without the fast path (:meth:`stop` before the channel closes).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from qmig.errors import TransportError
from qmig.protocol.destination import Destination
from qmig.protocol.preempt_channel import PreemptChannel
from qmig.ram._uffd import ffi, lib
from qmig.ram.blocks import RamBlock
from qmig.transport import Connection
from qmig.wire.reader import StreamReader
from qmig.wire.reading.framing import RAM_IDSTR, Mode
from qmig.wire.reading.preempt import PreemptReader

RING_SIZE = 8 << 20  # bytes between the socket and the machine at most
# Kept behind the machine's read position: a sync may point at the start of a record the
# machine has only part of (a page record with its block name is under 300 bytes more than
# a page).
RETAIN = 1 << 20
WAIT_LOG = 1 << 18  # recv() → placed times kept (one per data page placed), at most
# While the thread follows the main channel it has placed the pages before the machine reads
# them, so the machine reads this much at once, waiting GATHER_MS at most after the first byte
# (anything the thread does not follow, the end or an error wakes it at once). Default
# `simulate`, two sets of 10 runs alternated with reads of what is there: pages per run
# 12.4-13.1 → 89-100, the machine's CPU per postcopy page 7.8-8.6 → 4.1-5.7 µs (0.47 → 0.24
# of a CPU).
GATHER = 512 << 10
GATHER_MS = 2
STOP_TIMEOUT = 10.0  # the C thread, told to stop, has stopped within this
_MODES = {Mode.TOP: 1, Mode.RAM: 2, Mode.FOOTER: 3}


@dataclass(frozen=True)
class FastPathStats:
    bytes: int  # read from the socket
    records: int  # page records the C reader took
    placed: int  # host pages it placed
    existing: int  # of its records, pages already in place
    place_errors: int
    syncs: int
    parsed_to: int
    synced: bool
    waits: int  # recv() → placed times logged


class FastPath:
    """One C receive thread on one channel; :meth:`stop` it before the channel closes."""

    def __init__(
        self,
        fd: int,
        reader: StreamReader,
        blocks: list[RamBlock],
        *,
        ring_size: int = RING_SIZE,
        bare: bool = False,
        gather: int = GATHER,
        gather_ms: int = GATHER_MS,
    ) -> None:
        """``fd``: the channel's socket, from now on read by the thread alone; ``reader``:
        the machine's reader, which has read (or holds) every byte received so far;
        ``bare``: the channel is a preempt channel (``reader`` a PreemptReader), whose
        reads the C never gathers; ``gather``: the bytes a read waits for, ``gather_ms`` at
        most after its first (see GATHER; 0: what is there)."""
        self.gather = gather
        self.gather_ms = gather_ms
        schema = reader.schema
        profile = schema.profile
        flags = profile.ram_flags
        types = profile.section_types
        config: Any = ffi.new("struct qmig_fastpath_config *")
        config.fd = fd
        self._quit_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        config.quitfd = self._quit_fd
        config.nblocks = len(blocks)
        config.section_footer_present = int(profile.section_footer)
        config.section_part = types["SECTION_PART"]
        config.section_footer = types["SECTION_FOOTER"]
        config.section_end = types["SECTION_END"]
        self._ram_section_id = config.ram_section_id = _ram_section_id(reader)
        config.flag_mask = schema.flag_mask
        config.flag_continue = flags["CONTINUE"]
        config.flag_zero = flags["ZERO"]
        config.flag_page = flags["PAGE"]
        config.flag_eos = flags["EOS"]
        config.target_page = schema.target_page_size
        config.start_offset = reader.fed
        config.ring_size = ring_size
        config.retain = min(RETAIN, ring_size // 2)
        config.wait_log = WAIT_LOG
        config.bare = int(bare)
        config.magic = profile.magic
        config.channel_start = reader.channel_start if isinstance(reader, PreemptReader) else 0
        self.bare = bare
        self.blocks = blocks
        self._index = {block.idstr: index for index, block in enumerate(blocks)}
        self._c_blocks = ffi.new("struct qmig_block *[]", [block.c_block for block in blocks])
        names = b"".join(block.idstr.encode("latin-1") + b"\0" for block in blocks)
        self._names = ffi.new("char[]", names)
        error: Any = ffi.new("int *")
        self._fp: Any = lib.qmig_fastpath_start(config, self._c_blocks, self._names, error)
        if self._fp == ffi.NULL:
            os.close(self._quit_fd)
            raise OSError(error[0], f"fast path: {os.strerror(error[0])}")
        self._synced_at = -1

    def read(self, buffer: bytearray, timeout: float, name: str) -> int:
        """Up to ``len(buffer)`` bytes the thread received, in order; 0 at the peer's EOF.
        TransportError when the channel failed (after every byte before the failure) or
        nothing came within ``timeout`` seconds."""
        got = lib.qmig_fastpath_read(
            self._fp, ffi.from_buffer(buffer), len(buffer), max(1, int(timeout * 1000)),
            self.gather, self.gather_ms
        )  # fmt: skip
        if got == -errno.ETIMEDOUT:
            raise TimeoutError
        if got < 0:
            raise TransportError(name, os.strerror(-got))
        return int(got)

    def sync(self, reader: StreamReader) -> None:
        """Tell the thread where the machine's reader stands, if it is somewhere the thread
        can follow from (a ram section's next record, or between sections)."""
        if isinstance(reader, PreemptReader) and reader.ended:
            return  # its EOS was read: nothing after it is
        frame = reader._frame  # where the reader is in the grammar
        mode = _MODES.get(frame.mode)
        if mode is None or (frame.section is not None and not frame.section.is_ram):
            return
        if reader._packages:
            # Inside a PACKAGED blob every record is bounded by the blob's end, which the C
            # reader does not know: a page record running past it is the machine's error.
            return
        if _ram_section_id(reader) != self._ram_section_id:
            # The section id the thread follows as ram's now names another section (a
            # SECTION_FULL took it over): its parts are no ram records.
            return
        block = reader.context.current_block
        index = self._index.get(block, -1) if block is not None else -1
        offset = reader.offset
        if offset == self._synced_at:
            return
        self._synced_at = offset
        lib.qmig_fastpath_sync(self._fp, offset, mode, index)

    def stats(self) -> FastPathStats:
        out: Any = ffi.new("struct qmig_fastpath_stats *")
        lib.qmig_fastpath_stats(self._fp, out)
        return _stats(out)

    def stop(self) -> tuple[FastPathStats, list[int]]:
        """Stop the thread (the socket stays open) and free what it held. Returns its last
        figures, and for each data page it placed (up to WAIT_LOG) the ns from the recv()
        that brought the page's last bytes to its placement."""
        out: Any = ffi.new("struct qmig_fastpath_stats *")
        waits: Any = ffi.new("uint32_t[]", WAIT_LOG)
        count: Any = ffi.new("uint64_t *")
        # The join is bounded: the call runs on a helper thread (cffi releases the GIL), and
        # a C thread that does not stop is an error, its memory left to it, never a hang.
        fp, self._fp = self._fp, ffi.NULL
        stopping = threading.Thread(
            target=lib.qmig_fastpath_stop,
            args=(fp, out, waits, WAIT_LOG, count),
            name="qmig-fastpath-stop",
            daemon=True,
        )
        stopping.start()
        stopping.join(STOP_TIMEOUT)
        if stopping.is_alive():
            raise TransportError(
                "fast path", f"the C receive thread did not stop within {STOP_TIMEOUT:g} s"
            )
        os.close(self._quit_fd)
        return _stats(out), list(ffi.unpack(waits, int(count[0])))


def _stats(out: Any) -> FastPathStats:
    return FastPathStats(
        out.bytes, out.records, out.placed, out.existing, out.place_errors, out.syncs,
        out.parsed_to, bool(out.synced), out.waits
    )  # fmt: skip


def start_fast_path(
    connection: Connection, destination: Destination, blocks: Iterable[RamBlock]
) -> FastPath | None:
    """A fast path on ``connection``'s socket for ``destination``'s reader, or None where
    there is no socket (a file, a replay)."""
    sock = connection.socket
    if sock is None or connection.unread_prefix:
        return None
    return FastPath(sock.fileno(), destination.reader, list(blocks))


def start_preempt_fast_path(
    connection: Connection, channel: PreemptChannel, blocks: Iterable[RamBlock]
) -> FastPath | None:
    """A fast path on a preempt ``connection``'s socket for ``channel``'s reader, or None
    where there is no socket, or bytes read to examine the connection are still unread."""
    sock = connection.socket
    if sock is None or connection.unread_prefix:
        return None
    return FastPath(sock.fileno(), channel.reader, list(blocks), bare=True)


def _ram_section_id(reader: StreamReader) -> int:
    for section_id, section in reader.context.sections.items():
        if section.idstr == RAM_IDSTR:
            return section_id
    return 0xFFFFFFFF  # none yet: the thread follows no section header
