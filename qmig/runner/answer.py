"""The source's answer to a page request from C.

QEMU 8.0's source writes a requested page on the preempt channel from the thread that reads
the return path, as it reads the request. :class:`FastAnswer` does the same from a C thread
(``answer.c``): it reads the return path, answers every well-formed REQ_PAGES(_ID) there with
the page's records (header and page straight from guest RAM, one writev), and passes every
byte it read on through a pipe, so that the source machine still reads all of it (PONG,
SHUT, RECV_BITMAP, the requests themselves). What it wrote it queues; :meth:`apply` tells the
machine (clean pages, counts, the channel's last block) before the machine reads the
requests, so the machine finds them answered and does not answer them again.

Without preempt the thread answers on the main channel (``preempt`` None), as QEMU's
migration thread sends queued requests before its next background page (QEMU 7.1+: the
return-path thread queues the request and wakes it). The runner's loop writes the background
stream there too, so the two take turns (:meth:`hold`, :meth:`release`): the loop holds the
channel from before it builds a piece of stream until that piece is written, and the thread
writes only between pieces, when the stream ends inside a RAM section's records and the cap's
window has quota left (QEMU checks the rate before its RAM loop runs, requested pages or not);
otherwise it leaves the request to the machine, which the loop answers first in its next
piece.

Anything the thread finds odd (an unknown block, a misaligned or overrunning range, a
malformed message) it leaves to the machine, which refuses it as it always has. Only while
the channels are the ones the thread was given: a pause stops it (see the runner).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

from qmig.errors import TransportError
from qmig.protocol.source import Source, SweepOrder
from qmig.runner._answer import ffi, lib
from qmig.transport import Connection
from qmig.transport.connection import describe

DRAIN = 256  # entries taken per C call
PIPE_SIZE = 1 << 20


@dataclass(frozen=True)
class Answered:
    """One host page the thread wrote, or a request it found nothing to write for: for the
    runner's timings."""

    block: str
    request_start: int
    read_ns: int
    sent_ns: int
    bytes: int
    pages: int  # target pages written; 0: the request's pages had all gone out already


@dataclass(frozen=True)
class SweepResult:
    """What one C sweep wrote (see :meth:`FastAnswer.sweep`)."""

    pages: int  # target pages
    last: int  # the last of them
    zeros: int  # of them ZERO records
    bytes: int
    yielded: bool  # it let the thread's answers go first (and went on after them, or stopped)


def _window_args(credit: int | None, window_end: float) -> tuple[int, int]:
    """The cap's window as the C side takes it: the quota left (-1: no cap; never below 0
    otherwise) and its end in CLOCK_MONOTONIC ns."""
    return -1 if credit is None else max(0, credit), int(window_end * 1e9)


class AnswerTimes:
    """The thread's answers, per request it read: when it read the request and wrote its
    last page (ns), and whether it wrote none (its pages had all gone out before), taken once
    each, in the order the thread read them, as the machine reports the requests.

    The thread queues an entry per host page it wrote, or one of no pages for a request it
    wrote nothing for; the entries of a request that wrote follow each other and share its
    read, and may come in two drains. A repeat of a request read in the same recv finds its
    pages clean: an entry of no pages, a request of its own."""

    def __init__(self) -> None:
        # (block, start) → [read ns, written ns, wrote nothing (0/1)], oldest first
        self._times: dict[tuple[str, int], deque[list[int]]] = {}

    def add(self, page: Answered) -> None:
        waiting = self._times.setdefault((page.block, page.request_start), deque())
        last = waiting[-1] if waiting else None
        if page.pages and last is not None and last[0] == page.read_ns and not last[2]:
            last[1] = page.sent_ns  # another host page of the request
        else:
            waiting.append([page.read_ns, page.sent_ns, int(not page.pages)])

    def take(self, block: str, start: int) -> tuple[int, int, bool] | None:
        """The oldest answer not taken of the request for ``block`` at ``start``, if the
        thread answered one."""
        waiting = self._times.get((block, start))
        if not waiting:
            return None
        read_ns, sent_ns, nothing = waiting.popleft()
        return read_ns, sent_ns, bool(nothing)

    def clear(self) -> None:
        self._times.clear()


class FastAnswer:
    def __init__(
        self,
        source: Source,
        return_path: Connection,
        preempt: Connection | None,
        *,
        stall_timeout: float = 0.0,
    ) -> None:
        """``preempt`` None: answer on the main channel (``return_path``'s socket), where a
        write that waits ``stall_timeout`` seconds for room fails (0: never)."""
        schema = source.schema
        flags = schema.profile.ram_flags
        messages = schema.profile.rp_messages
        self._source = source
        self._return_path = return_path
        self.main = preempt is None
        # The connection whose byte counts (limits, the report's series) take what it writes.
        self._written_on = return_path if preempt is None else preempt
        self._names = [block.idstr for block in source.blocks]
        self._index = {name: index for index, name in enumerate(self._names)}
        read_fd, write_fd = os.pipe()
        self._pipe = read_fd
        # The thread answers before it passes the bytes on, but waits for room in the pipe
        # before it reads more: room for many requests, should this loop look away awhile.
        with contextlib.suppress(OSError):  # a lower system limit: the default size works
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        config: Any = ffi.new("struct qmig_answer_config *")
        config.rp_fd = return_path.fileno()
        config.preempt_fd = -1 if preempt is None else preempt.fileno()
        config.pipe_fd = write_fd
        last = None if preempt is None else source.preempt_block
        config.last_block = -1 if last is None else self._index[last]
        config.stall_ms = int(stall_timeout * 1000)
        self._stall = stall_timeout
        # Taken over between messages: a REQ_PAGES next asks for more of the block that the
        # machine's last REQ_PAGES_ID named (the destination names a block only on a change).
        named = source.last_request_block
        config.request_block = -1 if named is None else self._index[named]
        config.req_pages = messages["REQ_PAGES"]
        config.req_pages_id = messages["REQ_PAGES_ID"]
        config.rp_max_length = schema.profile.rp_max_length
        config.source_host_page = source.host_page_size
        config.target_page_size = source.target_page_size
        config.flag_zero = flags["ZERO"]
        config.flag_page = flags["PAGE"]
        config.flag_continue = flags["CONTINUE"]
        # The memory behind every pointer stays referenced here until stop() has joined.
        self._keep: list[Any] = []
        blocks: Any = ffi.new("struct qmig_answer_block[]", max(1, len(source.blocks)))
        for slot, block in zip(blocks, source.blocks, strict=False):
            name = block.idstr.encode("latin-1")
            ram = ffi.from_buffer(block.ram)
            dirty = ffi.from_buffer(block.dirty)
            self._keep += [ram, dirty, name]
            slot.ram = ram
            slot.dirty = dirty
            slot.pages = len(block.dirty)
            slot.used_length = block.used_length
            slot.host_page_size = block.page_size
            slot.name = ffi.from_buffer(name)
            slot.name_len = len(name)
        self._keep += [blocks, config]
        error: Any = ffi.new("int *")
        self._handle: Any = lib.qmig_answer_start(config, blocks, len(source.blocks), error)
        if self._handle == ffi.NULL:
            os.close(read_fd)
            os.close(write_fd)
            raise OSError(error[0], "starting the answer thread")
        self._entries: Any = ffi.new("struct qmig_answer_entry[]", DRAIN)
        self._sweep_result: Any = ffi.new("struct qmig_sweep_result *")
        self.declined = 0  # well-formed requests the thread left to the machine
        self.pages = 0
        self.bytes = 0

    def fileno(self) -> int:
        """What to select on for return-path bytes (the pipe's read end)."""
        return self._pipe

    def read_into(self, buffer: bytearray) -> int:
        """Return-path bytes the thread read; 0: it stopped reading (the socket's EOF or
        error, which the caller then meets on the socket itself)."""
        try:
            count = os.readv(self._pipe, [buffer])
        except OSError as error:
            raise TransportError(self._return_path.name, str(error)) from None
        self._return_path.received_elsewhere(count)
        return count

    def apply(self) -> list[Answered]:
        """Tell the machine of every page the thread wrote so far; their timings."""
        done: list[Answered] = []
        entries = self._entries
        while count := lib.qmig_answer_drain(self._handle, entries, DRAIN):
            for entry in entries[0:count]:
                name = self._names[entry.block]
                mask, first = int(entry.mask), int(entry.first)
                pages = [first + bit for bit in range(mask.bit_length()) if mask >> bit & 1]
                size = int(entry.bytes)
                if pages:  # none: the request's pages had all gone out already
                    self._source.answered_elsewhere(
                        name, pages, zeros=int(entry.zeros), size=size, main=self.main
                    )
                self._written_on.sent_elsewhere(size)  # the channel's byte counts
                self.pages += len(pages)
                self.bytes += size
                done.append(
                    Answered(
                        name,
                        int(entry.request_start),
                        int(entry.read_ns),
                        int(entry.sent_ns),
                        size,
                        len(pages),
                    )
                )
        return done

    def write(self, data: bytes) -> None:
        """Preempt-channel bytes the machine made (requests the thread left to it): written
        between the thread's records, never inside one. The machine names the block of its
        first record (see Source.forget_preempt_block) and its last block becomes the
        channel's."""
        last = self._source.preempt_block
        index = -1 if last is None else self._index[last]
        rc = lib.qmig_answer_write(self._handle, data, len(data), index)
        if rc < 0:
            raise TransportError("preempt", os.strerror(-rc))

    def hold(self) -> None:
        """The loop's turn: on the main channel, to build and write stream bytes (the thread
        writes nothing there until :meth:`release`); with preempt, to pick pages from the
        dirty map (the thread answers nothing meanwhile). If the thread is waiting to, it
        goes first."""
        if self._handle != ffi.NULL:
            lib.qmig_answer_hold(self._handle)

    @property
    def waiting(self) -> bool:
        """Main channel: does the thread wait for the loop to let go of the wire?"""
        return self._handle != ffi.NULL and bool(lib.qmig_answer_waiting(self._handle))

    def release(self, *, open_records: bool, credit: int | None, window_end: float) -> None:
        """The end of the loop's turn. Main channel: ``open_records``, the stream written so
        far ends inside a RAM section's records; ``credit``, the cap's quota left in its
        window (None: no cap), which ends at ``window_end`` (monotonic seconds). The preempt
        channel's thread heeds neither."""
        if self._handle == ffi.NULL:
            return
        lib.qmig_answer_release(
            self._handle,
            int(open_records),
            *_window_args(credit, window_end),
        )

    def sweep(
        self, order: SweepOrder, *, batch: int, credit: int | None, window_end: float
    ) -> SweepResult:
        """Write the background sweep's batch ``order`` (see ``sweep.c``) on the main
        channel from C, the GIL released, in writes of about ``batch`` bytes. Where the thread
        answers on the main channel, between :meth:`hold` and :meth:`release`: between two
        writes its answers go first, within ``credit`` (the cap's quota left, None: no cap)
        and the window that ends at ``window_end``, and the sweep goes on after them where
        the machine's own would (or stops there: see ``sweep.c``). With
        preempt, without holding: each write's pages are picked with the thread held off.
        The machine learns nothing here: pass the result to
        :meth:`Source.swept <qmig.protocol.source.Source.swept>`."""
        out = self._sweep_result
        rc = lib.qmig_answer_sweep(
            self._handle,
            order.index,
            order.start,
            order.limit,
            int(order.named),
            batch,
            *_window_args(credit, window_end),
            out,
        )
        if rc < 0:
            raise TransportError(self._return_path.name, self._sweep_error(-rc))
        result = SweepResult(
            int(out.pages), int(out.last), int(out.zeros), int(out.bytes), bool(out.yielded)
        )
        self._return_path.sent_elsewhere(result.bytes)
        return result

    def _sweep_error(self, code: int) -> str:
        if code == errno.ETIMEDOUT:
            return f"the destination took no data for {self._stall:g} s during postcopy"
        return describe(OSError(code, os.strerror(code)))

    def stop(self) -> list[Answered]:
        """Join the thread (it writes nothing more) and tell the machine what it wrote last;
        the pipe's read end is closed."""
        if self._handle == ffi.NULL:
            return []
        declined: Any = ffi.new("int *")
        lib.qmig_answer_stop(self._handle, declined)
        self.declined = int(declined[0])
        answered = self.apply()
        lib.qmig_answer_free(self._handle)
        self._handle = ffi.NULL
        os.close(self._pipe)
        self._keep.clear()
        return answered
