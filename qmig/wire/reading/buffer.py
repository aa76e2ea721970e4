"""The readers' input side: bytes fed in, kept in reused buffers, read through a cheap stream.

No I/O happens here: a transport hands bytes over with :meth:`InputBuffer.feed`, or reads
straight into :meth:`InputBuffer.get_buffer` and calls :meth:`InputBuffer.commit`.
"""

from __future__ import annotations

MIN_BUFFER = 1 << 16
MAX_KEPT_BUFFER = 4 << 20  # a retired buffer larger than this is freed, not kept for reuse
# The largest unread tail a growing buffer doubles towards (device state waiting for its
# VMDESCRIPTION, which qmig holds up to 8 MiB): a bytearray is cleared, so all of it is
# resident.
MAX_GROWTH = (8 << 20) + MIN_BUFFER


class BufferPool:
    """Reusable receive buffers, so that a long stream does not fault in fresh memory per chunk.

    A retired buffer is reused only once no view of it survives (a record that still holds
    page data keeps its buffer out of use): a bytearray with live views refuses to resize.
    """

    def __init__(self, keep: int = 3) -> None:
        self._retired: list[bytearray] = []
        self._keep = keep

    def take(self, size: int, *, growing: bool = False) -> bytearray:
        for index, buffer in enumerate(self._retired):
            if size <= len(buffer) <= 4 * max(size, MIN_BUFFER) and _unshared(buffer):
                return self._retired.pop(index)
        # Headroom: the next chunk's tail differs by a few bytes and must still fit. A tail
        # that keeps growing (a record not complete yet) gets twice its size, and the chunks
        # after it are read into that room in place: copied log(n) times, not once per chunk.
        room = size + (size >> 4)
        if growing:
            room = max(room, min(2 * size, MAX_GROWTH))
        return bytearray(max(room, MIN_BUFFER))

    def give(self, buffer: bytearray) -> None:
        if len(buffer) > MAX_KEPT_BUFFER:
            return  # a long unread tail's buffer: freed, not kept for reuse
        self._retired.append(buffer)
        if len(self._retired) > self._keep:
            self._retired.pop(0)


def _unshared(buffer: bytearray) -> bool:
    try:
        buffer.append(0)
    except BufferError:
        return False
    buffer.pop()
    return True


class InputBuffer:
    """Feeding, shared by both readers: unread bytes live in ``_buf``, a view of ``_storage``."""

    _buf: memoryview
    _storage: bytearray
    _pos: int
    _base: int
    _eof: bool
    _pool: BufferPool
    _incoming: tuple[bytearray, int] | None

    def _init_input(self) -> None:
        self._pool = BufferPool()
        self._storage = bytearray()
        self._buf = memoryview(self._storage)
        self._pos = 0  # index in _buf of the next record
        self._base = 0  # absolute offset of _buf[0]
        self._eof = False
        self._incoming = None

    @property
    def offset(self) -> int:
        """Absolute offset of the next unread byte."""
        return self._base + self._pos

    @property
    def fed(self) -> int:
        """Absolute offset just past the last byte fed."""
        return self._base + len(self._buf)

    def get_buffer(self, size: int) -> memoryview:
        """Room for up to ``size`` more bytes: read into it, then call :meth:`commit`.

        This is how a transport hands bytes over without an extra copy (as asyncio's
        BufferedProtocol does); :meth:`feed` is the same for bytes already in hand.
        """
        if self._eof:
            raise ValueError("get_buffer() after feed_eof()")
        tail = len(self._buf) - self._pos
        end = len(self._buf)
        if tail > size and end + size <= len(self._storage):
            self._incoming = (self._storage, -1)  # appended in place, after the unread tail
            return memoryview(self._storage)[end : end + size]
        storage = self._pool.take(tail + size, growing=tail > size)
        storage[:tail] = self._buf[self._pos :]
        self._incoming = (storage, tail)
        return memoryview(storage)[tail : tail + size]

    def commit(self, count: int) -> None:
        """``count`` bytes were written into the buffer from :meth:`get_buffer`."""
        assert self._incoming is not None, "commit() without get_buffer()"
        storage, tail = self._incoming
        self._incoming = None
        if tail < 0:
            self._buf = memoryview(storage)[: len(self._buf) + count]
            return
        old = self._storage
        self._base += self._pos
        self._pos = 0
        self._storage = storage
        self._buf = memoryview(storage)[: tail + count]
        if old is not storage:
            self._pool.give(old)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        size = len(data)
        self.get_buffer(size)[:size] = data
        self.commit(size)

    def feed_eof(self) -> None:
        self._eof = True


class ByteStream:
    """A minimal read stream over a bytes-like object (faster than BytesIO for slices)."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def __enter__(self) -> ByteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        # construct's parse contexts are cyclic and keep the stream until a GC pass; drop
        # the view now so that the receive buffer can be reused at once.
        self._data.release()

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = len(self._data) - self._pos
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(chunk)
        return chunk

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = pos
        elif whence == 1:
            self._pos += pos
        else:
            self._pos = len(self._data) + pos
        return self._pos
