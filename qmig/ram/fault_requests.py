"""Page requests written by the fault thread in C (``request.c``), and the return path's lock.

The C side knows no message numbers or layouts: for each block this module builds, with the
schema's own builder (:class:`~qmig.wire.page_requests.PageRequests`), the REQ_PAGES_ID and
the REQ_PAGES that ask for one of its host pages, and finds where the start field lies in
each by building them with a marker start. The C copies the template and writes the start.

The C keeps the one "last block asked for" state that picks between the two messages while
its sending is on (:meth:`FaultRequests.enable` takes the machine's, :meth:`disable` gives
it back), and a mutex that every writer of the return path takes (:attr:`lock`), so that
no message is cut into another's bytes and no request goes out with a stale last block.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType

from qmig.ram._uffd import ffi, lib
from qmig.ram.blocks import RamBlock
from qmig.ram.errors import UffdCallError
from qmig.sparse import zeroed
from qmig.wire import messages as m
from qmig.wire.page_requests import PageRequests

LOG_ENTRIES = 1 << 16  # faults the C may log before Python drains them
DRAIN = 1 << 10  # entries taken per C call
SEND_TIMEOUT_MS = 60_000  # a return path with no room for this long counts as broken
_MARKER = 0x0123456789ABCDEF  # a start whose bytes show where the field lies

SENT = int(lib.QMIG_FREQ_SENT)
HELD = int(lib.QMIG_FREQ_HELD)
FAILED = int(lib.QMIG_FREQ_FAILED)
REPEAT = int(lib.QMIG_FREQ_REPEAT)
LATE = int(lib.QMIG_FREQ_LATE)
STRAY = int(lib.QMIG_FREQ_STRAY)
SEND = int(lib.QMIG_FREQ_SEND)


class ReturnPathLock:
    """The C mutex as a context manager, for Python's writers of the return path."""

    def __init__(self, ctx: object) -> None:
        self._ctx = ctx

    def acquire(self) -> None:
        lib.qmig_rp_lock(self._ctx)  # cffi releases the GIL while it waits

    def release(self) -> None:
        lib.qmig_rp_unlock(self._ctx)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _template(requests: PageRequests, message: m.ReqPages | m.ReqPagesId) -> tuple[bytes, int]:
    """The message's bytes and where its start field is."""
    data = requests.build(message)
    at = data.find(_MARKER.to_bytes(8, "big"))
    if at < 0 or data.find(_MARKER.to_bytes(8, "big"), at + 1) >= 0:
        raise UffdCallError("page request template", 0, f"no single start field in {data.hex()}")
    return data, at


class FaultRequests:
    """The C fault-request state for ``blocks``, with messages of ``requests``' schema."""

    def __init__(self, blocks: Sequence[RamBlock], requests: PageRequests) -> None:
        self.blocks = list(blocks)
        self.index = {block.idstr: index for index, block in enumerate(self.blocks)}
        templates = bytearray()
        layout: list[int] = []
        self._sizes: dict[str, tuple[int, int]] = {}
        for block in self.blocks:
            for message in (
                m.ReqPagesId(_MARKER, block.page_size, block.idstr),
                m.ReqPages(_MARKER, block.page_size),
            ):
                data, at = _template(requests, message)
                if len(data) > lib.QMIG_FREQ_MAX:
                    raise UffdCallError("page request template", 0, f"{len(data)} bytes")
                layout += [len(templates), len(data), at]
                templates += data
            self._sizes[block.idstr] = (layout[-5], layout[-2])  # with the name, without
        self._templates = ffi.new("uint8_t[]", bytes(templates) or b"\0")
        self._layout = ffi.new("uint32_t[]", layout or [0])
        # A byte per host page, resident only where a fault has set one (qmig.sparse).
        self._requested = [
            zeroed(-(-block.used_length // block.page_size)) for block in self.blocks
        ]
        self._requested_c = [ffi.from_buffer(r) for r in self._requested]  # kept: the C's
        self._requested_ptrs = ffi.new("uint8_t *[]", self._requested_c or [ffi.NULL])
        self._c_blocks = ffi.new(
            "struct qmig_block *[]", [block.c_block for block in self.blocks] or [ffi.NULL]
        )
        self._log = ffi.new("struct qmig_freq_entry[]", LOG_ENTRIES)
        ctx = lib.qmig_freq_new(
            self._c_blocks, len(self.blocks), self._requested_ptrs, self._templates,
            self._layout, self._log, LOG_ENTRIES, SEND_TIMEOUT_MS,
        )  # fmt: skip
        if ctx == ffi.NULL:
            raise UffdCallError("qmig_freq_new", 12, os.strerror(12))
        self.ctx = ffi.gc(ctx, lib.qmig_freq_free)
        self.lock = ReturnPathLock(self.ctx)
        self._drained = ffi.new("struct qmig_freq_entry[]", DRAIN)
        self._entry_size = ffi.sizeof("struct qmig_freq_entry")

    def enable(self, sock: int, last_block: str | None) -> None:
        """Send requests from C on ``sock``, the last one sent having named ``last_block``."""
        lib.qmig_freq_enable(self.ctx, sock, self.index.get(last_block, -1) if last_block else -1)

    def disable(self) -> str | None:
        """Stop sending (faults are held for Python); the last block asked for."""
        last = lib.qmig_freq_disable(self.ctx)
        return self.blocks[last].idstr if last >= 0 else None

    def send(self, block: str, host_offset: int, read_ns: int) -> int:
        """A held fault's request, sent the C way: 1 sent, 0 sending is off, -1 it failed,
        -2 the log is full (drain it first)."""
        return int(lib.qmig_freq_send(self.ctx, self.index[block], host_offset, read_ns))

    def size(self, block: str, with_id: bool) -> int:
        """The bytes of a request for ``block``, with its name or without."""
        return self._sizes[block][0 if with_id else 1]

    def format(self, block: str, host_offset: int) -> bytes:
        """The request's bytes as the C would send it now (and its last block moves on)."""
        out = ffi.new("uint8_t[]", lib.QMIG_FREQ_MAX)
        with self.lock:
            size = lib.qmig_freq_format(self.ctx, self.index[block], host_offset, out)
        return bytes(ffi.buffer(out, size))

    def drain(self) -> list[tuple[int, int, int, int, int, int, int, int, int, int, int]]:
        """The log's entries, oldest first: (read_ns, sent_ns, done_ns, address, host offset,
        tid, block, kind, with_id, event, end)."""
        out = []
        while True:
            count = lib.qmig_freq_drain(self.ctx, self._drained, DRAIN)
            for index in range(count):
                e = self._drained[index]
                out.append(
                    (e.read_ns, e.sent_ns, e.done_ns, e.address, e.host_offset, e.tid,
                     e.block, e.kind, e.with_id, e.event, e.end)
                )  # fmt: skip
            if count < DRAIN:
                return out
