"""A cheap time series of a migration while it runs: bytes per 10 ms, per channel.

A runner's connection is wrapped in :class:`CountingConnection`, which counts each read and
write (a chunk of up to a few hundred KiB, never a page) into the bucket of the moment it
happened; each multifd channel is a series of its own, named as its capture file is
(``multifd-<K>``). Events (a precopy pass ending, the switchover's steps) are kept with their
monotonic time. Nothing here is per page.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from qmig.transport.connection import ConnectionProxy

if TYPE_CHECKING:
    from qmig.transport import Connection

BUCKET_S = 0.01
STREAM = "stream"  # source → destination
RETURN_PATH = "return path"  # destination → source
PREEMPT = "preempt"  # source → destination: the postcopy-preempt channel
PREEMPT_BACK = "return path (preempt)"  # its other direction (QEMU sends nothing on it)
MULTIFD_PREFIX = "multifd-"  # multifd-<K>: source → destination on multifd channel K


class Recorder:
    """Bytes per ``BUCKET_S`` for each series, and named events, all on time.monotonic()."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.series: dict[str, dict[int, int]] = {}
        self.events: list[tuple[float, str]] = []
        self._lock = threading.Lock()  # the destination's fault thread writes too
        self.runs: dict[str, Any] = {}  # the runners' own reports, for the document

    def count(self, series: str, size: int) -> None:
        bucket = int((time.monotonic() - self.start) / BUCKET_S)
        with self._lock:
            buckets = self.series.setdefault(series, {})
            buckets[bucket] = buckets.get(bucket, 0) + size

    def event(self, name: str, at: float | None) -> None:
        """``at``: monotonic seconds (None: it did not happen, nothing is kept)."""
        if at is not None:
            self.events.append((at, name))

    def wrap(self, connection: Connection, *, sends: str, receives: str) -> Connection:
        """``connection``, counting what it sends into ``sends`` and receives into ``receives``
        (it stands in for the connection: the runners need no change)."""
        return cast(
            "Connection", CountingConnection(connection, self, sends=sends, receives=receives)
        )


def counted(
    recorder: Recorder | None, connection: Connection, *, sends: str, receives: str
) -> Connection:
    """``connection`` counted into ``recorder``'s series, or itself when there is none."""
    if recorder is None:
        return connection
    return recorder.wrap(connection, sends=sends, receives=receives)


def counted_multifd(
    recorder: Recorder | None,
    openers: dict[str, Callable[[float], Connection]],
    *,
    sending: bool,
) -> dict[str, Callable[[float], Connection]]:
    """``openers`` of multifd channels (keyed ``multifd-<K>``), each channel counted as a
    series ``multifd-<K>``: what it sends when ``sending`` (a source, which opens channel K as
    ``multifd-<K>``), else what it receives. A destination's channel threads ask for their
    connections at once and take whichever comes: there the K-th connection taken is
    ``multifd-<K>``, as a capture numbers them (the threads take them one at a time, in the
    order the acceptor hands them out; they come one after another anyway)."""
    if recorder is None:
        return openers
    taking = threading.Lock()
    taken = itertools.count()

    def counted_as(kind: str, connection: Connection) -> Connection:
        back = f"return path ({kind})"
        sends, receives = (kind, back) if sending else (back, kind)
        return recorder.wrap(connection, sends=sends, receives=receives)

    def opener(kind: str, open_channel: Callable[[float], Connection]) -> Any:
        if sending:
            return lambda timeout: counted_as(kind, open_channel(timeout))

        def take(timeout: float) -> Connection:
            with taking:
                connection = open_channel(timeout)
                return counted_as(f"{MULTIFD_PREFIX}{next(taken)}", connection)

        return take

    return {kind: opener(kind, open_channel) for kind, open_channel in openers.items()}


class CountingConnection(ConnectionProxy):
    """A connection that counts what crosses it; everything else goes to the connection."""

    def __init__(self, connection: Any, recorder: Recorder, *, sends: str, receives: str) -> None:
        super().__init__(connection)
        self._recorder = recorder
        self._sends = sends
        self._receives = receives

    def recv_into(self, buffer: Any, *args: Any) -> int:
        count: int = self._connection.recv_into(buffer, *args)
        if count:
            self._recorder.count(self._receives, count)
        return count

    def received_elsewhere(self, count: int) -> None:
        self._connection.received_elsewhere(count)
        if count:
            self._recorder.count(self._receives, count)

    def sent_elsewhere(self, count: int) -> None:
        self._connection.sent_elsewhere(count)
        if count:
            self._recorder.count(self._sends, count)

    def send_some(self, data: Any) -> int:
        sent: int = self._connection.send_some(data)
        if sent:
            self._recorder.count(self._sends, sent)
        return sent

    def sendall(self, data: Any) -> None:
        self._connection.sendall(data)
        self._recorder.count(self._sends, len(data))

    @property
    def socket(self) -> Any:
        """The socket, counting what is sent on it directly: multifd's sender writes a
        packet's header and its pages out of guest RAM in one ``sendmsg`` on the socket."""
        sock = self._connection.socket
        return None if sock is None else _CountingSocket(sock, self._recorder, self._sends)


class _CountingSocket:
    """A socket whose ``sendmsg`` counts what it sent; everything else goes to the socket."""

    def __init__(self, sock: Any, recorder: Recorder, sends: str) -> None:
        self._socket = sock
        self._recorder = recorder
        self._sends = sends

    def fileno(self) -> int:  # select() asks for it directly
        fd: int = self._socket.fileno()
        return fd

    def sendmsg(self, *args: Any) -> int:
        sent: int = self._socket.sendmsg(*args)
        if sent:
            self._recorder.count(self._sends, sent)
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)
