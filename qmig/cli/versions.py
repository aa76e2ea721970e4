"""``--qemu-version auto``: which wire profile a command uses, and the hint when it was wrong.

A command that reads a stream (inspect, receive, replay's capture) peeks at the stream's
first bytes and lets :mod:`qmig.wire.detect` choose; a command that only writes (simulate,
fuzz) uses the default profile. A version given explicitly is used as given; if the stream
then fails to parse, the error line ends with the version that reads past the failure.
"""

from __future__ import annotations

import io
import select
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from qmig.errors import QmigError

if TYPE_CHECKING:
    from qmig.transport import Connection
    from qmig.wire.detect import Detection

AUTO = "auto"
GIVEN = "given with --qemu-version"
CHUNK = 1 << 20
# A live source sends its header and CONFIGURATION at once; this long after the first byte
# detection goes ahead with what has arrived.
PEEK_SETTLE_SECONDS = 1.0
PEEK_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Choice:
    """The profile a command uses, and why (for the summary and the JSON report)."""

    version: str | None  # None: the default profile
    evidence: str
    given: bool


def default_choice(value: str | None) -> Choice:
    """For commands that write: ``auto`` is the default profile."""
    from qmig.wire.profiles import DEFAULT_VERSION

    if value is None or value == AUTO:
        return Choice(None, f"the default, {DEFAULT_VERSION}", False)
    return Choice(value, GIVEN, True)


def choose(value: str | None, prefix: Callable[[], tuple[bytes, bool]]) -> Choice:
    """``value`` as given, or for ``auto`` the profile detected from ``prefix()``:
    (the stream's first bytes, whether they are the whole stream)."""
    if value is not None and value != AUTO:
        return Choice(value, GIVEN, True)
    detection = detect(*prefix())
    return Choice(detection.version, f"detected: {detection.evidence}", False)


def detect(prefix: bytes, complete: bool) -> Detection:
    from qmig.wire.detect import detect as detect_prefix

    return detect_prefix(prefix, complete=complete)


def read_prefix(file: BinaryIO, limit: int | None = None) -> bytes:
    """Up to ``limit`` bytes from the start of ``file`` (fewer only at its end)."""
    from qmig.wire.detect import PREFIX_BYTES

    limit = PREFIX_BYTES if limit is None else limit
    parts: list[bytes] = []
    got = 0
    while got < limit:
        part = file.read(limit - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class Prefixed(io.RawIOBase):
    """A stream whose first bytes were already read (to detect its version): they come
    first, then the rest of ``file``. For FIFOs and devices, which cannot be read twice."""

    def __init__(self, prefix: bytes, file: BinaryIO) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._file = file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._prefix:
            count = min(len(buffer), len(self._prefix))
            buffer[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            return count
        return self._file.readinto(buffer) or 0  # type: ignore[attr-defined]

    def close(self) -> None:
        self._file.close()
        super().close()


def file_chunks(open_stream: Callable[[], BinaryIO]) -> Callable[[], Iterable[bytes]]:
    """A re-reader for :func:`qmig.wire.detect.hint`: the whole stream again, in chunks."""

    def chunks() -> Iterator[bytes]:
        with open_stream() as file:
            while chunk := file.read(CHUNK):
                yield chunk

    return chunks


def add_hint(error: QmigError, hint: str | None) -> QmigError:
    """``error`` with ``hint`` appended to its line (``qmig.cli.main`` prints it)."""
    if hint:
        error.hint = hint  # type: ignore[attr-defined]
    return error


def hint_from_file(
    error: QmigError, used: str | None, open_stream: Callable[[], BinaryIO]
) -> str | None:
    from qmig.wire.detect import hint
    from qmig.wire.profiles import DEFAULT_VERSION

    return hint(error, used or DEFAULT_VERSION, file_chunks(open_stream))


def hint_from_prefix(error: QmigError, used: str | None, prefix: bytes) -> str | None:
    from qmig.wire.detect import prefix_hint
    from qmig.wire.profiles import DEFAULT_VERSION

    return prefix_hint(error, used or DEFAULT_VERSION, prefix) if prefix else None


def peek_connection(connection: Connection, timeout: float) -> bytes:
    """The first bytes the source sent, left unread in the socket (MSG_PEEK).

    Waits up to ``timeout`` for the first byte, then until the CONFIGURATION has arrived,
    the prefix is full, or :data:`PEEK_SETTLE_SECONDS` have passed. A file connection, or a
    source that sends nothing, gives ``b""`` (and the default profile).
    """
    from qmig.wire.detect import PREFIX_BYTES
    from qmig.wire.detect import detect as detect_prefix

    sock = connection.socket
    if sock is None:
        return b""
    # What the listener read to pick this connection (its stream header) comes first.
    head = connection.unread_prefix
    if not head:
        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            return b""
    deadline = time.monotonic() + PEEK_SETTLE_SECONDS
    previous = -1
    while True:
        try:
            more = sock.recv(PREFIX_BYTES - len(head), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            closed = not more
        except BlockingIOError:
            more, closed = b"", False
        except OSError:
            return head  # the runner's own read reports it
        data = head + more
        if closed or len(data) >= PREFIX_BYTES or time.monotonic() > deadline:
            return data
        if len(data) != previous:
            previous = len(data)
            readings = detect_prefix(data).readings
            if any(reading.machine_type is not None for reading in readings):
                return data
        time.sleep(PEEK_POLL_SECONDS)
