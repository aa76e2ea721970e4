"""The source's postcopy stream under its small send buffer keeps the cap's pace into a
destination whose receive buffer is autotuned (QEMU's own, or ``--receive-buffer auto``).

On loopback a TCP segment is 64 KiB, as large as the whole postcopy send buffer (32 KiB,
doubled by the kernel). A write bigger than that left one full segment in flight and nothing
behind it; the receiver, its window wide open, acknowledged that lone segment only when its
delayed-ACK timer fired (40 ms at the least), so the stream moved 64 KiB per tick, about
1.5 MiB/s, whatever the cap, whenever nothing came back on the return path to carry the
acknowledgement sooner. With preempt that was the usual case: the requested pages go on
their own channel, and a vCPU waiting on a page already sent on the main channel asks for
nothing more, so it waited up to half a second. The runner's writes are now at most half
the buffer, so the receiver acknowledges every second segment at once.
"""

from __future__ import annotations

import threading
import time

from sans_io_destination import answer_to_the_end

from qmig.protocol.source import Source
from qmig.protocol.states import DestinationState
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.runner.source_ram import GuestRam
from qmig.transport import Connection, connect, listen

STREAM = 16 << 20  # non-zero guest RAM, all of it sent in postcopy
CAP = 200 << 20  # bytes/s: each 100 ms window's quota (20 MiB) goes as one burst
# Stalled, every 64 KiB waits for a delayed-ACK timer of about 40 ms: 16 MiB took 9.4 s.
# Flowing, the cap needs 0.08 s and the destination's Python parser a little more (0.3 s).
BOUND_S = 5.0


def _destination(connection: Connection, done: list[DestinationState]) -> None:
    """Reading as fast as the bytes come, it sends only what the machine says (nothing
    between the switchover and its SHUT: no request, no fault)."""
    done.append(answer_to_the_end(connection, "10.0", read_size=1 << 20))


def test_a_capped_postcopy_stream_is_not_held_to_the_receiver_s_delayed_acks() -> None:
    ram = GuestRam.generate([("pc.ram", STREAM)], zero_fraction=0.0)
    source = Source(ram.blocks, version="10.0")
    done: list[DestinationState] = []
    # No SO_RCVBUF on the listener: the accepted socket's buffer is autotuned.
    with listen("tcp:127.0.0.1:0") as listener, connect(listener.uri) as connection:
        peer = listener.accept(timeout=5)
        assert peer.socket is not None
        peer.socket.settimeout(60)
        thread = threading.Thread(target=_destination, args=(peer, done))
        thread.start()
        runner = SourceRunner(connection, source, SourcePlan(postcopy_after=0, bandwidth=CAP))
        started = time.monotonic()
        report = runner.run()
        took = time.monotonic() - started
        thread.join(timeout=60)
        peer.close()
    assert done == [DestinationState.END]
    assert source.stats.postcopy_pages == STREAM // 4096
    assert report.requests == []  # nothing came back mid-stream to carry an ACK early
    assert took < BOUND_S, f"{STREAM >> 20} MiB of postcopy took {took:.1f} s"
