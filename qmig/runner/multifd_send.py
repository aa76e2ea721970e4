"""Writing a multifd source's packets: N extra connections, one gathered write per packet.

The :class:`~qmig.protocol.source.Source` decides what goes where and hands out steps in
order: main-channel bytes and :class:`~qmig.protocol.multifd_source.PacketOut` values. This
module opens the channels (each sends its 64-byte handshake at once: QEMU 7.2's destination
takes the first connection as the main one and the next ones as multifd, 8.0+ peeks at the
first bytes) and writes the steps in that order. A packet is its header and the normal
pages' runs straight out of guest RAM, in one ``sendmsg``: no page is copied in Python.

The order is the machine's, one step after the other: the destination's channel threads
stop after a SYNC until the main thread reaches the EOS (or MULTIFD_FLUSH) that matches it,
and the main thread waits for every channel's SYNC there; writing the steps in the order
they were made (SYNCs, then the main channel's EOS or FLUSH) never leaves one side waiting
for bytes the other still holds.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

from qmig.errors import TransportError
from qmig.protocol.multifd_source import MultifdPlan, PacketOut
from qmig.runner.channels import Channels
from qmig.transport import Connection

STALL_TIMEOUT = 60.0  # a channel that takes no byte for this long fails the migration
OPEN_TIMEOUT = 30.0
IOV_MAX = 1024  # Linux's UIO_MAXIOV: a packet's pieces are far fewer (1 + its page runs)


def channel_kind(channel: int) -> str:
    """The kind under which :class:`Channels` keeps multifd channel ``channel``."""
    return f"multifd-{channel}"


class MultifdSender:
    """The multifd channels of one source migration."""

    def __init__(self, channels: Channels, plan: MultifdPlan) -> None:
        self.channels = channels
        self.plan = plan
        self.connections: list[Connection] = []
        self.bytes_sent = [0] * plan.channels

    def open(self, timeout: float = OPEN_TIMEOUT) -> None:
        """Connect every channel and send its handshake (after the main channel is open)."""
        for channel, hello in enumerate(self.plan.handshakes()):
            connection = self.channels.open(channel_kind(channel), timeout)
            connection.sendall(hello)
            self.bytes_sent[channel] += len(hello)
            self.connections.append(connection)

    def drain(
        self,
        steps: list[bytes | PacketOut],
        send_main: Callable[[bytes], None],
        before_packet: Callable[[int], object] | None = None,
    ) -> int:
        """Write ``steps`` in order: bytes through ``send_main``, packets on their channel
        (``before_packet(size)`` first: the bandwidth cap). Returns the packet bytes written."""
        written = 0
        for step in steps:
            if isinstance(step, PacketOut):
                if before_packet is not None:
                    before_packet(step.size)
                self.write(step)
                written += step.size
            else:
                send_main(step)
        return written

    def write(self, packet: PacketOut) -> None:
        """One packet in one gathered write (more only when the socket takes part of it)."""
        if not self.connections:
            raise TransportError("multifd", "packets to send and no multifd channel open")
        connection = self.connections[packet.channel]
        self.bytes_sent[packet.channel] += packet.size
        # Views of guest RAM must not outlive the write, even when it fails: the RAM's owner
        # (a recording's mappings) closes it on the way out.
        with memoryview(packet.ram if packet.runs else b"") as ram:
            pieces: list[memoryview | bytes] = [packet.header]
            pieces += [ram[start : start + length] for start, length in packet.runs]
            try:
                self._write_pieces(connection, packet.channel, pieces)
            finally:
                for piece in pieces:
                    if isinstance(piece, memoryview):
                        piece.release()
                pieces.clear()

    def _write_pieces(
        self, connection: Connection, channel: int, pieces: list[memoryview | bytes]
    ) -> None:
        sock = connection.socket
        if sock is None:  # a file: no gathering to do
            for piece in pieces:
                connection.sendall(piece)
            return
        deadline = time.monotonic() + STALL_TIMEOUT
        left = list(pieces)
        try:
            while left:
                try:
                    sent = sock.sendmsg(left[:IOV_MAX], [], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as error:
                    raise TransportError(
                        f"multifd channel {channel}",
                        f"send failed: {error.strerror} (does the destination have the "
                        f"multifd capability, multifd-channels {self.plan.channels} and, if it "
                        "runs with -uuid, that UUID given as --uuid?)",
                    ) from None
                if sent:
                    deadline = time.monotonic() + STALL_TIMEOUT
                    left = _advance(left, sent)
                    continue
                _, writable, _ = select.select([], [sock], [], 1.0)
                if not writable and time.monotonic() > deadline:
                    raise TransportError(
                        f"multifd channel {channel}",
                        f"the destination took no data for {STALL_TIMEOUT:.0f} s (does it "
                        f"expect {self.plan.channels} multifd channels?)",
                    )
        finally:
            for piece in left:  # the views _advance made
                if isinstance(piece, memoryview):
                    piece.release()
            left.clear()

    def close(self) -> None:
        for channel in range(len(self.connections)):
            self.channels.close(channel_kind(channel))
        self.connections.clear()


def _advance(pieces: list[memoryview | bytes], sent: int) -> list[memoryview | bytes]:
    """What is left of ``pieces`` after ``sent`` bytes went out."""
    at = 0
    while at < len(pieces) and sent >= len(pieces[at]):
        sent -= len(pieces[at])
        at += 1
    rest = pieces[at:]
    if rest and sent:
        rest[0] = memoryview(rest[0])[sent:]
    return rest
