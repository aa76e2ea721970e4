"""The destination's threads on a fault's path go by their own names (what ps, top and perf
show, and what a user renices or pins them by): the fault thread, the vCPUs and the C receive
thread. (The source's answer thread: tests/answer/test_answer_thread_name.py.)"""

from __future__ import annotations

import socket
import threading

import pytest
from thread_names import left, named

from qmig.ram.blocks import BlockSpec
from qmig.ram.faults import PageRequest
from qmig.ram.session import RamSession
from qmig.ram.workload import Workload
from qmig.runner.fastpath import FastPath
from qmig.wire.reading.stream import StreamReader

pytestmark = pytest.mark.uffd

MiB = 1 << 20


def test_the_fault_thread_and_a_vcpu_blocked_on_a_fault() -> None:
    asked = threading.Event()
    answer = threading.Event()

    def serve(request: PageRequest) -> None:
        asked.set()
        answer.wait(10)
        block = session.block(request.block)
        block.receive_target_pages(request.offset, bytes(request.length))

    earlier = named("qmig-vcpu", timeout=0)  # another test's, if it left one
    with RamSession([BlockSpec("pc.ram", MiB)]) as session:
        session.register()
        faults = session.start_faults(serve)
        session.start_vcpu("pc.ram", Workload(touches=1), 0, 4096)
        try:
            assert asked.wait(10), "the vCPU did not fault"
            # The vCPU waits on its page, the fault thread on the answer: both are alive.
            assert faults._thread.native_id in named("qmig-faults")
            vcpus = named("qmig-vcpu", besides=earlier)
            assert len(vcpus) == 1
        finally:
            answer.set()
            session.vcpus.join(10)
            faults.stop()
    assert not left("qmig-faults", {faults._thread.native_id}) and not left("qmig-vcpu", vcpus)


def test_the_receive_thread() -> None:
    earlier = named("qmig-recv", timeout=0)
    ours, theirs = socket.socketpair()
    with RamSession([BlockSpec("pc.ram", MiB)]) as session:
        fast = FastPath(ours.fileno(), StreamReader("7.2"), [session.block("pc.ram")])
        try:
            mine = named("qmig-recv", besides=earlier)
            assert len(mine) == 1
        finally:
            fast.stop()
            ours.close()
            theirs.close()
    assert not left("qmig-recv", mine)
