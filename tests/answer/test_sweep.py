"""The C sweep (``qmig/runner/sweep.c``) against the source machine's own background sweep:
for the same machine state and budgets, the same bytes on the wire, the same dirty map and
the same counts, step by step to the stream's end, beside a thread answering on the main
channel or on the preempt channel; the answer thread's request goes first between two of
its writes, and the sweep stops there; a destination that stops reading fails the sweep
within the stall timeout, and one that vanishes fails it at once, instead of hanging or
crashing the loop."""

from __future__ import annotations

import socket
import time
from typing import Any

import answering
import pytest
from answering import PAGE, WAIT, drain, recv_exactly
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig.errors import TransportError
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.runner.answer import FastAnswer, SweepResult
from qmig.transport import Connection
from qmig.wire import messages as m

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


def compare(seed: int, version: str, budgets: list[int], **options: Any) -> int:
    """Both sweeps through ``budgets`` (then the last, repeated) to the stream's end, the
    sources made with ``options``; the number of C sweeps that wrote pages."""
    expected = answering.postcopy_source(seed, version, piece=2 * PAGE, **options)
    source = answering.postcopy_source(seed, version, piece=2 * PAGE, **options)
    sweeper = Sweeper(source)
    swept = 0
    try:
        step = 0
        while expected.state is SourceState.POSTCOPY:
            budget = budgets[min(step, len(budgets) - 1)]
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


def wait_until_waiting(fast: FastAnswer) -> None:
    deadline = time.monotonic() + WAIT
    while not fast.waiting:
        assert time.monotonic() < deadline, "the thread never asked for the wire"
        time.sleep(0.001)


def test_a_request_goes_between_two_writes_and_the_sweep_stops() -> None:
    """The thread waits for the wire while the loop holds it: the sweep writes one piece,
    lets the thread's answer go, and stops; the machine learns of both, and its sweep goes
    on after the requested page."""
    source = answering.postcopy_source(5, "7.2", piece=2 * PAGE)
    sweeper = Sweeper(source)
    return_path = answering.requests("7.2", m.ReqPagesId(40 * PAGE, PAGE, "pc.ram"))
    try:
        sweeper.fast.hold()
        sweeper.peer.sendall(return_path)
        wait_until_waiting(sweeper.fast)
        order = source.sweep_order(1 << 20)
        assert order is not None and order.block == "pc.ram" and order.limit > 1
        assert source.data_to_send(0) == b""  # the section is open already
        result = sweeper.fast.sweep(order, batch=PAGE, credit=None, window_end=0.0)
        assert result.yielded and result.pages == 1  # one piece of one page, then the answer
        source.swept(
            order, pages=result.pages, last=result.last, zeros=result.zeros, size=result.bytes
        )
        sweeper.fast.release(open_records=True, credit=None, window_end=0.0)
        written = recv_exactly(sweeper.peer, result.bytes + 8 + 1 + len("pc.ram") + PAGE)
        swept = int.from_bytes(written[:8], "big") // PAGE
        answer = written[result.bytes :]
        assert int.from_bytes(answer[:8], "big") // PAGE == 40
        assert answer[9:15] == b"pc.ram"  # the thread names its block
        assert answer[15:] == source.by_name["pc.ram"].ram[40 * PAGE : 41 * PAGE]
        answered = sweeper.fast.apply()
        assert [(a.block, a.request_start, a.pages) for a in answered] == [("pc.ram", 40 * PAGE, 1)]
        assert source.by_name["pc.ram"].dirty[swept] == 0
        assert source.by_name["pc.ram"].dirty[40] == 0
        next_order = source.sweep_order(1 << 20)
        assert next_order is not None and next_order.start == 41
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
