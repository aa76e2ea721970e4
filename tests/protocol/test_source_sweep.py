"""After a page request, the postcopy sweep goes on from the requested page, as QEMU's does,
and still sends every other dirty page exactly once (it wraps round to what it skipped)."""

from __future__ import annotations

from qmig.protocol.source import Source, SourceBlock
from qmig.protocol.states import SourceState
from qmig.wire import messages as m
from qmig.wire.reader import StreamReader
from qmig.wire.schema import schema_for

VERSION = "7.2"
S = schema_for(VERSION)
PAGE = 4096


def page_order(stream: bytes, after: int) -> list[tuple[str, int]]:
    reader = StreamReader(VERSION)
    reader.feed(stream)
    order: list[tuple[str, int]] = []
    for record in reader:
        message = record.message
        if isinstance(message, m.RamPageRun) and record.offset >= after:
            order += [(message.block, offset // PAGE) for offset, _, _ in message.pages()]
    return order


def test_the_sweep_follows_the_request_then_wraps() -> None:
    blocks = [
        SourceBlock("pc.ram", 64 * PAGE, bytearray(b"\x11" * 64 * PAGE)),
        SourceBlock("vga.vram", 8 * PAGE, bytearray(b"\x22" * 8 * PAGE)),
    ]
    source = Source(blocks, version=VERSION)
    source.start()
    source.start_postcopy()  # nothing sent yet: every page is dirty
    stream = source.data_to_send(0)
    mark = len(stream)
    source.receive_data(S.build_rp(m.ReqPagesId(40 * PAGE, PAGE, "pc.ram")))
    while source.state is SourceState.POSTCOPY:
        stream += source.data_to_send(4 * (PAGE + 64))
    order = page_order(stream, mark)
    expected_pc = [("pc.ram", page) for page in range(40, 64)]
    assert order[:24] == expected_pc  # the requested page, then the ones after it
    assert order[24:32] == [("vga.vram", page) for page in range(8)]
    assert order[32:] == [("pc.ram", page) for page in range(40)]  # wrapped round
    assert source.stats.postcopy_pages == 72
