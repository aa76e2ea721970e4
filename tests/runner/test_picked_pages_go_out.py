"""Under a cap that counts the preempt channel's pages (QEMU 8.1+), a background page the
source has picked (and so marked sent) goes out in the same window, never held to the next.

QEMU's migration thread checks the rate before it picks each page, and writes the page it
picked. The runner picked a whole window's burst at once and wrote it within the quota
left: urgent pages counted while it drained spent the quota, and the rest of the burst,
its pages marked sent, waited for the next window. A vCPU faulting on one of them asked for
it, was told it was sent already, and waited ~100 ms for a page that QEMU would either have
sent by then or sent on the preempt channel. The window is stretched here, so that the two
cases differ by channel, not by time: a page not picked yet comes on the preempt channel.
"""

from __future__ import annotations

import select
import time

import pytest
from preempt_by_hand import by_hand, pages_of

from qmig.protocol import events as ev
from qmig.protocol.preempt import PreemptVariant
from qmig.runner import source as source_runner
from qmig.runner.source import SourcePlan
from qmig.runner.source_ram import GuestRam

SIZE = 8 << 20
QUOTA = 512 << 10  # per window; the sweep's burst covers pc.ram's first QUOTA bytes
WINDOW = 4.0  # seconds: longer than the run up to RUN and the answers on a loaded host
ASKED = 64  # pages at the end of RAM asked for at once: half the quota, counted in it
LATE = QUOTA * 3 // 4  # a page in the second half of the sweep's first burst


def _where_the_late_page_comes(fast_answer: bool) -> str:
    """RUN in, the destination asks for ASKED pages and waits for them on the preempt
    channel without reading the main one; then it asks for the page at LATE and reads both
    channels until it comes: the channel it came on."""
    ram = GuestRam.generate([("pc.ram", SIZE)], zero_fraction=0.0)
    plan = SourcePlan(postcopy_after=0, bandwidth=QUOTA / WINDOW, fast_answer=fast_answer)
    # A small receive buffer: unread, the main channel holds the source back at once.
    with by_hand(ram, "10.0", PreemptVariant.V8_0, plan, receive_buffer=16 << 10) as peer:
        peer.up_to_run()
        main, preempt, channel = peer.main, peer.preempt, peer.channel
        assert preempt is not None and channel is not None
        wanted = {SIZE - (index + 1) * 4096 for index in range(ASKED)}
        peer.ask(sorted(wanted))
        while wanted:
            assert time.monotonic() < peer.deadline, f"{len(wanted)} pages never came"
            count = preempt.recv_into(peer.buffer)
            assert count, "the source closed the preempt channel"
            channel.receive_data(memoryview(peer.buffer)[:count])
            while isinstance(event := channel.next_event(), ev.Event):
                wanted -= pages_of(event)
        peer.ask([LATE])
        while True:
            assert time.monotonic() < peer.deadline, "the late page never came"
            for ready in select.select([main, preempt], [], [], 1.0)[0]:
                count = ready.recv_into(peer.buffer)
                assert count, "the source closed a channel"
                machine = peer.dest if ready is main else channel
                machine.receive_data(memoryview(peer.buffer)[:count])
                while isinstance(event := machine.next_event(), ev.Event):
                    if LATE in pages_of(event):
                        return "main" if ready is main else "preempt"
                if ready is main:
                    main.sendall(peer.dest.data_to_send())


@pytest.mark.parametrize("fast_answer", [True, False], ids=["c-answer", "python-answer"])
def test_a_page_not_yet_written_is_not_picked_ahead_of_the_cap(
    monkeypatch: pytest.MonkeyPatch, fast_answer: bool
) -> None:
    monkeypatch.setattr(source_runner, "CAP_WINDOW", WINDOW)
    assert _where_the_late_page_comes(fast_answer) == "preempt"
