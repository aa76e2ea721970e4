"""A plain loopback listener for tests that look at what a sender wrote: it accepts every
connection and keeps each one's bytes, in accept order, with no migration logic of its own."""

from __future__ import annotations

import contextlib
import socket
import threading


class Keeper:
    """Accepts connections on a loopback port and keeps each one's bytes, in accept order."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.server.getsockname()[1]}"
        self.data: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            kept = bytearray()
            self.data.append(kept)
            thread = threading.Thread(target=self._keep, args=(connection, kept))
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _keep(connection: socket.socket, kept: bytearray) -> None:
        with connection:
            while chunk := connection.recv(1 << 16):
                kept += chunk

    def close(self) -> list[bytes]:
        """Stops accepting, waits for every connection's end; their bytes."""
        # Closing a listening socket does not wake an accept() blocked on it; on Linux,
        # shutting it down does (the accept fails).
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._accepting.join(30)
        assert not self._accepting.is_alive(), "the keeper still accepts"
        for thread in self.threads:
            thread.join(30)
        return [bytes(d) for d in self.data]
