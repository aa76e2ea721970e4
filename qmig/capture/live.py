"""Reading a FIFO or a character device as a stream, with a time limit.

Opening a FIFO for reading blocks until a writer opens it, and a read blocks until the
writer writes: a stream that never comes would hang the reader silently. So the file is
opened without blocking (``O_NONBLOCK``: for a FIFO this succeeds at once, writer or not)
and every read first waits in ``poll`` for at most the limit. On Linux a FIFO that has
never had a writer does not report POLLHUP, so the wait lasts until a writer writes, or
connects and closes (then ``read`` returns 0: end of stream).
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import stat
from pathlib import Path
from typing import Any

from qmig.errors import TransportError

DEFAULT_TIMEOUT_S = 30.0


def is_live(path: Path) -> bool:
    """A FIFO or a character device: bytes that arrive, not bytes that are stored."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


class LiveFile(io.RawIOBase):
    """A FIFO or character device; a read that waits longer than ``timeout`` raises
    :class:`TransportError` naming the file and the limit."""

    def __init__(self, path: Path, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__()
        self.path = path
        self.timeout = timeout
        self.received = 0
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: Any) -> int:
        while True:
            if not self._poll.poll(self.timeout * 1000):
                limit = f"--timeout {self.timeout:g}"
                if self.received == 0:
                    raise TransportError(
                        str(self.path),
                        f"nothing to read within {self.timeout:g} s: no writer, or it sent "
                        f"nothing ({limit})",
                    )
                raise TransportError(
                    str(self.path),
                    f"no data for {self.timeout:g} s ({limit})",
                    self.received,
                )
            try:
                count = os.readv(self._fd, [buffer])
            except BlockingIOError:
                continue  # woken, but another reader took the bytes
            self.received += count
            return count

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        super().close()
