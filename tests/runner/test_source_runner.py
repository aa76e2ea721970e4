"""The source runner reads the return path while its stream is backed up."""

from __future__ import annotations

import threading
import time

import pytest

from qmig.errors import RemoteProtocolError
from qmig.protocol.source import Source
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.runner.source_ram import GuestRam
from qmig.transport import Connection, connect, limit_buffers, listen
from qmig.wire import messages as m
from qmig.wire.schema import schema_for


def test_a_destination_that_stops_reading_still_gets_its_shut_read() -> None:
    """The destination never reads the stream; the source, its buffers full, must still see
    the SHUT(1) on the return path and stop, instead of blocking in a send forever."""
    ram = GuestRam.generate([("pc.ram", 16 << 20)], zero_fraction=0.0)
    source = Source(ram.blocks, version="7.2")
    shut = schema_for("7.2").build_rp(m.Shut(1))
    held: list[Connection] = []

    def destination() -> None:
        time.sleep(0.3)  # long enough for the source to fill both socket buffers
        held[0].sendall(shut)

    with listen("tcp:127.0.0.1:0") as listener:
        assert listener.socket is not None
        limit_buffers(listener.socket, receive=16 << 10)
        with connect(listener.uri) as connection:
            held.append(listener.accept(timeout=5))
            thread = threading.Thread(target=destination)
            thread.start()
            sent: list[int] = []
            runner = SourceRunner(
                connection,
                source,
                SourcePlan(send_buffer=16 << 10),
                on_progress=lambda _phase, size: sent.append(size),
            )
            started = time.monotonic()
            with pytest.raises(RemoteProtocolError, match=r"SHUT: the destination reported"):
                runner.run()
            assert time.monotonic() - started < 10
            thread.join()
            assert sum(sent) < 4 << 20  # it was stuck behind the full buffers, not done
            held[0].close()
