"""A destination without RAM, for a source runner's tests: the protocol machine alone over a
connection, answering what it must (PONGs, SHUT) and nothing else."""

from __future__ import annotations

from qmig.protocol.destination import Destination
from qmig.protocol.states import DestinationState
from qmig.transport import Connection
from qmig.wire.reader import END, NEED_DATA


def answer_to_the_end(
    connection: Connection, version: str, *, read_size: int = 1 << 16
) -> DestinationState:
    """Read the stream as fast as it comes until the machine ends or the source hangs up;
    the machine's last state."""
    dest = Destination(version)
    buffer = bytearray(read_size)
    while dest.state is not DestinationState.END:
        count = connection.recv_into(buffer)
        if count:
            dest.receive_data(memoryview(buffer)[:count])
        else:
            dest.receive_eof()
        while (event := dest.next_event()) is not NEED_DATA and event is not END:
            pass
        connection.sendall(dest.data_to_send())
        if not count:
            break
    return dest.state
