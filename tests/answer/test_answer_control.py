"""The source runner's side of the main-channel answer thread (``AnswerControl``): a turn
holds the channel, so the thread writes nothing during it; ``let_go`` ends the hold early,
for the part of a turn that writes nothing more (the C sweep's bookkeeping), and the thread
answers at once; the turn's end then lets go of nothing twice, and the next turn holds the
channel again as before."""

from __future__ import annotations

import socket

import answering
import pytest
from answering import PAGE, WAIT, recv_exactly
from test_main_answer import page_records, silent

from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.runner.answer_control import AnswerControl
from qmig.runner.cap_window import CapWindow
from qmig.runner.channels import Channels
from qmig.runner.source_report import SourceReport
from qmig.transport import Connection
from qmig.wire import messages as m

ANSWER = 8 + 1 + len("pc.ram") + PAGE  # one named page record of pc.ram


def request(page: int) -> bytes:
    return answering.requests("7.2", m.ReqPagesId(page * PAGE, PAGE, "pc.ram"))


class Control:
    """An AnswerControl whose thread answers on the main channel of a socket pair."""

    def __init__(self) -> None:
        self.source: Source = answering.postcopy_source(5, "7.2", piece=2 * PAGE)
        self.main, self.peer = socket.socketpair()
        self.report = SourceReport()
        self.control = AnswerControl(
            self.source,
            Channels(Connection("main", self.main)),
            self.report,
            CapWindow(None, 0.1),
            enabled=True,
            stall_timeout=WAIT,
            await_room=lambda: None,
        )
        self.control.want(SourceState.POSTCOPY)
        assert self.control.main  # the thread runs, on the main channel

    def answered(self) -> list[int]:
        """The target pages of the next answer the destination's end reads (one page)."""
        return [page for _, page, _ in page_records(recv_exactly(self.peer, ANSWER))]

    def held_for_a_whole_turn(self, page: int) -> None:
        """A request read during a turn is answered once the turn ends, not before."""
        with self.control.turn():
            self.peer.sendall(request(page))
            assert silent(self.peer)
        assert self.answered() == [page]

    def close(self) -> None:
        self.control.stop()
        self.main.close()
        self.peer.close()


def test_let_go_lets_the_thread_answer_before_the_turn_ends() -> None:
    control = Control()
    answers = control.control
    try:
        with answers.turn():
            control.peer.sendall(request(40))
            assert silent(control.peer)  # held
            answers.let_go()
            assert control.answered() == [40]
            answers.let_go()  # let go already: nothing
        # The turn's end let go of nothing again: the next turn holds the channel as before.
        control.held_for_a_whole_turn(41)
    finally:
        control.close()


def test_a_turn_that_fails_after_let_go_lets_go_of_nothing_again() -> None:
    control = Control()
    answers = control.control
    try:
        with pytest.raises(RuntimeError), answers.turn():
            answers.let_go()
            raise RuntimeError("the turn's write failed")
        control.held_for_a_whole_turn(42)
    finally:
        control.close()


def test_a_turn_that_fails_while_holding_lets_no_record_follow() -> None:
    """A turn that fails while it holds the channel does not say that the stream ends inside
    a RAM section's records: the thread leaves what it reads next to the machine."""
    control = Control()
    answers = control.control
    try:
        with pytest.raises(RuntimeError), answers.turn():
            raise RuntimeError("the turn's write failed")
        control.peer.sendall(request(43))
        assert answers.fast is not None
        answering.passed_on(answers.fast, len(request(43)))  # read, and passed on
        assert silent(control.peer)
    finally:
        control.close()
    assert control.report.fast_answer["declined"] == 1  # the machine's to answer
