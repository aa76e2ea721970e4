"""The source's C answer thread on the main channel (no preempt) against the source machine's
own answer: for the same requests, the same pages, each once, with the same contents; the
machine learns what the thread wrote (clean pages, counts), answers none of it again, and its
next record names its block; the thread writes only on the loop's release, inside a RAM
section's records and within the cap's window, and leaves everything else (and every odd
request, with the machine's error) to the machine."""

from __future__ import annotations

import select
import socket
import time

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
from qmig.protocol.source import RAM_SECTION_ID, Source
from qmig.runner.answer import FastAnswer
from qmig.transport import Connection
from qmig.wire import messages as m
from qmig.wire.profiles import load_profile
from qmig.wire.schema import schema_for

VERSION = "7.2"
QUIET = 0.3  # seconds a channel must stay silent to count as "nothing written"
FLAGS = load_profile(VERSION).ram_flags


def postcopy_source(seed: int = 5) -> Source:
    """A 7.2 source in postcopy whose first postcopy piece is taken: the stream ends inside
    a RAM section's records."""
    source = answering.postcopy_source(seed, VERSION, piece=2 * PAGE)  # pc.ram's first pages
    assert source.records_may_follow
    return source


def requests(*messages: object) -> bytes:
    return answering.requests(VERSION, *messages)


def page_records(data: bytes, last: str | None = None) -> list[tuple[str, int, bytes]]:
    """(block, target page, contents) of each page record in ``data``, which holds page
    records only; a CONTINUE record continues ``last`` or the record before it."""
    out: list[tuple[str, int, bytes]] = []
    at = 0
    while at < len(data):
        header = int.from_bytes(data[at : at + 8], "big")
        at += 8
        flags = header & (PAGE - 1)
        if not flags & FLAGS["CONTINUE"]:
            size = data[at]
            last = data[at + 1 : at + 1 + size].decode()
            at += 1 + size
        assert last is not None, "CONTINUE with no block before it"
        if flags & FLAGS["ZERO"]:
            contents, at = bytes(PAGE) if data[at] == 0 else b"?", at + 1
        else:
            assert flags & FLAGS["PAGE"], f"flags {flags:#x}"
            contents, at = data[at : at + PAGE], at + PAGE
        out.append((last, header // PAGE, contents))
    return out


def silent(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], QUIET)
    return not ready


class Thread:
    """A main-channel FastAnswer over a socket pair: ``peer`` is the destination's end."""

    def __init__(self, source: Source) -> None:
        self.main, self.peer = socket.socketpair()
        self.fast = FastAnswer(source, Connection("main", self.main), None, stall_timeout=WAIT)
        self.source = source

    def open(self, *, credit: int | None = None, records: bool = True) -> None:
        """The loop's turn ends: the stream ends inside a section's records (``records``)."""
        self.fast.hold()
        self.fast.release(open_records=records, credit=credit, window_end=time.monotonic() + 60)

    def passed_on(self, size: int) -> bytes:
        return passed_on(self.fast, size)

    def close(self) -> None:
        self.fast.stop()
        self.main.close()
        self.peer.close()


def python_answer(return_path: bytes) -> tuple[Source, bytes]:
    """The machine's own answer: its page records (without the section's end, should the
    pages fill it)."""
    source = postcopy_source()
    source.receive_data(return_path)
    drain(source)
    data = source.requested_data()
    schema = schema_for(VERSION)
    close = schema.build_ram_flag("EOS") + schema.build_footer(RAM_SECTION_ID)
    return source, data.removesuffix(close)


REQUESTS = [
    ONE_PAGE,
    (*MIXED, m.ReqPagesId(0, PAGE, "pc.ram")),  # the last one sent already: nothing
    HOST_PAGES,
    # the same page twice: once on the wire
    (m.ReqPagesId(20 * PAGE, PAGE, "pc.ram"), m.ReqPagesId(20 * PAGE, PAGE, "pc.ram")),
    REPEATED,
]


@pytest.mark.parametrize("messages", REQUESTS)
def test_the_thread_sends_the_pages_the_machine_would(messages: tuple[object, ...]) -> None:
    return_path = requests(*messages)
    expected_source, expected = python_answer(return_path)
    wanted = page_records(expected, last="pc.ram")  # the open section's block so far
    assert wanted
    source = postcopy_source()
    thread = Thread(source)
    try:
        thread.open()
        thread.peer.sendall(return_path)
        size = sum(8 + (PAGE if data.strip(b"\0") else 1) for _, _, data in wanted)
        # Every host page names its block: the bytes are the names' longer.
        names = {(block, page // 4 if block == "big" else page) for block, page, _ in wanted}
        size += sum(1 + len(block) for block, _ in names)
        written = recv_exactly(thread.peer, size)
        assert silent(thread.peer)  # each page once
        assert page_records(written) == wanted
        passed = thread.passed_on(len(return_path))
        assert passed == return_path  # the machine reads every byte
        answered = thread.fast.apply()
        # Per request, its pages all sent already (the thread wrote none) as the machine
        # judges it, a page asked for twice before it is served included.
        expected_verdicts = answering.machine_verdicts(postcopy_source(), return_path)
        assert answering.thread_verdicts(answered, expected_verdicts) == expected_verdicts
        source.receive_data(passed)
        drain(source)
        assert source.requested_data() == b""  # answered already: not again
    finally:
        thread.close()
    got, want = vars(source.stats), vars(expected_source.stats)
    # The same counts; the bytes are the thread's own (its records name their blocks).
    assert got.pop("postcopy_bytes") - want.pop("postcopy_bytes") == len(written) - len(expected)
    assert got == want
    assert source.preempt_pages == 0
    for block, other in zip(source.blocks, expected_source.blocks, strict=True):
        assert block.dirty == other.dirty
    # The thread named blocks in between: the machine's next record names its own.
    following = source.data_to_send(PAGE)
    assert following and not int.from_bytes(following[:8], "big") & FLAGS["CONTINUE"]


@pytest.mark.parametrize(
    ("records", "credit"),
    [(False, None), (True, 0)],
    ids=["between sections", "window spent"],
)
def test_where_no_record_may_go_the_machine_answers(records: bool, credit: int | None) -> None:
    """Between sections (or after the end), or with the cap's quota spent, the thread writes
    nothing and the request stays the machine's, which the loop answers in its next piece."""
    return_path = requests(m.ReqPagesId(40 * PAGE, PAGE, "pc.ram"))
    source = postcopy_source()
    thread = Thread(source)
    try:
        thread.open(records=records, credit=credit)
        thread.peer.sendall(return_path)
        passed = thread.passed_on(len(return_path))
        assert silent(thread.peer)
        assert thread.fast.apply() == []
        source.receive_data(passed)
        drain(source)
        answer = page_records(source.requested_data(), last="pc.ram")
        assert [page for _, page, _ in answer] == [40]
    finally:
        thread.close()
    assert thread.fast.declined == 1  # counted as the thread stops


def test_the_thread_waits_for_the_loops_turn_to_end() -> None:
    """While the loop holds the channel the thread writes nothing; on release it does."""
    return_path = requests(m.ReqPagesId(40 * PAGE, PAGE, "pc.ram"))
    source = postcopy_source()
    thread = Thread(source)
    try:
        thread.fast.hold()
        thread.peer.sendall(return_path)
        assert silent(thread.peer)
        thread.fast.release(open_records=True, credit=None, window_end=0.0)
        written = recv_exactly(thread.peer, 8 + 1 + len("pc.ram") + PAGE)
        assert [page for _, page, _ in page_records(written)] == [40]
        thread.passed_on(len(return_path))
    finally:
        thread.close()


def test_the_window_counts_what_the_thread_sent() -> None:
    """With quota for one page left, the first request goes out and spends it (past it, as
    QEMU's loop goes on while requests are queued); the next waits for the loop."""
    first = requests(m.ReqPagesId(40 * PAGE, PAGE, "pc.ram"))
    second = requests(m.ReqPagesId(41 * PAGE, PAGE, "pc.ram"))
    source = postcopy_source()
    thread = Thread(source)
    try:
        thread.open(credit=100)
        thread.peer.sendall(first)
        recv_exactly(thread.peer, 8 + 1 + len("pc.ram") + PAGE)
        thread.passed_on(len(first))
        thread.peer.sendall(second)
        thread.passed_on(len(second))
        assert silent(thread.peer)
    finally:
        thread.close()
    assert thread.fast.declined == 1


@pytest.mark.parametrize("message", [*ODD, m.ReqPagesId(0, 0, "pc.ram")])  # and an empty one
def test_an_odd_request_is_left_to_the_machine(message: object) -> None:
    return_path = requests(message)
    with pytest.raises(QmigError) as expected:
        python_answer(return_path)
    source = postcopy_source()
    thread = Thread(source)
    try:
        thread.open()
        thread.peer.sendall(return_path)
        passed = thread.passed_on(len(return_path))
        assert thread.fast.apply() == []
        with pytest.raises(QmigError) as got:
            source.receive_data(passed)
        assert str(got.value) == str(expected.value)
        assert silent(thread.peer)  # nothing written
    finally:
        thread.close()
