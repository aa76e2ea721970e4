"""Page requests sent from C (``qmig.ram.fault_requests``) are the protocol machine's own.

Real userfaultfd RAM and real C vCPU threads: the same faults, taken one at a time, go once
through the Python path (the fault thread hands each to a callback that asks the machine and
sends its bytes) and once through the C path (the C thread writes the request, and the
machine is told afterwards). Both must put the same bytes on the return path (the same
REQ_PAGES_ID where the block changes and REQ_PAGES elsewhere), and leave the machine with
the same requested pages and the same last block. The C formatter alone is checked against
the machine for every profile, with requests passing back and forth between the two (as
they do around a pause), and a multi-vCPU random workload is served from the requests the
C sends, each of which must be well formed and asked once.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastpath_harness import serve_requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qmig.protocol.destination import BlockTracker, Destination
from qmig.ram.blocks import BlockSpec, RamBlock
from qmig.ram.fault_requests import SEND, FaultRequests
from qmig.ram.faults import FaultThread, PageRequest
from qmig.ram.session import RamSession
from qmig.ram.workload import Pattern, Workload
from qmig.wire import messages as m
from qmig.wire.page_requests import PageRequests
from qmig.wire.reading.return_path import ReturnPathReader

pytestmark = pytest.mark.uffd
PAGE = 4096
VERSIONS = ["2.9", "7.2", "10.0"]
# Names of several lengths: the REQ_PAGES_ID's length field and name follow them.
SPECS = [
    BlockSpec("pc.ram", 1 << 20),
    BlockSpec("vga.vram", 256 << 10),
    BlockSpec("/rom@etc/" + "x" * 100, 64 << 10),
]
WAIT = 20.0


@pytest.fixture(scope="module")
def session() -> Iterator[RamSession]:
    with RamSession(SPECS) as ram:
        yield ram


def machine(version: str, session: RamSession) -> Destination:
    """A destination machine that knows the session's blocks (as after MEM_SIZE)."""
    dest = Destination(version)
    target = dest.reader.schema.target_page_size
    for block in session.blocks:
        info = m.RamBlockInfo(block.idstr, block.used_length, block.page_size)
        dest.blocks[block.idstr] = BlockTracker(info, block.page_size, target)
    return dest


def tell(dest: Destination, requests: FaultRequests) -> None:
    """What the C sent, told to the machine in order (as the runner does)."""
    for entry in requests.drain():
        sent_ns, host_offset, index, kind = entry[1], entry[4], entry[6], entry[7]
        assert kind == SEND
        dest.request_sent_elsewhere(requests.blocks[index].idstr, host_offset, sent=sent_ns != 0)


def received(sock: socket.socket, size: int) -> bytes:
    out = b""
    deadline = time.monotonic() + WAIT
    while len(out) < size and time.monotonic() < deadline:
        out += sock.recv(size - len(out))
    return out


@settings(
    max_examples=40,
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    version=st.sampled_from(VERSIONS),
    steps=st.lists(
        st.tuples(st.integers(0, len(SPECS) - 1), st.integers(0, 15), st.booleans()),
        max_size=40,
    ),
)
@example(version="10.0", steps=[(0, 1, True), (0, 2, True), (1, 1, False), (1, 2, True)])
def test_formatter_and_machine_take_turns_with_one_last_block(
    session: RamSession, version: str, steps: list[tuple[int, int, bool]]
) -> None:
    """Each request goes through the C (``via_c``) or the machine, switching as a pause
    does (the C off, the machine told, then the C on from the machine's last block): the
    bytes are those of the machine alone, and so is its final state."""
    alone, mixed = machine(version, session), machine(version, session)
    requests = FaultRequests(list(session.blocks), PageRequests(mixed.reader.schema))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        expected, c_on = b"", False
        for index, page, via_c in steps:
            name = SPECS[index].idstr
            alone.page_fault(name, page * PAGE)
            wanted = alone.data_to_send()
            expected += wanted
            if page * PAGE in mixed.blocks[name].requested:
                assert wanted == b""
                continue
            if via_c and not c_on:
                requests.enable(ours.fileno(), mixed.last_requested_block)
            elif not via_c and c_on:
                requests.disable()
                tell(mixed, requests)
            c_on = via_c
            if via_c:
                mixed.blocks[name].requested.add(page * PAGE)  # as the C's requested byte
                assert requests.send(name, page * PAGE, 1) == 1
            else:
                mixed.page_fault(name, page * PAGE)
                ours.sendall(mixed.data_to_send())
        requests.disable()
        tell(mixed, requests)
        assert received(theirs, len(expected)) == expected
    assert mixed.last_requested_block == alone.last_requested_block
    assert mixed.requests_sent == alone.requests_sent
    assert mixed.pending_requests() == alone.pending_requests()


def fault_script(seed: int) -> list[tuple[str, int, int]]:
    """(action, block, page): touch a page, or place one; repeats and placed pages too."""
    rng = random.Random(seed)
    script: list[tuple[str, int, int]] = []
    touched: list[tuple[int, int]] = []
    for _ in range(40):
        roll = rng.random()
        if touched and roll < 0.2:
            script.append(("touch", *rng.choice(touched)))  # a page asked for already
        elif touched and roll < 0.3:
            script.append(("place", *rng.choice(touched)))
        else:
            block = rng.randrange(len(SPECS))
            page = rng.randrange(SPECS[block].used_length // PAGE // 2)  # some pages come twice
            touched.append((block, page))
            script.append(("touch", block, page))
    return script


def wait_for_faults(faults: FaultThread, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while faults.stats().faults < count:
        assert time.monotonic() < deadline, f"fault {count} was never read"
        time.sleep(0.002)


def run_script(
    version: str, script: list[tuple[str, int, int]], *, in_c: bool
) -> dict[str, object]:
    """The script's faults on real RAM, their requests asked the Python way or the C way."""
    with RamSession(SPECS) as session:
        dest = machine(version, session)
        lock = threading.Lock()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)

        def ask(request: PageRequest) -> None:  # the Python path: the machine builds it
            with lock:
                dest.page_fault(request.block, request.offset)
                ours.sendall(dest.data_to_send())

        requests = None
        if in_c:
            requests = FaultRequests(list(session.blocks), PageRequests(dest.reader.schema))
        faults = session.start_faults(ask, requests=requests)
        if requests is not None:
            requests.enable(ours.fileno(), None)
        blocks = list(session.blocks)
        expected_faults = 0
        for action, index, page in script:
            block = blocks[index]
            if action == "place":
                if not block.host_page_received(page):
                    block.receive_zero(page * PAGE, PAGE)
                continue
            if block.host_page_received(page):
                continue  # no fault: the page is in
            session.start_vcpu(block.idstr, Workload(touches=1), page * PAGE, PAGE)
            expected_faults += 1
            wait_for_faults(faults, expected_faults)
        if requests is not None:
            requests.disable()
            for sent in faults.take_sent():
                dest.request_sent_elsewhere(sent.block, sent.host_offset, sent=sent.sent_ns != 0)
        wire = b""
        while True:
            try:
                wire += theirs.recv(1 << 16)
            except BlockingIOError:
                break
        for block in blocks:  # every vCPU gets its page, and ends
            for page in range(block.used_length // PAGE):
                if not block.host_page_received(page):
                    block.receive_zero(page * PAGE, PAGE)
        session.vcpus.join(timeout=WAIT)
        stats = faults.stats()
        faults.stop()
        ours.close()
        theirs.close()
        return {
            "wire": wire,
            "requested": {name: sorted(t.requested) for name, t in dest.blocks.items()},
            "last": dest.last_requested_block,
            "sent": dest.requests_sent,
            "counts": (stats.faults, stats.requests, stats.repeat_faults, stats.stray_faults),
            "timed": stats.latency.count,
        }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("seed", [1, 2])
def test_real_faults_make_the_same_requests_in_c_and_in_python(version: str, seed: int) -> None:
    script = fault_script(seed)
    python = run_script(version, script, in_c=False)
    c = run_script(version, script, in_c=True)
    assert c == python
    assert python["sent"] and python["counts"][2]  # new pages and repeats both came
    wire = ReturnPathReader(version)
    wire.feed(python["wire"])
    kinds = [type(record.message) for record in wire]
    assert m.ReqPagesId in kinds and m.ReqPages in kinds


def test_a_random_guest_is_served_from_the_requests_c_sends() -> None:
    """Two vCPUs touching pages at random: the requests the C sends are read back in order
    by the return path's reader (a REQ_PAGES belongs to the block last named), each host
    page is asked once, and answering them (zero pages) lets the guest finish."""
    with RamSession(SPECS) as ram:
        dest = machine("10.0", ram)
        requests = FaultRequests(list(ram.blocks), PageRequests(dest.reader.schema))
        ours, theirs = socket.socketpair()
        faults = ram.start_faults(requests=requests)
        requests.enable(ours.fileno(), None)
        asked: list[tuple[str, int]] = []
        served = threading.Thread(target=serve_requests, args=(ram, theirs, asked), daemon=True)
        served.start()
        block = ram.block("pc.ram")
        for index in range(2):
            workload = Workload(Pattern.RANDOM, touches=300, seed=index + 1)
            ram.start_vcpu(
                "pc.ram", workload, index * (block.used_length // 2), block.used_length // 2
            )
        ram.vcpus.join(timeout=WAIT)
        requests.disable()
        ours.close()  # the server has placed every page asked for once it sees the end
        served.join(WAIT)
        stats = faults.stats()
        sent = faults.take_sent()
        faults.stop()
        theirs.close()
    assert len(asked) == len(set(asked)) == stats.requests == len(sent) > 0
    assert asked == [(s.block, s.host_offset) for s in sent]
    assert stats.latency.count == stats.faults - stats.late_faults


def test_a_stray_fault_is_reported_and_asks_nothing() -> None:
    """A fault on a registered area that is no block: reported with its address, as on
    the Python path, and nothing goes on the return path."""
    with RamSession(SPECS) as ram:
        assert ram.uffd is not None
        outsider = RamBlock("outsider", 1 << 20)
        outsider.attach(ram.uffd)
        dest = machine("10.0", ram)
        requests = FaultRequests(list(ram.blocks), PageRequests(dest.reader.schema))
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        reported: list[int] = []
        faults = ram.start_faults(on_stray=lambda stray: reported.append(stray.address),
                                  requests=requests)  # fmt: skip
        requests.enable(ours.fileno(), None)
        ram.vcpus.start(outsider, Workload(touches=1), 2 * PAGE, PAGE)
        deadline = time.monotonic() + WAIT
        while not reported and time.monotonic() < deadline:
            time.sleep(0.002)
        ram.vcpus.abort()
        outsider.detach()
        stats = faults.stats()
        ram.close()
        outsider.close()
        with pytest.raises(BlockingIOError):
            theirs.recv(1)
        ours.close()
        theirs.close()
    assert reported == [outsider.host_address + 2 * PAGE]
    assert (stats.stray_faults, stats.requests, faults.take_sent()) == (1, 0, [])


def test_a_broken_return_path_turns_sending_off_and_the_machine_keeps_the_request() -> None:
    """The C's write fails (the source is gone): its request is logged as not sent (the
    machine keeps it pending, to ask again after a recovery), sending turns itself off,
    and the next fault goes to Python, as while paused."""
    with RamSession(SPECS) as ram:
        dest = machine("7.2", ram)
        requests = FaultRequests(list(ram.blocks), PageRequests(dest.reader.schema))
        ours, theirs = socket.socketpair()
        theirs.close()
        held: list[PageRequest] = []
        faults = ram.start_faults(held.append, requests=requests)
        requests.enable(ours.fileno(), None)
        ram.start_vcpu("pc.ram", Workload(touches=1), 0, PAGE)
        wait_for_faults(faults, 1)
        sent = faults.take_sent()
        for request in sent:
            dest.request_sent_elsewhere(
                request.block, request.host_offset, sent=request.sent_ns != 0
            )
        ram.start_vcpu("pc.ram", Workload(touches=1), PAGE, PAGE)
        wait_for_faults(faults, 2)
        deadline = time.monotonic() + WAIT
        while not held and time.monotonic() < deadline:
            time.sleep(0.002)
        assert requests.send("pc.ram", PAGE, 0) == 0  # off: the machine's to send
        for page in range(2):
            ram.block("pc.ram").receive_zero(page * PAGE, PAGE)
        ram.vcpus.join(timeout=WAIT)
        faults.stop()
        ours.close()
    assert [(s.block, s.host_offset, s.sent_ns) for s in sent] == [("pc.ram", 0, 0)]
    assert [(r.block, r.offset) for r in held] == [("pc.ram", PAGE)]
    assert dest.pending_requests() == [("pc.ram", 0)] and dest.requests_sent == 0
