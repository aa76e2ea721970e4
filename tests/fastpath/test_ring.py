"""The C receive thread's ring, as the machine's reads see it: every byte the socket gave, in
order, while the thread keeps receiving and moving what is held down the ring (a small ring
makes it move often) and the machine copies bytes out with the lock released."""

from __future__ import annotations

import random
import socket
import threading

from qmig.ram.blocks import BlockSpec
from qmig.ram.session import RamSession
from qmig.runner.fastpath import FastPath
from qmig.wire.reading.stream import StreamReader

RING = 1 << 20  # an eighth of the default: the thread moves its bytes down often
SENT = 64 << 20


def test_big_reads_from_a_small_ring_keep_every_byte_in_order() -> None:
    data = random.Random(3).randbytes(SENT)
    ours, theirs = socket.socketpair()
    with RamSession([BlockSpec("pc.ram", 1 << 20)]) as session:
        fast = FastPath(
            ours.fileno(), StreamReader("7.2"), [session.block("pc.ram")], ring_size=RING
        )
        writer = threading.Thread(target=theirs.sendall, args=(data,), daemon=True)
        writer.start()
        got = bytearray()
        buffer = bytearray(RING)  # each read may take all the ring holds
        try:
            while len(got) < SENT:
                count = fast.read(buffer, 10.0, "main")
                assert count, f"EOF after {len(got)} of {SENT} bytes"
                got += buffer[:count]
        finally:
            writer.join(10)
            fast.stop()
            ours.close()
            theirs.close()
    assert got == data
