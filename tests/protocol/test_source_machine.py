"""The source machine, fed return-path bytes directly; its output read back by the reader."""

from __future__ import annotations

import dataclasses
import random

import pytest

from qmig.errors import LocalProtocolError, QmigError, RemoteProtocolError
from qmig.protocol import events as ev
from qmig.protocol import source as source_module
from qmig.protocol.recv_bitmap import bitmap_size
from qmig.protocol.source import DeviceSnapshot, Source, SourceBlock
from qmig.protocol.states import SourceState
from qmig.wire import messages as m
from qmig.wire.reader import NEED_DATA, Record, StreamReader
from qmig.wire.schema import schema_for

VERSION = "7.2"
S = schema_for(VERSION)
PAGE = 4096


def make_source(pages: int = 64, *, seed: int = 3, **kwargs: object) -> Source:
    rng = random.Random(seed)
    ram = bytearray(rng.randbytes(pages * PAGE))
    for index in range(0, pages, 3):  # some zero pages
        ram[index * PAGE : (index + 1) * PAGE] = bytes(PAGE)
    blocks = [
        SourceBlock("pc.ram", pages * PAGE, ram),
        SourceBlock("pc.bios", 4 * PAGE, bytearray(rng.randbytes(4 * PAGE))),
    ]
    devices = [DeviceSnapshot("timer", 0, 2, b"\x01" * 24)]
    return Source(blocks, version=VERSION, devices=devices, pages_per_section=16, **kwargs)  # type: ignore[arg-type]


def records(stream: bytes) -> list[Record]:
    reader = StreamReader(VERSION)
    reader.feed(stream)
    return list(reader)


def run_precopy_pass(source: Source) -> bytes:
    out = b""
    while not source.pass_complete:
        out += source.data_to_send(64 << 10)
    return out


def test_the_opening_is_what_qemu_7_2_sends() -> None:
    source = make_source()
    source.start()
    names = [record.name for record in records(source.data_to_send())]
    assert names[:8] == [
        "HEADER",
        "CONFIGURATION",
        "OPEN_RETURN_PATH",
        "PING",
        "POSTCOPY_ADVISE",
        "SECTION_START",
        "MEM_SIZE",
        "EOS",
    ]


def test_switchover_sends_discards_ping_package_ping_in_order() -> None:
    source = make_source()
    source.start()
    stream = source.data_to_send() + run_precopy_pass(source)
    source.sync_dirty("pc.ram", [1, 2, 3, 10, 20, 21])
    source.start_postcopy()
    stream += source.data_to_send(0)
    parsed = records(stream)
    names = [r.name for r in parsed]
    first_discard = names.index("POSTCOPY_RAM_DISCARD")
    assert names[first_discard:] == [
        "POSTCOPY_RAM_DISCARD",
        "PING",
        "PACKAGED",
        "POSTCOPY_LISTEN",
        "SECTION_FULL",
        "DEVICE_STATE",
        "SECTION_FOOTER",
        "PING",
        "POSTCOPY_RUN",
        "PACKAGE_END",
        "PING",
    ]
    assert parsed[first_discard].message.ranges == (
        m.DiscardRange(1 * PAGE, 3 * PAGE),
        m.DiscardRange(10 * PAGE, PAGE),
        m.DiscardRange(20 * PAGE, 2 * PAGE),
    )
    assert [r.message.value for r in parsed if isinstance(r.message, m.Ping)] == [1, 2, 3, 4]


def test_the_destination_runs_once_it_answers_the_ping_before_run() -> None:
    """A destination reads the package in order, so the PONG to the PING right before RUN
    says it has reached RUN; the PONGs before it, and the PING after the package, do not."""
    source = make_source()
    source.start()
    stream = source.data_to_send() + run_precopy_pass(source)
    source.start_postcopy()
    stream += source.data_to_send(0)
    parsed = records(stream)
    run = [r.name for r in parsed].index("POSTCOPY_RUN")
    before_run = parsed[run - 1].message
    assert isinstance(before_run, m.Ping)
    for value in (1, 2, before_run.value + 1):  # the earlier PONGs, the one after the package
        source.receive_data(S.build_rp(m.Pong(value)))
        assert not source.destination_runs
    source.receive_data(S.build_rp(m.Pong(before_run.value)))
    assert source.destination_runs


def test_discards_carry_at_most_twelve_ranges_per_command() -> None:
    source = make_source(pages=128)
    source.start()
    stream = source.data_to_send() + run_precopy_pass(source)
    source.sync_dirty("pc.ram", range(0, 128, 2))  # 64 separate runs
    source.start_postcopy()
    stream += source.data_to_send(0)
    discards = [r.message for r in records(stream) if isinstance(r.message, m.PostcopyRamDiscard)]
    assert [len(d.ranges) for d in discards] == [12, 12, 12, 12, 12, 4]
    assert [r.start for d in discards for r in d.ranges] == [p * PAGE for p in range(0, 128, 2)]


def pages_sent(stream: bytes, after: int) -> list[int]:
    """Offsets of the pc.ram page records whose bodies lie at or after byte ``after`` (a run
    read from the whole stream may span two sends: postcopy keeps its section open)."""
    offsets = []
    for record in records(stream):
        message = record.message
        if isinstance(message, m.RamPageRun) and message.block == "pc.ram":
            mask = message.target_page_size - 1
            offsets += [
                header & ~mask
                for header, body in zip(message.headers, message.bodies, strict=True)
                if body >= after
            ]
    return offsets


def test_requested_pages_jump_the_queue_and_are_not_sent_twice() -> None:
    source = make_source(pages=256)
    source.start()
    source.start_postcopy()  # nothing was sent yet: all of RAM is discarded
    stream = source.data_to_send(0)
    rp = S.build_rp(m.ReqPagesId(200 * PAGE, PAGE, "pc.ram"))
    rp += S.build_rp(m.ReqPages(201 * PAGE, PAGE))
    source.receive_data(rp)
    mark = len(stream)
    stream += source.data_to_send(2 * (PAGE + 64))
    assert pages_sent(stream, mark) == [200 * PAGE, 201 * PAGE]
    # Asked again after it was sent: nothing more goes out for it.
    source.receive_data(S.build_rp(m.ReqPages(200 * PAGE, PAGE)))
    mark = len(stream)
    while source.state is SourceState.POSTCOPY:
        stream += source.data_to_send(1 << 20)
    rest = pages_sent(stream, mark)
    assert sorted(rest) == [p * PAGE for p in range(256) if p not in (200, 201)]
    assert source.stats.requested_pages == 2
    assert [r.name for r in records(stream)][-4:] == ["SECTION_END", "EOS", "SECTION_FOOTER", "EOF"]


def requests_received(source: Source) -> list[ev.RequestReceived]:
    out = []
    while (event := source.next_event()) is not NEED_DATA:
        if isinstance(event, ev.RequestReceived):
            out.append(event)
    return out


def test_a_request_says_whether_its_pages_were_sent_already() -> None:
    """A request for a page the source sent before it came finds nothing to send (QEMU 7.2's
    get_queued_page_not_dirty); one for a page still dirty has it sent for it."""
    source = make_source(pages=256)
    source.start()
    source.start_postcopy()
    stream = source.data_to_send(0)
    source.receive_data(S.build_rp(m.ReqPagesId(10 * PAGE, PAGE, "pc.ram")))
    assert [event.already_sent for event in requests_received(source)] == [False]
    stream += source.data_to_send(PAGE + 64)  # page 10 goes out for its request
    mark = len(stream)
    # Page 10 again (sent already) and page 11 with 12 (still dirty); then page 10 asked with
    # a dirty page beside it: one dirty page is enough to have something sent for it.
    source.receive_data(
        S.build_rp(m.ReqPages(10 * PAGE, PAGE))
        + S.build_rp(m.ReqPages(11 * PAGE, 2 * PAGE))
        + S.build_rp(m.ReqPages(9 * PAGE, 2 * PAGE))
    )
    got = [(event.start, event.already_sent) for event in requests_received(source)]
    assert got == [(10 * PAGE, True), (11 * PAGE, False), (9 * PAGE, False)]
    stream += source.data_to_send(4 * (PAGE + 64))
    sent = pages_sent(stream, mark)
    assert sent[:3] == [11 * PAGE, 12 * PAGE, 9 * PAGE] and 10 * PAGE not in sent


def test_a_page_asked_for_again_before_it_went_out_is_sent_already_the_second_time() -> None:
    """Two requests for the same page, both read before either is served: the first has it
    sent for it, and the second finds it sent when it is served (QEMU's migration thread
    takes it off the queue no longer dirty, get_queued_page_not_dirty)."""
    source = make_source(pages=256)
    source.start()
    source.start_postcopy()
    stream = source.data_to_send(0)
    # Page 30 twice, page 31 between them, and 30 with 32 (dirty, asked for once): the last
    # one still has a page sent for it.
    source.receive_data(
        S.build_rp(m.ReqPagesId(30 * PAGE, PAGE, "pc.ram"))
        + S.build_rp(m.ReqPages(31 * PAGE, PAGE))
        + S.build_rp(m.ReqPages(30 * PAGE, PAGE))
        + S.build_rp(m.ReqPages(30 * PAGE, 3 * PAGE))
    )
    got = [(event.start, event.already_sent) for event in requests_received(source)]
    assert got == [(30 * PAGE, False), (31 * PAGE, False), (30 * PAGE, True), (30 * PAGE, False)]
    mark = len(stream)
    stream += source.data_to_send(3 * (PAGE + 64))
    assert pages_sent(stream, mark)[:3] == [30 * PAGE, 31 * PAGE, 32 * PAGE]
    assert source.stats.requested_pages == 3
    # Served, then asked for again: clean in the dirty map.
    source.receive_data(S.build_rp(m.ReqPages(31 * PAGE, PAGE)))
    assert [event.already_sent for event in requests_received(source)] == [True]


def test_a_page_queued_before_a_break_is_sent_for_its_request_after_the_recovery() -> None:
    """A request lost with a broken channel sends nothing: after the recovery, the page the
    destination still lacks is sent for its new request, not counted as sent already."""
    source = make_source(pages=256)
    source.start()
    source.start_postcopy()
    source.data_to_send(0)
    source.receive_data(S.build_rp(m.ReqPagesId(40 * PAGE, PAGE, "pc.ram")))
    assert [event.already_sent for event in requests_received(source)] == [False]
    source.channel_broken()
    source.resume()
    for block, pages in (("pc.ram", 256), ("pc.bios", 4)):  # the destination received nothing
        source.receive_data(S.build_rp(m.RpRecvBitmap(block, bytes(bitmap_size(pages)))))
    source.data_to_send(0)  # RECV_BITMAP per block, then POSTCOPY_RESUME
    source.receive_data(S.build_rp(m.ResumeAck(1)))
    assert source.state is SourceState.POSTCOPY
    source.receive_data(S.build_rp(m.ReqPagesId(40 * PAGE, PAGE, "pc.ram")))
    assert [event.already_sent for event in requests_received(source)] == [False]


def test_requested_data_holds_the_requested_pages_and_nothing_of_the_sweep() -> None:
    source = make_source(pages=256)
    source.start()
    assert source.requested_data() == b""  # precopy: nothing is requested yet
    source.start_postcopy()
    stream = source.data_to_send(0)
    assert source.requested_data() == b""  # postcopy, nothing asked: no sweep either
    source.receive_data(
        S.build_rp(m.ReqPagesId(7 * PAGE, PAGE, "pc.ram")) + S.build_rp(m.ReqPages(90 * PAGE, PAGE))
    )
    mark = len(stream)
    stream += source.requested_data()
    assert pages_sent(stream, mark) == [7 * PAGE, 90 * PAGE]
    assert source.pending_requests == 0 and source.stats.requested_pages == 2
    # Asked again once sent: nothing goes out; the sweep then sends the rest, once each.
    source.receive_data(S.build_rp(m.ReqPages(7 * PAGE, PAGE)))
    assert pages_sent(stream + source.requested_data(), len(stream)) == []
    mark = len(stream)
    while source.state is SourceState.POSTCOPY:
        stream += source.data_to_send(1 << 20)
    assert sorted(pages_sent(stream, mark)) == [p * PAGE for p in range(256) if p not in (7, 90)]


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        (m.ReqPages(0, PAGE), "no previous block"),
        (m.ReqPagesId(0, PAGE, "nope"), "no block 'nope'"),
        (m.ReqPagesId(100, PAGE, "pc.ram"), "misaligned page request"),
        (m.ReqPagesId(64 * PAGE, PAGE, "pc.ram"), "request overrun"),
        (m.Shut(1), "the destination reported an error (1)"),
    ],
)
def test_bad_return_path_messages_fail_the_source(message: object, detail: str) -> None:
    source = make_source()
    source.start()
    source.start_postcopy()
    with pytest.raises(RemoteProtocolError) as caught:
        source.receive_data(S.build_rp(message))  # type: ignore[arg-type]
    assert detail in caught.value.detail
    assert source.state is SourceState.FAILED


def test_shut_0_completes_only_after_the_stream_ended() -> None:
    source = make_source(pages=8)
    source.start()
    source.start_postcopy()
    while source.state is SourceState.POSTCOPY:
        source.data_to_send(1 << 20)
    assert source.state is SourceState.COMPLETING
    while source.next_event() is not NEED_DATA:  # the changes of state so far
        pass
    source.receive_data(S.build_rp(m.Pong(1)) + S.build_rp(m.Shut(0)))
    assert source.state is SourceState.DONE
    assert [source.next_event() for _ in range(4)] == [
        ev.PongReceived(1),
        ev.DestinationShut(0),
        ev.PhaseChanged(SourceState.COMPLETING, SourceState.DONE),
        NEED_DATA,
    ]


def test_an_early_shut_is_an_error() -> None:
    source = make_source()
    source.start()
    with pytest.raises(RemoteProtocolError, match="before the stream was complete"):
        source.receive_data(S.build_rp(m.Shut(0)))


def test_the_guest_cannot_dirty_memory_after_switchover() -> None:
    source = make_source()
    source.start()
    source.start_postcopy()
    with pytest.raises(LocalProtocolError):
        source.sync_dirty("pc.ram", [1])


def test_postcopy_sections_span_sends() -> None:
    """Small sends (about one page each) must not cost a section per page: a SECTION_PART
    stays open until pages_per_section (16 here) pages went out, and closes before the END."""
    source = make_source(pages=64)
    source.start()
    source.start_postcopy()
    stream = source.data_to_send(0)
    mark = len(stream)
    sends = 0
    while source.state is SourceState.POSTCOPY:
        stream += source.data_to_send(PAGE + 64)
        sends += 1
    found = [r for r in records(stream) if r.offset >= mark]
    names = [r.name for r in found]
    pages = sum(r.message.count for r in found if isinstance(r.message, m.RamPageRun))
    assert pages == 64 + 4  # pc.ram and pc.bios, every page once
    sections = names.count("SECTION_PART")
    assert sends >= pages
    assert sections == -(-pages // 16)
    assert names[-4:] == ["SECTION_END", "EOS", "SECTION_FOOTER", "EOF"]
    assert names.count("EOS") == sections + 1  # each part closed, then the END's


def test_a_first_request_without_a_block_fails_as_qemu_does() -> None:
    """QEMU's source reuses the last request's block for REQ_PAGES; with none before, it
    fails ("ram_save_queue_pages no previous block") and marks the return path bad."""
    source = make_source()
    source.start()
    source.start_postcopy()
    pong = S.build_rp(m.Pong(1))
    with pytest.raises(RemoteProtocolError) as caught:
        source.receive_data(pong + S.build_rp(m.ReqPages(2 * PAGE, PAGE)))
    error = caught.value
    assert error.one_line() == (
        f"REQ_PAGES: no previous block: no REQ_PAGES_ID named one before it at byte {len(pong)}"
    )
    assert error.state == "postcopy"
    assert source.state is SourceState.FAILED
    assert source.pending_requests == 0


@pytest.mark.parametrize(("version", "refused"), [("2.9", False), ("7.2", True), ("10.0", True)])
def test_the_profiles_range_rule_decides_a_zero_length_request_at_0(
    version: str, refused: bool
) -> None:
    """7.2 checks the request's last byte in u64: start 0, length 0 wraps and is refused;
    2.9 checks start + length against the block's end and takes it."""
    schema = schema_for(version)
    source = Source([SourceBlock("pc.ram", 8 * PAGE, bytearray(8 * PAGE))], version=version)
    source.start()
    source.start_postcopy()
    data = schema.build_rp(m.ReqPagesId(0, 0, "pc.ram"))
    if not refused:
        source.receive_data(data)
        assert source.state is SourceState.POSTCOPY
        return
    with pytest.raises(RemoteProtocolError) as caught:
        source.receive_data(data)
    assert caught.value.detail == "request overrun start=0x0 len=0x0 blocklen=0x8000"


def test_an_unknown_range_rule_is_an_error() -> None:
    profile = dataclasses.replace(S.profile, request_range_check="bogus")
    with pytest.raises(QmigError, match="unknown request_range_check rule 'bogus'"):
        source_module._range_check(profile.request_range_check)
