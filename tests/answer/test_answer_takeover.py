"""The source's C answer thread taking the return path over from the machine mid-channel (as
after a recovery, where the handshake's reads are the machine's): a REQ_PAGES that follows a
REQ_PAGES_ID the machine read asks for more of that block, and the thread answers it as the
machine would have; the machine answers nothing of it again."""

from __future__ import annotations

import pytest
from test_fast_answer import Thread, drain, postcopy_source, recv_exactly, requests

from qmig.wire import messages as m

PAGE = 4096


@pytest.mark.parametrize("block", ["pc.ram", "vga.vram"])
def test_a_request_after_the_machines_last_block_is_the_threads(block: str) -> None:
    named, more = m.ReqPagesId(2 * PAGE, PAGE, block), m.ReqPages(5 * PAGE, 2 * PAGE)
    expected_source = postcopy_source()
    expected_source.receive_data(requests(named, more))
    drain(expected_source)
    expected = expected_source.preempt_data()

    source = postcopy_source()
    source.receive_data(requests(named))  # read before the thread took over
    drain(source)
    first = source.preempt_data()
    assert source.last_request_block == block and source.return_path_between_messages
    thread = Thread(source)
    try:
        thread.peer.sendall(requests(more))
        rest = recv_exactly(thread.preempt, len(expected) - len(first))
        assert first + rest == expected  # the block continued, as the machine's would be
        passed = thread.passed_on(len(requests(more)))
        assert thread.fast.apply()  # the thread wrote them
        source.receive_data(passed)
        drain(source)
        assert source.preempt_data() == b""  # answered: not again
    finally:
        thread.close()
    assert vars(source.stats) == vars(expected_source.stats)
    for ours, theirs in zip(source.blocks, expected_source.blocks, strict=True):
        assert ours.dirty == theirs.dirty


def test_a_new_return_path_names_no_block_yet() -> None:
    """After a resume the destination names the block again: nothing carries over."""
    source = postcopy_source()
    source.receive_data(requests(m.ReqPagesId(2 * PAGE, PAGE, "pc.ram")))
    drain(source)
    assert source.last_request_block == "pc.ram"
    source.channel_broken()
    source.resume()
    assert source.last_request_block is None
