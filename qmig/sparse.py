"""Zero-filled buffers whose memory is only taken where they are written.

A stream's MEM_SIZE can claim terabytes in a few bytes, and every per-page structure sized by
that claim (a byte per target page, a bit per page, a time stamp per host page) would cost
gigabytes before a single page arrived if it were a ``bytearray``: CPython clears a new
bytearray with memset, which touches every page of it. :func:`zeroed` maps such buffers
anonymously instead (private, MAP_NORESERVE): the kernel hands out zero pages on demand, a
read of an untouched page maps the shared zero page (no resident memory), and only pages that
are written become resident. The cost of a claim is address space; resident memory follows
what has arrived.
"""

from __future__ import annotations

import mmap
from typing import Any, cast

SMALL = 4096  # below one page, a plain bytearray (a mapping takes whole pages)
_COUNT_CHUNK = 1 << 20


class ZeroedBuffer(mmap.mmap):
    """An anonymous mapping with the bytearray methods qmig's per-page maps use."""

    def __new__(cls, size: int) -> ZeroedBuffer:
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
        return super().__new__(cls, -1, size, flags=flags)

    def find(self, sub: Any, start: int | None = None, end: int | None = None) -> int:
        needle = bytes((sub,)) if isinstance(sub, int) else sub
        return super().find(needle, *_bounds(self, start, end))

    def count(self, value: int) -> int:
        """How many bytes equal ``value`` (read chunk by chunk: nothing becomes resident)."""
        needle = bytes((value,))
        total = 0
        for at in range(0, len(self), _COUNT_CHUNK):
            total += self[at : at + _COUNT_CHUNK].count(needle)
        return total


def _bounds(buffer: mmap.mmap, start: int | None, end: int | None) -> tuple[int, int]:
    return (0 if start is None else start, len(buffer) if end is None else end)


def zeroed(size: int) -> bytearray:
    """A zero-filled, writable buffer of ``size`` bytes; large ones cost memory only where
    they are written.

    Typed as a bytearray, which is what the per-page maps are declared as: a
    :class:`ZeroedBuffer` offers the part of its interface they use (indexing, slicing,
    ``find``, ``count``, ``len`` and the writable buffer protocol), not resizing."""
    if size < SMALL:
        return bytearray(size)
    return cast(bytearray, ZeroedBuffer(size))
