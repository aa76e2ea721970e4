"""The fault thread sleeps while its page requests are answered.

Between faults the fault thread that writes page requests from C (``qmig_freq_run``), and the
one that hands them to Python (``on_request``), waits in poll and reads the userfaultfd once
per wake-up: it never busy-reads, because a spinning
thread holds its CPU while the threads that answer its request (the source's reader, then
the destination's receive thread) are queued there. Counted, not timed: the kernel's count of
the thread's read calls (``syscr`` in ``/proc/self/task/TID/io``) grows by at most one per
fault, where a spin of tens of µs would add dozens of empty reads per fault. Each page is
still asked for once, in the order the faults came, and the guest finishes.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from pathlib import Path

import pytest
from fastpath_harness import serve_requests

from qmig.protocol.destination import BlockTracker, Destination
from qmig.ram.blocks import BlockSpec
from qmig.ram.fault_requests import FaultRequests
from qmig.ram.faults import PageRequest
from qmig.ram.session import RamSession
from qmig.ram.workload import Pattern, Workload
from qmig.wire import messages as m
from qmig.wire.page_requests import PageRequests

pytestmark = pytest.mark.uffd
PAGE = 4096
TOUCHES = 60
ANSWER_DELAY = 0.002  # longer than any spin: a spinning thread would read all the while
WAIT = 20.0


def reads_by(thread_name: str) -> int:
    """The read calls the named thread of this process has made (the kernel's count)."""
    native = next(t.native_id for t in threading.enumerate() if t.name == thread_name)
    for line in Path(f"/proc/self/task/{native}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/self/task/TID/io")


def test_the_fault_thread_sleeps_between_requests_and_asks_each_page_once() -> None:
    with RamSession([BlockSpec("pc.ram", 1 << 20)]) as ram:
        dest = Destination("10.0")
        block = ram.block("pc.ram")
        info = m.RamBlockInfo(block.idstr, block.used_length, block.page_size)
        dest.blocks[block.idstr] = BlockTracker(info, block.page_size, PAGE)
        requests = FaultRequests(list(ram.blocks), PageRequests(dest.reader.schema))
        ours, theirs = socket.socketpair()
        faults = ram.start_faults(requests=requests)
        requests.enable(ours.fileno(), None)
        before = reads_by("qmig-faults")
        asked: list[tuple[str, int]] = []
        server = threading.Thread(
            target=serve_requests, args=(ram, theirs, asked, ANSWER_DELAY), daemon=True
        )
        server.start()
        # One vCPU, one page after another: one fault at a time, each answered late.
        ram.start_vcpu("pc.ram", Workload(Pattern.SEQUENTIAL, touches=TOUCHES), 0, TOUCHES * PAGE)
        ram.vcpus.join(timeout=WAIT)
        after = reads_by("qmig-faults")
        requests.disable()
        ours.close()
        server.join(WAIT)
        stats = faults.stats()
        sent = faults.take_sent()
        faults.stop()
        theirs.close()
    assert stats.faults == stats.requests == len(sent) == TOUCHES
    assert asked == [(s.block, s.host_offset) for s in sent]
    assert len(set(asked)) == TOUCHES  # each page asked for once
    # One read per wake-up, one wake-up per fault at most (a few for the start).
    assert after - before <= TOUCHES + 3, f"{after - before} reads for {TOUCHES} faults"


def test_the_python_request_path_sleeps_between_faults_too() -> None:
    """The same with requests handed to Python (``--no-fast-path``, and before the C sending
    is on): one read per fault, each page asked for once, in order."""
    with RamSession([BlockSpec("pc.ram", 1 << 20)]) as ram:
        handed: queue.SimpleQueue[PageRequest | None] = queue.SimpleQueue()
        faults = ram.start_faults(on_request=handed.put)
        before = reads_by("qmig-faults")
        asked: list[int] = []

        def answer_late() -> None:
            while (request := handed.get(timeout=WAIT)) is not None:
                asked.append(request.offset)
                time.sleep(ANSWER_DELAY)
                ram.block(request.block).receive_zero(request.offset, request.length)

        server = threading.Thread(target=answer_late, daemon=True)
        server.start()
        ram.start_vcpu("pc.ram", Workload(Pattern.SEQUENTIAL, touches=TOUCHES), 0, TOUCHES * PAGE)
        ram.vcpus.join(timeout=WAIT)
        after = reads_by("qmig-faults")
        handed.put(None)
        server.join(WAIT)
        stats = faults.stats()
        faults.stop()
    assert stats.faults == stats.requests == TOUCHES
    assert asked == [page * PAGE for page in range(TOUCHES)]
    assert after - before <= TOUCHES + 3, f"{after - before} reads for {TOUCHES} faults"
