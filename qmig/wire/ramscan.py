"""The fast path for bulk RAM page records, beside the schema it mirrors.

A migration stream is mostly ``be64 (offset | ZERO|CONTINUE)`` + fill byte and
``be64 (offset | PAGE|CONTINUE)`` + one target page, and in postcopy the same two naming their
block again (``be64 (offset | ZERO)`` or ``(offset | PAGE)``, then the counted block name)
after each page sent out of turn. Decoding those one by one with construct would cost
microseconds a page; :func:`RamScanner.scan` walks runs of them in C (``_ramscan_build.py``)
and returns arrays. It decodes exactly what ``Schema.ram_record`` decodes for those record
kinds of one block, and stops at anything else (a record naming another block among them),
which the schema or the reader then handles. ``tests/wire/test_ramscan.py`` proves the two
agree.
"""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass
from typing import Any

from qmig.wire._ramscan import ffi, lib
from qmig.wire.schema import Schema

MAX_RUN = 8192


class Stop(enum.IntEnum):
    """Why a scan stopped (the values match the C code's)."""

    OTHER = 0  # a record the schema must decode
    SHORT = 1  # the next record is not complete in the buffer
    FULL = 2  # the output arrays are full
    RANGE = 3  # the next record's offset is outside the block


@dataclass
class ScanResult:
    next_pos: int
    count: int
    zero_count: int
    stop: Stop
    headers: memoryview
    bodies: memoryview


class RamScanner:
    """Decodes runs of same-block ZERO/PAGE records; reuses its output arrays between calls."""

    def __init__(self, schema: Schema, max_run: int = MAX_RUN) -> None:
        flags = schema.profile.ram_flags
        self.schema = schema
        self.max_run = max_run
        self._scan: Any = ffi.new("struct qmig_ram_scan *")
        self._scan.flag_mask = schema.flag_mask
        self._scan.flag_continue = flags["CONTINUE"]
        self._scan.flag_zero = flags["ZERO"]
        self._scan.flag_page = flags["PAGE"]
        self._scan.page_size = schema.target_page_size
        self._headers: Any = ffi.new("uint64_t[]", max_run)
        self._bodies: Any = ffi.new("uint64_t[]", max_run)

    def scan(
        self, buffer: Any, pos: int, base: int, block_length: int, name: bytes | None = None
    ) -> ScanResult:
        """Decode records from ``buffer[pos:]``; ``base`` is the absolute offset of buffer[0].
        ``name``: the current block's name as records spell it; records that name it join the
        run (None: only CONTINUE records do).

        ``headers`` and ``bodies`` stay valid until the next call.
        """
        self._scan.block_length = block_length
        view = ffi.from_buffer(buffer)
        spelled = ffi.NULL if name is None else name
        next_pos = lib.qmig_ram_scan(
            view, len(buffer), pos, base, self._scan, spelled, len(name or b""), self._headers,
            self._bodies, self.max_run
        )  # fmt: skip
        count = self._scan.count
        return ScanResult(
            next_pos=next_pos,
            count=count,
            zero_count=self._scan.zero_count,
            stop=Stop(self._scan.stop),
            headers=memoryview(ffi.buffer(self._headers, 8 * count)).cast("Q"),
            bodies=memoryview(ffi.buffer(self._bodies, 8 * count)).cast("Q"),
        )

    def account(
        self,
        data: Any,
        base: int,
        headers: memoryview,
        bodies: memoryview,
        state: bytearray,
        fd: int = -1,
    ) -> None:
        """Mark each page's final kind in ``state`` (1 data, 2 same-byte) and write to ``fd``."""
        count = len(headers)
        if not count:
            return
        rc = lib.qmig_ram_account(
            ffi.from_buffer(data),
            base,
            ffi.from_buffer("uint64_t[]", headers),
            ffi.from_buffer("uint64_t[]", bodies),
            count,
            self._scan,
            ffi.from_buffer(state),
            fd,
        )
        if rc < 0:
            raise OSError(-rc, "writing extracted RAM")

    def dirty_ranges(self, dirty: Any, used_length: int) -> tuple[bytes, int]:
        """The runs of dirty target pages (bytes equal to 1) of a block's dirty map, as the
        (start, length) byte pairs of POSTCOPY_RAM_DISCARD, big-endian u64s, the last clipped
        to ``used_length``; and the number of dirty pages. One C call."""
        count = len(dirty)
        if not count:
            return b"", 0
        # At most one run per dirty page: sized by them, not by the block (MBs to clear).
        out = bytearray(16 * min(dirty.count(1), (count + 1) // 2))
        pages: Any = ffi.new("uint64_t *")
        ranges = lib.qmig_dirty_ranges(
            ffi.from_buffer(dirty),
            count,
            self.schema.target_page_size,
            used_length,
            ffi.from_buffer(out),
            pages,
        )
        return bytes(memoryview(out)[: 16 * ranges]), int(pages[0])

    def emit(self, ram: Any, pages: Any, name: str | None) -> tuple[bytes, int]:
        """The ZERO/PAGE records of target pages ``pages`` (indices) of one block's ``ram``.

        The first record names the block when ``name`` is given; the rest CONTINUE it.
        Returns (bytes, number of zero pages). Mirrors ``Schema.build_ram_page``.
        """
        indices = pages if isinstance(pages, array) else array("Q", pages)
        count = len(indices)
        if not count:
            return b"", 0
        encoded = name.encode("latin-1") if name is not None else b""
        out = bytearray(count * (8 + self.schema.target_page_size) + 1 + len(encoded))
        zeros: Any = ffi.new("size_t *")
        size = lib.qmig_ram_emit(
            ffi.from_buffer(ram),
            ffi.from_buffer("uint64_t[]", indices),
            count,
            self._scan,
            ffi.from_buffer(encoded) if name is not None else ffi.NULL,
            len(encoded),
            ffi.from_buffer(out),
            zeros,
        )
        return bytes(memoryview(out)[:size]), int(zeros[0])
