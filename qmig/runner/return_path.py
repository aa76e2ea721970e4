"""The destination's return path: who writes on it, and in which order.

Two threads take return-path bytes from the machine: the fault thread (its requests) and the
main loop (PONGs, and at a RESUME every pending request, the first naming its block). They
must leave in the order the machine queued them, or a REQ_PAGES can reach the source before
the REQ_PAGES_ID that names its block. So the bytes are taken with the send lock acquired
before the machine is released (the lock order is machine, then send; nothing takes the
machine while holding the send lock).
"""

from __future__ import annotations

import threading

from qmig.protocol.destination import Destination
from qmig.ram.fault_requests import ReturnPathLock
from qmig.runner.channels import Channels
from qmig.transport import Connection

RETURN_PATH_BUFFER = 64 << 10  # SO_SNDBUF of the return path (the kernel doubles it)


class ReturnPath:
    """The return path of the migration's main channel (whichever it is now)."""

    def __init__(self, dest: Destination, channels: Channels) -> None:
        self._dest = dest
        self._channels = channels
        # Every writer of the return path holds it; with page requests sent from C, it is
        # the C's own mutex (qmig.ram.fault_requests), set when the RAM is mapped.
        self.lock: threading.Lock | ReturnPathLock = threading.Lock()

    def bound(self) -> None:
        """Cap what the return path queues in the kernel. Its messages are a few bytes each,
        so a small buffer costs nothing; and a source that stops reading them (answering a
        flood of PINGs into a full socket) is noticed within the idle limit, not after
        autotuning has swallowed megabytes of PONGs."""
        self._channels.main.limit_buffers(send=RETURN_PATH_BUFFER)

    def send(self, data: bytes) -> None:
        if data:
            with self.lock:
                self._channels.main.sendall(data)

    def take(self) -> bytes:
        """With the machine lock held: the queued bytes, the send lock held if there are any."""
        data = self._dest.data_to_send()
        if data:
            self.lock.acquire()
        return data

    def send_taken(self, data: bytes, connection: Connection | None = None) -> None:
        if data:
            (connection or self._channels.main).sendall(data)

    def release(self, data: bytes) -> None:
        if data:
            self.lock.release()
