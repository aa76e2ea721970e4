"""What the answer-thread tests share: a source machine in postcopy over three blocks (one of
host pages of four target pages, partly sent), its requests as return-path bytes, and reads
that wait (generously) for a socket's or a FastAnswer's bytes."""

from __future__ import annotations

import random
import select
import socket
from typing import Any

from qmig.protocol import events as ev
from qmig.protocol.source import Source, SourceBlock
from qmig.protocol.states import SourceState
from qmig.runner.answer import Answered, AnswerTimes, FastAnswer
from qmig.wire import messages as m
from qmig.wire.reader import NEED_DATA
from qmig.wire.schema import schema_for

PAGE = 4096
WAIT = 30.0  # seconds: generous, the machine may be loaded

# Requests both threads answer as their machine would: one page of a block; then another
# block, then the same block again (CONTINUE), a request of three pages, zero pages, and a
# REQ_PAGES that reuses the last block; whole host pages of four target pages, one of them
# half sent.
ONE_PAGE = (m.ReqPagesId(40 * PAGE, PAGE, "pc.ram"),)
MIXED = (
    m.ReqPagesId(3 * PAGE, PAGE, "vga.vram"),
    m.ReqPagesId(5 * PAGE, 3 * PAGE, "pc.ram"),
    m.ReqPages(7 * PAGE, 2 * PAGE),
    m.ReqPagesId(6 * PAGE, PAGE, "vga.vram"),
    m.ReqPages(0, PAGE),
)
HOST_PAGES = (m.ReqPagesId(4 * PAGE, 8 * PAGE, "big"), m.ReqPagesId(PAGE, PAGE, "pc.ram"))
# A page asked for again after another request, before the machine has served either: the
# second time it is sent already.
REPEATED = (
    m.ReqPagesId(40 * PAGE, PAGE, "pc.ram"),
    m.ReqPages(41 * PAGE, PAGE),
    m.ReqPages(40 * PAGE, PAGE),
    m.ReqPages(40 * PAGE, PAGE),
)
# Requests the machine refuses: neither thread answers them, they are the machine's to refuse.
ODD = [
    m.ReqPagesId(0, PAGE, "nvram"),  # no such block
    m.ReqPagesId(100, PAGE, "pc.ram"),  # misaligned
    m.ReqPagesId(63 * PAGE, 2 * PAGE, "pc.ram"),  # past the block's end
]


def postcopy_source(seed: int, version: str, *, piece: int = 0, **options: Any) -> Source:
    """A ``version`` source (``options``: Source's) in postcopy after precopy's first pages;
    ``piece`` bytes of postcopy taken as well."""
    rng = random.Random(seed)
    ram = {
        "pc.ram": bytearray(rng.randbytes(64 * PAGE)),
        "vga.vram": bytearray(rng.randbytes(8 * PAGE)),
        "big": bytearray(rng.randbytes(16 * PAGE)),  # host pages of four target pages
    }
    ram["pc.ram"][7 * PAGE : 9 * PAGE] = bytes(2 * PAGE)  # zero pages go as ZERO records
    blocks = [SourceBlock(name, len(data), data) for name, data in ram.items() if name != "big"]
    blocks.append(SourceBlock("big", len(ram["big"]), ram["big"], page_size=4 * PAGE))
    source = Source(blocks, version=version, pages_per_section=8, **options)
    source.start()
    source.data_to_send(8 * PAGE)
    source.start_postcopy()
    source.data_to_send(0)
    if piece:
        source.data_to_send(piece)
    drain(source)
    assert source.state is SourceState.POSTCOPY
    # Part of a host page already sent: only the rest of it answers a request.
    source.by_name["big"].dirty[5] = source.by_name["big"].dirty[6] = 0
    return source


def drain(source: Source) -> None:
    while source.next_event() is not NEED_DATA:
        pass


def requests(version: str, *messages: object) -> bytes:
    schema = schema_for(version)
    return b"".join(schema.build_rp(message) for message in messages)  # type: ignore[arg-type]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        ready, _, _ = select.select([sock], [], [], WAIT)
        assert ready, f"{len(out)} of {size} bytes within {WAIT} s"
        chunk = sock.recv(size - len(out))
        assert chunk
        out += chunk
    return bytes(out)


def passed_on(fast: FastAnswer, size: int) -> bytes:
    """The return-path bytes the thread passed on, as the runner reads them."""
    out = bytearray()
    buffer = bytearray(4096)
    while len(out) < size:
        ready, _, _ = select.select([fast], [], [], WAIT)
        assert ready
        count = fast.read_into(buffer)
        assert count
        out += buffer[:count]
    return bytes(out)


def machine_verdicts(source: Source, return_path: bytes) -> list[tuple[str, int, bool]]:
    """The machine's verdict on each request in ``return_path``, in its order: the request's
    block and start, and whether its pages were all sent already when it is served."""
    source.receive_data(return_path)
    verdicts = []
    while (event := source.next_event()) is not NEED_DATA:
        if isinstance(event, ev.RequestReceived):
            verdicts.append((event.block, event.start, event.already_sent))
    return verdicts


def thread_verdicts(
    answered: list[Answered], requests: list[tuple[str, int, bool]]
) -> list[tuple[str, int, bool | None]]:
    """The thread's verdict on each of the machine's ``requests``, as the runner takes it
    (:class:`~qmig.runner.answer.AnswerTimes`): did the thread write no page for it? None:
    the thread's answers have no entry for it."""
    times = AnswerTimes()
    for page in answered:
        times.add(page)
    verdicts: list[tuple[str, int, bool | None]] = []
    for block, start, _ in requests:
        taken = times.take(block, start)
        verdicts.append((block, start, None if taken is None else taken[2]))
    return verdicts
