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

import ctypes
import ctypes.util
import mmap
import os
import sys
from collections.abc import Iterator
from typing import Any, cast

from qmig.errors import HostSupportError
from qmig.host import HOST_PAGE_SIZE

# The mmap module names it from Python 3.12 on; 0x4000 on Linux's common architectures.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)
SMALL = HOST_PAGE_SIZE  # below one page, a plain bytearray (a mapping takes whole pages)
_COUNT_CHUNK = 4 << 20


class ZeroedBuffer(mmap.mmap):
    """An anonymous mapping with the bytearray methods qmig's per-page maps use."""

    def __new__(cls, size: int) -> ZeroedBuffer:
        flags = mmap.MAP_PRIVATE | MAP_NORESERVE
        return super().__new__(cls, -1, size, flags=flags)

    def find(self, sub: Any, start: int | None = None, end: int | None = None) -> int:
        needle = bytes((sub,)) if isinstance(sub, int) else sub
        return super().find(needle, *_bounds(self, start, end))

    def count(self, value: int) -> int:
        """How many bytes equal ``value``. Only chunks with a page in memory are read (see
        :func:`_mapped_chunks`): the rest were never written, so they hold zeros, and a
        claim of terabytes is counted in moments."""
        needle = bytes((value,))
        total, unread = 0, 0
        for at, mapped in _mapped_chunks(self):
            end = min(at + _COUNT_CHUNK, len(self))
            if mapped:
                total += self[at:end].count(needle)
            else:
                unread += end - at
        return total + (unread if value == 0 else 0)


def _mapped_chunks(buffer: ZeroedBuffer) -> Iterator[tuple[int, bool]]:
    """(offset, whether any page of it is mapped) for each _COUNT_CHUNK of ``buffer``, from
    mincore(2); without it, every chunk is said to be mapped."""
    size, page = len(buffer), mmap.PAGESIZE
    if _libc is None:
        yield from ((at, True) for at in range(0, size, _COUNT_CHUNK))
        return
    anchor = ctypes.c_char.from_buffer(buffer)
    base = ctypes.addressof(anchor)
    vector = (ctypes.c_ubyte * (_COUNT_CHUNK // page))()
    try:
        for at in range(0, size, _COUNT_CHUNK):
            length = min(_COUNT_CHUNK, size - at)
            if _libc.mincore(ctypes.c_void_p(base + at), ctypes.c_size_t(length), vector):
                yield at, True
            else:
                pages = -(-length // page)
                yield at, bytes(vector)[:pages].count(0) != pages
    finally:
        del anchor  # releases the buffer export, so that the mapping can close


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()


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
    try:
        return cast(bytearray, ZeroedBuffer(size))
    except (OSError, OverflowError) as error:
        # Even address space runs out: a claim beyond what the host can map at all.
        code = error.errno if isinstance(error, OSError) else None
        reason = os.strerror(code) if code else "too large"
        raise HostSupportError(
            "memory", f"cannot map {size} bytes of per-page state ({reason})"
        ) from None
