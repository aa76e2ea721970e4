"""The source's C answer thread (8.0 preempt variant) against the source machine's own answer:
for the same requests, the same preempt-channel bytes; the machine learns what the thread
wrote (clean pages, counts) and answers none of it again; every return-path byte reaches
the machine; what the thread finds odd is the machine's to refuse, with the same error."""

from __future__ import annotations

import select
import socket

import answering
import pytest
from answering import (
    HOST_PAGES,
    MIXED,
    ODD,
    ONE_PAGE,
    PAGE,
    REPEATED,
    WAIT,
    drain,
    passed_on,
    recv_exactly,
)

from qmig.errors import QmigError
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.source import Source
from qmig.runner.answer import FastAnswer
from qmig.transport import Connection
from qmig.wire import messages as m

VERSION = "10.0"


def postcopy_source(seed: int = 5) -> Source:
    return answering.postcopy_source(seed, VERSION, preempt=PreemptVariant.V8_0)


def requests(*messages: object) -> bytes:
    return answering.requests(VERSION, *messages)


def python_answer(return_path: bytes) -> tuple[Source, bytes]:
    source = postcopy_source()
    source.receive_data(return_path)
    drain(source)
    return source, source.preempt_data()


class Thread:
    """A FastAnswer over socket pairs: ``peer`` plays the destination's end of the main
    channel, ``preempt`` the destination's end of the preempt channel."""

    def __init__(self, source: Source) -> None:
        main, self.peer = socket.socketpair()
        ours, self.preempt = socket.socketpair()
        self.sockets = [main, ours]
        self.fast = FastAnswer(source, Connection("main", main), Connection("preempt", ours))
        self.source = source

    def passed_on(self, size: int) -> bytes:
        return passed_on(self.fast, size)

    def close(self) -> None:
        self.fast.stop()
        for sock in [*self.sockets, self.peer, self.preempt]:
            sock.close()


REQUESTS = [ONE_PAGE, MIXED, HOST_PAGES, REPEATED]


@pytest.mark.parametrize("messages", REQUESTS)
def test_the_thread_writes_what_the_machine_would(messages: tuple[object, ...]) -> None:
    return_path = requests(*messages)
    expected_source, expected = python_answer(return_path)
    assert expected
    source = postcopy_source()
    thread = Thread(source)
    try:
        thread.peer.sendall(return_path)
        assert recv_exactly(thread.preempt, len(expected)) == expected
        passed = thread.passed_on(len(return_path))
        assert passed == return_path  # the machine reads every byte
        answered = thread.fast.apply()
        assert answered
        # Per request, its pages all sent already (the thread wrote none) as the machine
        # judges it (in MIXED, page 7 is asked twice, and the second request's first host
        # page has none; pages 5 to 7 went in precopy; in REPEATED, page 40 is asked for
        # again before the machine has served it).
        assert sum(page.pages for page in answered) == expected_source.stats.requested_pages
        expected_verdicts = answering.machine_verdicts(postcopy_source(), return_path)
        assert answering.thread_verdicts(answered, expected_verdicts) == expected_verdicts
        source.receive_data(passed)
        drain(source)
        assert source.preempt_data() == b""  # answered already: not again
    finally:
        thread.close()
    assert vars(source.stats) == vars(expected_source.stats)
    assert source.preempt_pages == expected_source.preempt_pages
    assert source.preempt_block == expected_source.preempt_block
    for block, other in zip(source.blocks, expected_source.blocks, strict=True):
        assert block.dirty == other.dirty


def test_a_page_already_sent_is_not_answered() -> None:
    """The thread reads the machine's dirty map: a page the sweep sent is not sent again (the
    request is settled: the runner learns when, for its timings)."""
    source = postcopy_source()
    source.blocks[0].dirty[40] = 0
    before = vars(source.stats).copy()
    thread = Thread(source)
    try:
        thread.peer.sendall(requests(m.ReqPagesId(40 * PAGE, PAGE, "pc.ram")))
        thread.passed_on(len(requests(m.ReqPagesId(40 * PAGE, PAGE, "pc.ram"))))
        answered = thread.fast.apply()
        # No page written: the runner counts the request as one whose pages had gone.
        assert [(p.request_start, p.bytes, p.pages) for p in answered] == [(40 * PAGE, 0, 0)]
        assert vars(source.stats) == before
        ready, _, _ = select.select([thread.preempt], [], [], 0.2)
        assert not ready
    finally:
        thread.close()


@pytest.mark.parametrize("message", ODD)
def test_an_odd_request_is_left_to_the_machine(message: object) -> None:
    return_path = requests(message)
    with pytest.raises(QmigError) as expected:
        python_answer(return_path)
    source = postcopy_source()
    thread = Thread(source)
    try:
        thread.peer.sendall(return_path)
        passed = thread.passed_on(len(return_path))
        assert thread.fast.apply() == []
        with pytest.raises(QmigError) as got:
            source.receive_data(passed)
        assert str(got.value) == str(expected.value)
        ready, _, _ = select.select([thread.preempt], [], [], 0.2)
        assert not ready  # nothing written
    finally:
        thread.close()


def test_the_end_of_the_return_path_reaches_the_runner() -> None:
    source = postcopy_source()
    thread = Thread(source)
    try:
        thread.peer.sendall(requests(m.ReqPagesId(0, PAGE, "pc.ram")))
        thread.peer.close()
        thread.passed_on(len(requests(m.ReqPagesId(0, PAGE, "pc.ram"))))
        ready, _, _ = select.select([thread.fast], [], [], WAIT)
        assert ready and thread.fast.read_into(bytearray(16)) == 0
    finally:
        thread.fast.stop()
        for sock in [*thread.sockets, thread.preempt]:
            sock.close()
