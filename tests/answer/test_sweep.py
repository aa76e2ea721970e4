"""The C sweep (``qmig/runner/sweep.c``) against the source machine's own background sweep:
for the same machine state and budgets, the same bytes on the wire, the same dirty map and
the same counts, step by step to the stream's end, beside a thread answering on the main
channel or on the preempt channel; the answer thread's request goes first between two of
its writes, and the sweep goes on after it where it was going (a request at its front) or
stops (one elsewhere); a destination that stops reading fails the sweep within the stall
timeout, and one that vanishes fails it at once, instead of hanging or crashing the loop."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import answering
import pytest
from answering import PAGE, WAIT, drain, recv_exactly
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig.errors import TransportError
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.source import Source, SweepOrder
from qmig.protocol.states import SourceState
from qmig.runner.answer import FastAnswer, SweepResult
from qmig.transport import Connection
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

VERSIONS = ("7.2", "10.0")
# Budgets that take one page, a host page and a bit, a piece, and more than a section.
BUDGETS = (1, PAGE + 9, 3 * PAGE, 8 * PAGE, 1 << 20)


class Sweeper:
    """A FastAnswer over socket pairs, answering on the main channel or, given a preempt
    source, on a preempt channel of its own; ``peer`` is the destination's end of the main
    channel."""

    def __init__(self, source: Source, *, stall_timeout: float = WAIT) -> None:
        self.main, self.peer = socket.socketpair()
        self.connection = Connection("main", self.main)
        self.preempt: list[socket.socket] = []
        channel = None
        if source.preempt is not None:
            self.preempt = list(socket.socketpair())
            channel = Connection("preempt", self.preempt[0])
        self.fast = FastAnswer(source, self.connection, channel, stall_timeout=stall_timeout)
        self.source = source

    def step(self, budget: int) -> tuple[int, SweepResult | None]:
        """One turn of the loop without requests: the machine's order, written by the C
        sweep (the machine's own bytes around it); the bytes it wrote, and the sweep's
        result (None: the machine wrote this step itself)."""
        source = self.source
        if self.fast.main:
            self.fast.hold()
        try:
            order = source.sweep_order(budget)
            if order is None:
                data = source.data_to_send(budget)
                self.main.sendall(data)
                return len(data), None
            prefix = source.data_to_send(0)
            if prefix:
                self.main.sendall(prefix)
            result = self.fast.sweep(order, batch=32 << 10, credit=None, window_end=0.0)
            source.swept(
                order, pages=result.pages, last=result.last, zeros=result.zeros, size=result.bytes
            )
            suffix = source.data_to_send(0)
            if suffix:
                self.main.sendall(suffix)
            return len(prefix) + result.bytes + len(suffix), result
        finally:
            if self.fast.main:
                self.fast.release(open_records=source.records_may_follow, credit=None, window_end=0)

    def close(self) -> None:
        self.fast.stop()
        for sock in [self.main, self.peer, *self.preempt]:
            sock.close()


def compare(
    seed: int,
    version: str,
    budgets: list[int],
    requests: dict[int, list[tuple[str, int]]] | None = None,
    **options: Any,
) -> int:
    """Both sweeps through ``budgets`` (then the last, repeated) to the stream's end, the
    sources made with ``options``, both machines reading ``requests`` (before step N, REQ_PAGES_ID
    for each (block, host page start in target pages) of ``requests[N]``); the number of C
    sweeps that wrote pages."""
    expected = answering.postcopy_source(seed, version, piece=2 * PAGE, **options)
    source = answering.postcopy_source(seed, version, piece=2 * PAGE, **options)
    sweeper = Sweeper(source)
    swept = 0
    try:
        step = 0
        while expected.state is SourceState.POSTCOPY:
            budget = budgets[min(step, len(budgets) - 1)]
            if requests and step in requests:
                asked = [
                    m.ReqPagesId(page * PAGE, expected.by_name[name].page_size, name)
                    for name, page in requests[step]
                ]
                for machine in (expected, source):
                    machine.receive_data(answering.requests(version, *asked))
                    drain(machine)
            want = expected.data_to_send(budget)
            size, result = sweeper.step(budget)
            assert size == len(want), f"step {step}, budget {budget}"
            assert recv_exactly(sweeper.peer, size) == want, f"step {step}, budget {budget}"
            swept += result is not None and result.pages > 0
            assert result is None or not result.yielded
            drain(expected)
            drain(source)
            assert source.state is expected.state
            step += 1
            assert step < 10_000, "the sweep never ends"
    finally:
        sweeper.close()
    assert vars(source.stats) == vars(expected.stats)
    for block, other in zip(source.blocks, expected.blocks, strict=True):
        assert block.dirty == other.dirty
    return swept


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_the_c_sweep_writes_what_the_machine_would(version: str, budget: int) -> None:
    """Zero pages, a block of host pages of four target pages (one of them partly sent: only
    its dirty pages go), block changes, sections closing when full, the wrap and the end."""
    assert compare(7, version, [budget]) > 0


@pytest.mark.parametrize("budget", BUDGETS)
def test_beside_a_preempt_thread_the_c_sweep_writes_what_the_machine_would(budget: int) -> None:
    """The 8.0 variant: the thread answers on the preempt channel; the sweep picks each
    piece's pages holding it off, and the main channel's bytes are the machine's."""
    assert compare(7, "10.0", [budget], preempt=PreemptVariant.V8_0) > 0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 1000),
    version=st.sampled_from(VERSIONS),
    budgets=st.lists(st.sampled_from(BUDGETS), min_size=1, max_size=12),
)
def test_any_budgets_any_ram(seed: int, version: str, budgets: list[int]) -> None:
    compare(seed, version, budgets)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 1000),
    version=st.sampled_from(VERSIONS),
    budgets=st.lists(st.sampled_from(BUDGETS), min_size=1, max_size=6),
    requests=st.dictionaries(
        st.integers(0, 8),
        st.lists(
            st.one_of(
                st.tuples(st.just("pc.ram"), st.integers(0, 63)),
                st.tuples(st.just("big"), st.integers(0, 3).map(lambda host: 4 * host)),
            ),
            min_size=1,
            max_size=3,
        ),
        max_size=4,
    ),
)
def test_requests_read_between_turns_keep_the_machines_bytes(
    seed: int, version: str, budgets: list[int], requests: dict[int, list[tuple[str, int]]]
) -> None:
    """Requests that the machine reads between two turns: those whose pages went out
    already settle at the sweep's next order (the sweep goes on after their page, as the
    machine's own turn would take it), the others wait for the machine's turn; either way
    the same bytes as the machine's own."""
    compare(seed, version, budgets, requests)


def wait_until_waiting(fast: FastAnswer) -> None:
    deadline = time.monotonic() + WAIT
    while not fast.waiting:
        assert time.monotonic() < deadline, "the thread never asked for the wire"
        time.sleep(0.001)


def records(data: bytes, version: str) -> list[tuple[int, str | None, bytes]]:
    """The postcopy page records of ``data`` (no section bytes among them): each one's
    target page, the block it names (None: it continues the last), and its page."""
    flags = schema_for(version).profile.ram_flags
    out: list[tuple[int, str | None, bytes]] = []
    at = 0
    while at < len(data):
        header = int.from_bytes(data[at : at + 8], "big")
        at += 8
        name = None
        if not header & flags["CONTINUE"]:
            size = data[at]
            name = data[at + 1 : at + 1 + size].decode()
            at += 1 + size
        body = 1 if header & flags["ZERO"] else PAGE  # a ZERO record's fill byte
        page = data[at : at + body]
        out.append((header // PAGE, name, page * PAGE if body == 1 else page))
        at += body
    return out


def sweep_with_a_request(
    pick: Callable[[Source, SweepOrder], int],
) -> tuple[Source, SweepOrder, SweepResult, list[tuple[int, str | None, bytes]], Sweeper]:
    """The thread waits for the wire while the loop holds it, with a request for the page of
    pc.ram that ``pick`` picks given the machine's order; the sweep writes one page, lets
    the thread's answer go, and goes on or stops. The machine, its order, what the sweep
    did, every record written, in order, and the sweeper (the machine has learnt of nothing
    yet)."""
    sweeper = Sweeper(answering.postcopy_source(5, "7.2", piece=2 * PAGE))
    try:
        order, result, written = _sweep_with_a_request(sweeper, pick)
    except BaseException:
        sweeper.close()
        raise
    return sweeper.source, order, result, written, sweeper


def _sweep_with_a_request(
    sweeper: Sweeper, pick: Callable[[Source, SweepOrder], int]
) -> tuple[SweepOrder, SweepResult, list[tuple[int, str | None, bytes]]]:
    source = sweeper.source
    sweeper.fast.hold()
    order = source.sweep_order(1 << 20)
    assert order is not None and order.block == "pc.ram" and order.limit > 2
    assert source.data_to_send(0) == b""  # the section is open already
    asked = pick(source, order)
    assert source.by_name["pc.ram"].dirty[asked]
    sweeper.peer.sendall(answering.requests("7.2", m.ReqPagesId(asked * PAGE, PAGE, "pc.ram")))
    wait_until_waiting(sweeper.fast)
    result = sweeper.fast.sweep(order, batch=PAGE, credit=None, window_end=0.0)
    source.swept(order, pages=result.pages, last=result.last, zeros=result.zeros, size=result.bytes)
    sweeper.fast.release(open_records=True, credit=None, window_end=0.0)
    answer_size = 8 + 1 + len("pc.ram") + PAGE  # the page asked for is not a zero page
    return order, result, records(recv_exactly(sweeper.peer, result.bytes + answer_size), "7.2")


def learn_of_the_answer(sweeper: Sweeper, asked: int) -> None:
    """The machine learns of the thread's answer, and reads the request itself."""
    answered = sweeper.fast.apply()
    assert [(a.block, a.request_start, a.pages) for a in answered] == [("pc.ram", asked * PAGE, 1)]
    size = len(answering.requests("7.2", m.ReqPagesId(asked * PAGE, PAGE, "pc.ram")))
    passed = answering.passed_on(sweeper.fast, size)
    assert answering.machine_verdicts(sweeper.source, passed) == [("pc.ram", asked * PAGE, True)]


def test_a_request_at_the_sweeps_front_goes_first_and_the_sweep_goes_on() -> None:
    """The request is for the page the sweep comes to next (a guest reading on at the
    stream's front): the answer goes between two writes, and the sweep goes on after it, as
    the machine's sweep would, naming the block again, the answered page counted in the
    turn's limit; the machine's next order starts after the sweep's last page."""

    dirty_before = bytearray()

    def front(source: Source, order: SweepOrder) -> int:
        dirty_before[:] = source.by_name["pc.ram"].dirty
        return dirty_before.find(1, order.start + 1)

    source, order, result, written, sweeper = sweep_with_a_request(front)
    block = source.by_name["pc.ram"]
    try:
        asked = dirty_before.find(1, order.start + 1)
        dirty_after_asked = (p for p in range(asked + 1, len(dirty_before)) if dirty_before[p])
        after = list(dirty_after_asked)[: order.limit - 2]
        assert result.yielded and result.pages == order.limit - 1 and result.last == after[-1]
        expected = [
            (order.start, "pc.ram" if order.named else None),
            (asked, "pc.ram"),  # the thread names its block
            (after[0], "pc.ram"),  # and the sweep names it again after the answer
            *((page, None) for page in after[1:]),
        ]
        assert [(page, name) for page, name, _ in written] == expected
        for page, _, data in written:
            assert data == block.ram[page * PAGE : (page + 1) * PAGE]
            assert block.dirty[page] == 0
        learn_of_the_answer(sweeper, asked)
        next_order = source.sweep_order(1 << 20)  # the request, its page sent, holds nothing back
        assert next_order is not None
        assert next_order.start == block.dirty.find(1, after[-1] + 1)
        assert next_order.named  # after the thread's record, the block is named again
    finally:
        sweeper.close()


def test_a_request_elsewhere_goes_first_and_the_sweep_stops() -> None:
    """The request is for a page further on, past dirty pages: the answer goes between two
    writes, and the sweep stops there; the machine learns of both, and its next order
    starts after the requested page (as its own sweep goes on after a request), naming the
    block."""

    def elsewhere(source: Source, order: SweepOrder) -> int:
        dirty = source.by_name["pc.ram"].dirty
        assert dirty.count(1, order.start + 1, 40) > 0  # dirty pages lie between
        return 40

    source, _order, result, written, sweeper = sweep_with_a_request(elsewhere)
    block = source.by_name["pc.ram"]
    try:
        assert result.yielded and result.pages == 1  # one piece of one page, then the answer
        assert [page for page, _, _ in written] == [result.last, 40]
        assert written[1][1] == "pc.ram"  # the thread names its block
        assert written[1][2] == block.ram[40 * PAGE : 41 * PAGE]
        learn_of_the_answer(sweeper, 40)
        assert block.dirty[result.last] == 0 and block.dirty[40] == 0
        next_order = source.sweep_order(1 << 20)
        assert next_order is not None and next_order.start == block.dirty.find(1, 41)
        assert next_order.named  # after the thread's record, the block is named again
    finally:
        sweeper.close()


def test_a_destination_that_stops_reading_fails_the_sweep_not_the_loop() -> None:
    """Nobody reads the peer's end: the sweep gives up once the socket has taken nothing
    for the stall timeout, with one error naming the channel."""
    source = answering.postcopy_source(5, "7.2", piece=2 * PAGE)
    sweeper = Sweeper(source, stall_timeout=0.3)
    sweeper.main.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match="main: the destination took no data"):
            for _ in range(100):
                sweeper.step(1 << 20)
        assert time.monotonic() - started < WAIT
    finally:
        sweeper.close()


def test_a_destination_that_vanishes_fails_the_sweep_with_one_line() -> None:
    """The peer's end closes: the sweep's write fails, and the loop gets a TransportError
    naming the channel and the reason, as its own writes do."""
    source = answering.postcopy_source(5, "7.2", piece=2 * PAGE)
    sweeper = Sweeper(source)
    sweeper.peer.close()
    try:
        with pytest.raises(TransportError, match=r"^main: peer closed the connection$"):
            sweeper.step(1 << 20)
    finally:
        sweeper.fast.stop()
        sweeper.main.close()
