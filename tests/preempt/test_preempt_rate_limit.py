"""Requested pages and the bandwidth cap, as QEMU's source treats them.

QEMU's cap is a quota per 100 ms window on the main channel (qemu_file_rate_limit); once it
is spent, the migration thread sends nothing until the window ends (migration_rate_limit).
A request read meanwhile is queued by the return-path thread (ram_save_queue_pages), which
wakes the migration thread (migration_make_urgent_request), but qemu_savevm_state_iterate
returns before the RAM code while the main file is over its quota: the page waits for the
next window, where ram_save_iterate takes queued requests first and goes on past the quota
while any are queued. That holds for plain postcopy (every QEMU) and for QEMU 7.2's preempt
channel, which its migration thread writes; from QEMU 8.0 on the return-path thread writes
the preempt channel's pages as it reads the request (either preempt variant), so the cap does
not hold them.

The window is stretched to seconds here (``CAP_WINDOW``), so that "held to the next window"
is a lower bound on time that no load can break, and "at once" is seen as the page arriving
before any byte of the next window's burst on the main channel."""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass

import pytest
from preempt_by_hand import by_hand, pages_of

from qmig.protocol import events as ev
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.states import DestinationState
from qmig.runner import source as source_runner
from qmig.runner.source import SourcePlan
from qmig.runner.source_ram import GuestRam

WINDOW = 2.0  # seconds: the cap's window, stretched
SIZE = 8 << 20
WANTED = SIZE - 4096  # the last page: the sweep (one 32 KiB burst a window) is far from it
QUIET = 0.3  # seconds without main-channel bytes: the window's burst is over


@dataclass
class Answer:
    waited: float  # request sent → page read, at the destination
    channel: str  # where the page came: "main" or "preempt"
    main_bytes_before: int  # main channel bytes read after the request, before the page


def _ask_once_running(
    version: str,
    variant: PreemptVariant | None,
    *,
    bandwidth: float = 1.0,
    fast_answer: bool = False,
    at_the_sweep: bool = False,
) -> Answer:
    """A source capped at ``bandwidth`` bytes/s (1: one burst a window) switches to postcopy
    at once; the destination asks for one page and times its answer: the last page as soon
    as RUN is in (the switchover spent the window's quota), or, ``at_the_sweep``, once the
    burst that followed RUN is over (the main channel quiet for QUIET seconds, well inside
    the window), the first page it does not hold whole, where the background sweep stands."""
    ram = GuestRam.generate([("pc.ram", SIZE)], zero_fraction=0.0)
    plan = SourcePlan(postcopy_after=0, bandwidth=bandwidth, fast_answer=fast_answer)
    with by_hand(ram, version, variant, plan) as peer:
        main, dest = peer.main, peer.dest
        wanted: int | None = None
        asked_at: float | None = None
        main_after = 0
        held: set[int] = set()  # pages of pc.ram received whole
        burst = False  # main-channel bytes came once RUN was in
        last_main = time.monotonic()
        answer: Answer | None = None
        while answer is None:
            assert time.monotonic() < peer.deadline, "no answer to the request"
            waiting: list[object] = [main]
            if peer.preempt is not None:
                waiting.append(peer.preempt)
            elif variant is not None:
                waiting.append(peer.listener.socket)
            for ready in select.select(waiting, [], [], QUIET / 4)[0]:
                if ready is peer.listener.socket:
                    peer.accept_preempt()
                elif ready is main:
                    count = main.recv_into(peer.buffer)
                    assert count, "the source closed the stream before the answer"
                    last_main = time.monotonic()
                    burst |= dest.state is DestinationState.RUNNING
                    if asked_at is not None:
                        main_after += count
                    dest.receive_data(memoryview(peer.buffer)[:count])
                    while isinstance(event := dest.next_event(), ev.Event):
                        held |= pages_of(event)
                        if wanted in pages_of(event) and asked_at is not None:
                            answer = Answer(time.monotonic() - asked_at, "main", main_after - count)
                    main.sendall(dest.data_to_send())  # PONGs
                else:
                    assert peer.preempt is not None and peer.channel is not None
                    count = peer.preempt.recv_into(peer.buffer)
                    assert count, "the source closed the preempt channel"
                    peer.channel.receive_data(memoryview(peer.buffer)[:count])
                    while isinstance(event := peer.channel.next_event(), ev.Event):
                        held |= pages_of(event)
                        if wanted in pages_of(event) and asked_at is not None:
                            answer = Answer(time.monotonic() - asked_at, "preempt", main_after)
            if asked_at is not None or dest.state is not DestinationState.RUNNING:
                continue
            if not at_the_sweep:
                wanted = WANTED
            elif burst and time.monotonic() - last_main >= QUIET:
                wanted = next(page for page in range(0, SIZE, 4096) if page not in held)
            else:
                continue
            peer.ask([wanted])
            asked_at = time.monotonic()
    return answer


@pytest.fixture(autouse=True)
def stretched_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_runner, "CAP_WINDOW", WINDOW)


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_plain_postcopy_holds_a_request_to_the_next_window(version: str) -> None:
    answer = _ask_once_running(version, None)
    assert answer.channel == "main"
    # The switchover's window began before RUN was read, so the next one is at most a window
    # away; the answer came no sooner than most of one.
    assert answer.waited >= WINDOW / 2


def test_qemu_7_2_holds_preempt_pages_to_the_next_window() -> None:
    answer = _ask_once_running("7.2", PreemptVariant.PRE_7_2)
    assert answer.channel == "preempt"
    assert answer.waited >= WINDOW / 2


@pytest.mark.parametrize("variant", [PreemptVariant.V8_0, PreemptVariant.PRE_7_2])
def test_from_qemu_8_0_the_return_path_sends_preempt_pages_at_once(
    variant: PreemptVariant,
) -> None:
    """QEMU 10.0 with either variant (a machine type of 7.2 or older gets pre-7.2's channel,
    not its sender): the page comes while the window is still spent, before any byte of the
    next window's burst."""
    answer = _ask_once_running("10.0", variant)
    assert answer.channel == "preempt"
    assert answer.main_bytes_before == 0


@pytest.mark.parametrize("fast_answer", [True, False], ids=["c-answer", "python-answer"])
@pytest.mark.parametrize("bandwidth", [1.0, (256 << 10) / WINDOW], ids=["page", "256k"])
def test_the_page_where_a_spent_window_left_the_sweep_comes_on_the_preempt_channel(
    bandwidth: float, fast_answer: bool
) -> None:
    """QEMU's migration thread checks the rate before each page and writes what it put in
    its buffer whole: a window ends between two page records, and the pages after it are
    still dirty. So a vCPU that faults where the sweep stopped, once the window's burst is
    over, gets its page on the preempt channel at once (QEMU 8.0+), not the next window's
    burst on the main channel. A window's quota of one page, and of 64."""
    answer = _ask_once_running(
        "10.0", PreemptVariant.V8_0, bandwidth=bandwidth, fast_answer=fast_answer, at_the_sweep=True
    )
    assert answer.channel == "preempt"
    assert answer.main_bytes_before == 0


# The window's quota, and the pages asked for at once within it: about half the quota.
QUOTA = 512 << 10
ASKED = 64
QUOTA_WINDOW = 4.0  # long enough for the run up to RUN and the answers on a loaded host
# What the bytes of one window may pass the quota by: the piece of stream that was sized
# before the answers were counted, and the page that crosses the quota.
OVERSHOOT = source_runner.POSTCOPY_CHUNK + 2 * 4096


def _first_window(version: str, variant: PreemptVariant, *, fast_answer: bool) -> tuple[int, int]:
    """A source capped at QUOTA per window switches to postcopy at once; as soon as RUN is
    in, the destination asks for ASKED pages and, without reading the main channel, waits
    for them on the preempt channel; then it reads the main channel until the first window
    ends. The bytes of the first window on each channel: (main, preempt)."""
    ram = GuestRam.generate([("pc.ram", SIZE)], zero_fraction=0.0)
    plan = SourcePlan(postcopy_after=0, bandwidth=QUOTA / QUOTA_WINDOW, fast_answer=fast_answer)
    # A small receive buffer: the source blocks soon when the main channel is not read.
    with by_hand(ram, version, variant, plan, receive_buffer=16 << 10) as peer:
        main_bytes = peer.up_to_run()
        preempt_bytes = 0
        wanted = {SIZE - (index + 1) * 4096 for index in range(ASKED)}
        peer.ask(sorted(wanted))
        assert peer.preempt is not None and peer.channel is not None
        while wanted:
            assert time.monotonic() < peer.deadline, f"{len(wanted)} pages never came"
            count = peer.preempt.recv_into(peer.buffer)
            assert count, "the source closed the preempt channel"
            preempt_bytes += count
            peer.channel.receive_data(memoryview(peer.buffer)[:count])
            while isinstance(event := peer.channel.next_event(), ev.Event):
                wanted -= pages_of(event)
        # The first window's end: what the main channel brings until then is its.
        window_end = peer.reports[0].started + QUOTA_WINDOW
        while (left := window_end - time.monotonic()) > 0:
            if select.select([peer.main], [], [], left)[0]:
                count = peer.main.recv_into(peer.buffer)
                assert count, "the source closed the stream in postcopy"
                main_bytes += count
    return main_bytes, preempt_bytes


@pytest.mark.parametrize("fast_answer", [True, False], ids=["c-answer", "python-answer"])
def test_from_qemu_8_1_preempt_pages_use_up_the_window_quota(
    monkeypatch: pytest.MonkeyPatch, fast_answer: bool
) -> None:
    """QEMU 8.1+ takes its rate from one counter of every channel's bytes: the pages sent on
    the preempt channel leave less of the window to the main channel's background pages."""
    monkeypatch.setattr(source_runner, "CAP_WINDOW", QUOTA_WINDOW)
    main, preempt = _first_window("10.0", PreemptVariant.V8_0, fast_answer=fast_answer)
    assert preempt >= ASKED * 4096
    assert main + preempt <= QUOTA + OVERSHOOT


def test_qemu_7_2_counts_preempt_pages_apart_from_the_quota(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QEMU 7.2's quota is the main file's alone: the preempt channel's pages come on top."""
    monkeypatch.setattr(source_runner, "CAP_WINDOW", QUOTA_WINDOW)
    main, preempt = _first_window("7.2", PreemptVariant.PRE_7_2, fast_answer=False)
    assert preempt >= ASKED * 4096
    assert main >= QUOTA - OVERSHOOT
    assert main + preempt > QUOTA + OVERSHOOT


# A window's quota that the first burst cannot put into the sockets (they hold a few dozen
# KiB here), and the pages asked for where the sweep stands once the stream has stalled.
STALL_QUOTA = 2 << 20
ASKED_BEHIND = 256


def _asked_behind_a_stalled_stream(*, fast_answer: bool) -> tuple[set[int], int]:
    """A source capped at STALL_QUOTA per window (QEMU 10.0, the 8.0 variant) switches to
    postcopy at once; the destination reads the main channel up to RUN and then no more, so
    the window's burst stalls in the sockets. It asks for the ASKED_BEHIND pages from the
    first one it does not hold, and reads the preempt channel until it is quiet for QUIET
    seconds. The pages asked for that came there, and the bytes the main channel's sockets
    hold (both buffers)."""
    ram = GuestRam.generate([("pc.ram", SIZE)], zero_fraction=0.0)
    plan = SourcePlan(postcopy_after=0, bandwidth=STALL_QUOTA / WINDOW, fast_answer=fast_answer)
    held: set[int] = set()
    came: set[int] = set()
    with by_hand(ram, "10.0", PreemptVariant.V8_0, plan, receive_buffer=16 << 10) as peer:
        peer.up_to_run(lambda event: held.update(pages_of(event)))
        assert peer.preempt is not None and peer.channel is not None
        assert peer.main.socket is not None
        in_sockets = peer.main.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        in_sockets += 2 * source_runner.SEND_BUFFER  # the kernel doubles what is set
        time.sleep(QUIET)  # the burst fills the sockets and stalls
        frontier = next(page for page in range(0, SIZE, 4096) if page not in held)
        asked = {frontier + index * 4096 for index in range(ASKED_BEHIND)}
        peer.ask(sorted(asked))
        while select.select([peer.preempt], [], [], QUIET)[0]:
            assert time.monotonic() < peer.deadline, "the preempt channel never went quiet"
            count = peer.preempt.recv_into(peer.buffer)
            assert count, "the source closed the preempt channel"
            peer.channel.receive_data(memoryview(peer.buffer)[:count])
            while isinstance(event := peer.channel.next_event(), ev.Event):
                came |= pages_of(event) & asked
    return came, in_sockets


@pytest.mark.parametrize("fast_answer", [True, False], ids=["c-answer", "python-answer"])
def test_a_stalled_burst_holds_back_no_more_pages_than_the_sockets_and_a_chunk(
    fast_answer: bool,
) -> None:
    """QEMU's migration thread clears a page's dirty bit as it puts the page into its
    buffer, which it writes out before it takes more pages: when the main channel stalls,
    the pages past what the sockets and that buffer hold are still dirty, and a request for
    them goes on the preempt channel at once. The window's burst here is built a chunk at a
    time, so only the sockets' bytes and one chunk are asked for in vain; the rest of the
    ASKED_BEHIND pages past the destination's last one come on the preempt channel."""
    came, in_sockets = _asked_behind_a_stalled_stream(fast_answer=fast_answer)
    # Pages on their way do not come again: what the sockets hold and the chunk being
    # written (23-28 pages measured), with the sockets counted twice as a margin. Built a
    # window at a time, the burst held back all ASKED_BEHIND (none came).
    on_their_way = (2 * in_sockets + source_runner.POSTCOPY_CHUNK) // 4096
    assert len(came) >= ASKED_BEHIND - on_their_way
