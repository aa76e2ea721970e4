"""Postcopy recovery between the two sans-IO machines: a channel cut mid-postcopy, both ends
pause, a new channel carries RECV_BITMAP, the bitmaps, POSTCOPY_RESUME and RESUME_ACK, and
every page reaches the destination with the source's contents."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig.errors import LocalProtocolError, MalformedError, RemoteProtocolError, TruncatedError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.recv_bitmap import bitmap_size, missing_pages, received_bitmap
from qmig.protocol.source import Source, SourceBlock
from qmig.protocol.states import DestinationState, SourceState
from qmig.wire import messages as m
from qmig.wire.reader import NEED_DATA, Record, ReturnPathReader, StreamReader
from qmig.wire.schema import RECV_BITMAP_END_MARK, schema_for

VERSION = "7.2"
S = schema_for(VERSION)
PAGE = 4096
PAGES = 96
SECTION_PART = S.build_section(m.SectionPart(2))


class Pair:
    """A source and a destination joined in memory; the destination's RAM is a dict."""

    def __init__(self, seed: int = 5) -> None:
        rng = random.Random(seed)
        self.ram = {
            "pc.ram": bytearray(rng.randbytes(PAGES * PAGE)),
            "vga.vram": bytearray(rng.randbytes(8 * PAGE)),
        }
        blocks = [SourceBlock(name, len(ram), ram) for name, ram in self.ram.items()]
        self.source = Source(blocks, version=VERSION, pages_per_section=8)
        self.dest = Destination(VERSION)
        self.memory: dict[tuple[str, int], bytes] = {}
        self.events: list[ev.Event] = []
        self.rp_sent: list[bytes] = []
        self.opening = b""  # the stream up to the switchover
        # The runner's C receive thread: it reads the same stream, and may read (and place)
        # beyond what the machine has read (see place_ahead).
        self.c_reader = StreamReader(VERSION)

    def to_dest(self, data: bytes) -> None:
        self.c_reader.feed(data)
        while isinstance(self.c_reader.next_record(), Record):
            pass
        self.dest.receive_data(data)
        while (event := self.dest.next_event()) is not NEED_DATA:
            if not isinstance(event, ev.Event):
                break
            self.events.append(event)
            if isinstance(event, ev.PagesReceived):
                for offset, zero, data in event.run.pages():
                    content = data * PAGE if zero else data
                    self.memory[(event.run.block, offset)] = content

    def place_ahead(self, data: bytes) -> dict[str, bytearray]:
        """``data``, the stream's next bytes, read and placed by the C thread alone: the
        machine never reads them (the cut that follows drops them). Each page goes into
        memory; returns, per block, the bits of the pages placed (page i: bit i % 8 of byte
        i // 8, as the RAM's received map)."""
        placed = {name: bytearray(bitmap_size(len(ram) // PAGE)) for name, ram in self.ram.items()}
        self.c_reader.feed(data)
        while isinstance(record := self.c_reader.next_record(), Record):
            run = record.message
            if isinstance(run, m.RamPageRun):
                for offset, zero, content in run.pages():
                    self.memory[(run.block, offset)] = content * PAGE if zero else content
                    page = offset // PAGE
                    placed[run.block][page // 8] |= 1 << page % 8
        return placed

    def new_channel(self) -> None:
        self.dest.new_channel()
        self.c_reader.new_channel()

    def to_source(self) -> None:
        data = self.dest.data_to_send()
        if data:
            self.rp_sent.append(data)
            self.source.receive_data(data)
            while self.source.next_event() is not NEED_DATA:
                pass

    def pump(self, budget: int = 4 * PAGE) -> None:
        self.to_dest(self.source.data_to_send(budget))
        self.to_source()

    def verify(self) -> None:
        for name, ram in self.ram.items():
            for page in range(len(ram) // PAGE):
                got = self.memory.get((name, page * PAGE))
                assert got == bytes(ram[page * PAGE : (page + 1) * PAGE]), (name, page)


def started_pair() -> Pair:
    pair = Pair()
    source = pair.source
    source.start()
    opening = source.data_to_send(1 << 20)
    while not source.pass_complete:
        opening += source.data_to_send(1 << 20)
    source.sync_dirty("pc.ram", range(0, PAGES, 7))  # changed since sent: discarded
    source.start_postcopy()
    opening += source.data_to_send(0)
    pair.opening = opening
    pair.to_dest(opening)
    pair.to_source()
    assert pair.dest.state is DestinationState.RUNNING
    return pair


def first_missing(pair: Pair) -> int:
    tracker = pair.dest.blocks["pc.ram"]
    return next(page for page in range(PAGES) if not tracker.host_page_present(page * PAGE))


def cut(pair: Pair) -> None:
    pair.source.channel_broken()
    assert pair.dest.channel_broken()
    assert pair.source.state is SourceState.PAUSED
    assert pair.dest.state is DestinationState.PAUSED


def resume(pair: Pair) -> list[str]:
    """The recovery handshake; the names of what went on the new return path."""
    pair.new_channel()
    pair.source.resume()
    assert pair.source.state is SourceState.RECOVER
    names: list[str] = []
    for _ in range(10):
        pair.to_dest(pair.source.data_to_send(0))
        data = pair.dest.data_to_send()
        reader = ReturnPathReader(VERSION)
        reader.feed(data)
        names += [record.name for record in reader]
        pair.source.receive_data(data)
        while pair.source.next_event() is not NEED_DATA:
            pass
        if pair.source.state is SourceState.POSTCOPY:
            break
    return names


def finish(pair: Pair) -> None:
    for _ in range(10_000):
        if pair.dest.state is DestinationState.END:
            break
        pair.pump()
    assert pair.dest.state is DestinationState.END


def test_a_cut_mid_postcopy_pauses_both_ends_and_recovers_every_page() -> None:
    pair = started_pair()
    pair.pump()
    # Half a record on the wire, and a request the cut leaves unanswered.
    more = pair.source.data_to_send(4 * PAGE)
    pair.to_dest(more[: len(more) // 2])
    pair.dest.page_fault("pc.ram", first_missing(pair) * PAGE)
    assert pair.dest.data_to_send()  # sent, but never reaches the source
    cut(pair)
    names = resume(pair)
    assert names == ["RECV_BITMAP", "RECV_BITMAP", "RESUME_ACK", "REQ_PAGES_ID"]
    assert pair.source.state is SourceState.POSTCOPY
    assert pair.dest.state is DestinationState.RUNNING
    assert pair.dest.recoveries == pair.source.stats.recoveries == 1
    # The pending request is served first, in a section whose first record names its block.
    first = pair.source.requested_data()
    assert first[: len(SECTION_PART)] == SECTION_PART
    assert b"\x06pc.ram" in first[len(SECTION_PART) : len(SECTION_PART) + 16]
    pair.to_dest(first)
    finish(pair)
    pair.verify()


def test_two_cuts_and_a_cut_during_the_handshake_still_lose_nothing() -> None:
    pair = started_pair()
    for round_ in range(3):
        for _ in range(3):
            pair.pump(PAGE)
        cut(pair)
        if round_ == 1:  # the new channel breaks after the bitmaps were asked for
            pair.new_channel()
            pair.source.resume()
            pair.to_dest(pair.source.data_to_send(0)[:7])
            cut(pair)
        resume(pair)
    finish(pair)
    pair.verify()
    assert pair.dest.recoveries == 3


def test_faults_while_paused_are_requested_after_the_resume_ack() -> None:
    pair = started_pair()
    pair.pump()
    cut(pair)
    missing = first_missing(pair)
    assert pair.dest.page_fault("pc.ram", missing * PAGE) is None  # nothing to send it on
    assert pair.dest.data_to_send() == b""
    names = resume(pair)
    assert names[-2:] == ["RESUME_ACK", "REQ_PAGES_ID"]
    assert pair.dest.pending_requests() == [("pc.ram", missing * PAGE)]


def bits(pages: list[int], total: int = PAGES) -> bytearray:
    """A bitmap of ``pages`` as the RAM's received map packs it (page i: bit i % 8 of byte
    i // 8)."""
    bitmap = bytearray(-(-total // 8))
    for page in pages:
        bitmap[page // 8] |= 1 << page % 8
    return bitmap


def test_a_request_whose_page_was_placed_elsewhere_is_not_asked_again() -> None:
    pair = started_pair()
    pair.pump()
    cut(pair)
    tracker = pair.dest.blocks["pc.ram"]
    placed, waiting = [p for p in range(PAGES) if not tracker.host_page_present(p * PAGE)][:2]
    pair.dest.page_fault("pc.ram", placed * PAGE)
    pair.dest.page_fault("pc.ram", waiting * PAGE)
    # Placed by the runner's C thread, its record not read by the machine.
    assert pair.dest.pages_placed_elsewhere("pc.ram", bits([placed])) == 1
    names = resume(pair)
    assert names[-2:] == ["RESUME_ACK", "REQ_PAGES_ID"]  # one request, not two
    assert pair.dest.pending_requests() == [("pc.ram", waiting * PAGE)]


def ahead_pages(placed: dict[str, bytearray]) -> dict[str, list[int]]:
    return {
        block: [page for page in range(len(bitmap) * 8) if bitmap[page // 8] >> page % 8 & 1]
        for block, bitmap in placed.items()
    }


def test_pages_placed_ahead_of_the_machine_are_received_in_its_recv_bitmap() -> None:
    """A pause finds pages that the C thread placed as they arrived and the machine had not
    read yet (its reading is behind, and the cut drops the rest). Told of them, it answers
    RECV_BITMAP with them received, as QEMU's receivedmap has them: the source sends only
    what the destination lacks."""
    pair = started_pair()
    pair.pump()
    placed = pair.place_ahead(pair.source.data_to_send(8 * PAGE))
    ahead = ahead_pages(placed)
    assert len(ahead["pc.ram"]) >= 4
    tracker = pair.dest.blocks["pc.ram"]
    assert not any(tracker.state[page] for page in ahead["pc.ram"])  # missing, as it knows
    cut(pair)
    for block, bitmap in placed.items():
        assert pair.dest.pages_placed_elsewhere(block, bitmap) == len(ahead[block])
        assert pair.dest.pages_placed_elsewhere(block, bitmap) == 0  # learned once
    assert resume(pair) == ["RECV_BITMAP", "RECV_BITMAP", "RESUME_ACK"]
    # The bitmaps' complements are the source's new dirty maps: none of those pages.
    for block, pages in ahead.items():
        dirty = pair.source.by_name[block].dirty
        assert not any(dirty[page] for page in pages), block
    received = sum(len(t.state) - bytes(t.state).count(0) for t in pair.dest.blocks.values())
    total = sum(len(ram) // PAGE for ram in pair.ram.values())
    assert pair.source.stats.resent_pages == total - received
    finish(pair)
    pair.verify()  # the pages placed ahead are in memory, though never read by the machine


def test_untold_the_machine_counts_pages_placed_ahead_missing() -> None:
    """What the runner must tell the machine (the test above): its own account of the
    stream has them missing, and the source would send them again."""
    pair = started_pair()
    pair.pump()
    ahead = ahead_pages(pair.place_ahead(pair.source.data_to_send(8 * PAGE)))
    cut(pair)
    resume(pair)
    dirty = pair.source.by_name["pc.ram"].dirty
    assert all(dirty[page] for page in ahead["pc.ram"])


def test_pages_placed_elsewhere_keep_what_the_machine_read_and_ignore_padding() -> None:
    pair = started_pair()
    tracker = pair.dest.blocks["pc.ram"]
    kinds = bytes(tracker.state)
    missing = [p for p in range(PAGES) if not kinds[p]]
    # Every bit set, and the bits of a byte past the block's end (not pages: ignored).
    assert pair.dest.pages_placed_elsewhere("pc.ram", b"\xff" * (PAGES // 8 + 1)) == len(missing)
    assert len(tracker.state) == PAGES
    assert bytes(tracker.state) == bytes(kind or 1 for kind in kinds)  # what it read, kept
    with pytest.raises(LocalProtocolError, match="no RAMBlock 'nope'"):
        pair.dest.pages_placed_elsewhere("nope", b"")


def test_a_cut_before_run_fails_the_destination_and_the_source() -> None:
    pair = Pair()
    pair.source.start()
    pair.to_dest(pair.source.data_to_send(1 << 20))
    assert not pair.dest.channel_broken()
    assert pair.dest.state is DestinationState.FAILED
    with pytest.raises(LocalProtocolError, match="connection broke during pass-complete"):
        pair.source.channel_broken()


def test_recovery_commands_outside_recovery_are_what_qemu_does_with_them() -> None:
    pair = started_pair()
    pair.to_dest(S.build_command(m.RecvBitmap("pc.ram")) + S.build_command(m.PostcopyResume()))
    notices = [e for e in pair.events if isinstance(e, ev.Notice)]
    assert [(n.what, n.detail) for n in notices][-2:] == [
        ("RECV_BITMAP", "MSG_RP_RECV_BITMAP only used for recovery"),
        ("POSTCOPY_RESUME", "illegal resume received"),
    ]
    assert pair.dest.data_to_send() == b""  # neither is answered
    assert pair.dest.state is DestinationState.RUNNING
    with pytest.raises(RemoteProtocolError, match="block 'nope' not found"):
        pair.to_dest(S.build_command(m.RecvBitmap("nope")))


def test_the_source_refuses_a_bitmap_outside_recovery_and_ignores_a_stray_ack() -> None:
    pair = started_pair()
    pair.source.receive_data(S.build_rp(m.ResumeAck(1)))
    assert pair.source.state is SourceState.POSTCOPY
    bitmap = m.RpRecvBitmap("vga.vram", bytes(8))
    with pytest.raises(RemoteProtocolError, match="only used for recovery"):
        pair.source.receive_data(S.build_rp(bitmap))


def test_a_bad_resume_ack_fails_the_source() -> None:
    pair = started_pair()
    cut(pair)
    pair.source.resume()
    with pytest.raises(RemoteProtocolError, match="illegal resume_ack value 2"):
        pair.source.receive_data(S.build_rp(m.ResumeAck(2)))


@pytest.mark.parametrize(
    ("size", "mark", "block", "detail"),
    [
        (8, RECV_BITMAP_END_MARK, "pc.ram", "bitmap size mismatch (0x8 != 0x10)"),
        (bitmap_size(PAGES), RECV_BITMAP_END_MARK, "nope", "invalid block name 'nope'"),
        (1 << 60, RECV_BITMAP_END_MARK, "pc.ram", "bitmap size mismatch"),
        (bitmap_size(PAGES), 0x1234, "pc.ram", "end mark incorrect"),
    ],
)
def test_hostile_bitmaps_are_refused_in_one_line(
    size: int, mark: int, block: str, detail: str
) -> None:
    pair = started_pair()
    cut(pair)
    pair.source.resume()
    message = S.build_rp(m.RpRecvBitmap(block, b""))[:-16]  # the message, no trailer
    body = bytes(min(size, bitmap_size(PAGES)))
    blob = message + size.to_bytes(8, "big") + body + mark.to_bytes(8, "big")
    with pytest.raises(MalformedError) as caught:
        pair.source.receive_data(blob)
    assert detail in caught.value.one_line()
    assert "\n" not in caught.value.one_line()


def test_the_bitmap_is_little_endian_words_and_its_complement_is_dirty() -> None:
    state = bytearray(70)
    for page in (0, 1, 2, 63, 64, 69):
        state[page] = 1
    bitmap = received_bitmap(state, 70)
    assert len(bitmap) == 16
    assert bitmap[:8] == (0x8000000000000007).to_bytes(8, "little")
    assert bitmap[8:] == (0x21).to_bytes(8, "little")
    dirty = missing_pages(bitmap, 70)
    assert [page for page in range(70) if not dirty[page]] == [0, 1, 2, 63, 64, 69]
    # Set padding bits past the block are not pages.
    assert len(missing_pages(b"\xff" * 16, 70)) == 70
    assert received_bitmap(bytearray(), 0) == b""


def test_a_recording_of_two_connections_reads_as_the_destination_did() -> None:
    """The stream bytes of both connections, one after the other (as a capture keeps them,
    the first ending mid-record), read with the reader starting over at the second."""
    import io

    from qmig.capture.connections import NewConnection, split_at
    from qmig.inspect import read_records

    pair = started_pair()
    # Everything the destination got before the cut, and half a record more.
    first = pair.source.data_to_send(4 * PAGE)
    pair.to_dest(first)
    more = pair.source.data_to_send(4 * PAGE)
    cut(pair)
    pair.new_channel()
    pair.source.resume()
    second = pair.source.data_to_send(0)
    recording = pair.opening + first + more[: len(more) // 2] + second
    boundary = len(recording) - len(second)
    names = []
    records = read_records(io.BytesIO(recording), StreamReader(VERSION), boundaries=[boundary])
    with pytest.raises(TruncatedError, match=f"at byte {len(recording)}"):  # it stops there
        for record in records:
            names.append(record.name)
    assert names[-2:] == ["RECV_BITMAP", "RECV_BITMAP"]
    assert "RAM" in names[-6:-2]  # the old connection's last whole records
    pieces = list(split_at([recording[:100], recording[100:]], [boundary]))
    assert NewConnection(boundary) in pieces
    assert b"".join(p for p in pieces if isinstance(p, bytes)) == recording


def test_a_half_received_huge_page_is_dropped_and_asked_for_again() -> None:
    from qmig.protocol.ram_config import RamConfig

    huge = 2 << 20
    ram = bytearray(random.Random(9).randbytes(2 * huge))
    blocks = [
        SourceBlock("pc.ram", len(ram), ram, page_size=huge),
        SourceBlock("pc.rom", 4 * PAGE, bytearray(4 * PAGE)),  # the host's own pages too
    ]
    source = Source(blocks, version=VERSION)
    dest = Destination(VERSION, ram=RamConfig(page_size=huge))
    source.start()
    source.state = SourceState.PASS_COMPLETE  # nothing sent in precopy: all in postcopy
    source.start_postcopy()
    stream = source.data_to_send(0) + source.data_to_send(100 * PAGE)
    dest.receive_data(stream[: -3 * PAGE])  # the first host page, short of its last pages
    events = []
    while isinstance(event := dest.next_event(), ev.Event):
        events.append(event)
    tracker = dest.blocks["pc.ram"]
    assert dest.state is DestinationState.RUNNING and bytes(tracker.state).count(1) > 0
    assert dest.channel_broken()
    assert ev.PartialHostPageDropped("pc.ram", 0) in [dest.next_event()]
    assert bytes(tracker.state).count(1) == 0  # nothing of it counts as received
    assert received_bitmap(tracker.state, 2 * huge // PAGE) == bytes(2 * huge // PAGE // 8)
    # The C thread had all of it, and placed it whole: the machine, told, counts it received.
    per_host = huge // PAGE
    assert dest.pages_placed_elsewhere("pc.ram", b"\xff" * (per_host // 8)) == per_host
    assert tracker.host_page_present(0) and not tracker.host_page_present(huge)
    whole = b"\xff" * (per_host // 8)
    assert received_bitmap(tracker.state, 2 * per_host) == whole + bytes(len(whole))


Action = tuple[str, int]


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("pump"), st.integers(1, 6)),
            st.tuples(st.just("fault"), st.integers(0, PAGES - 1)),
            st.tuples(st.just("cut"), st.integers(0, 99)),  # % of the next chunk delivered
            st.tuples(st.just("cut-handshake"), st.integers(0, 30)),  # bytes of it delivered
            # % of the next chunk the machine reads; the C thread places the rest
            st.tuples(st.just("cut-ahead"), st.integers(0, 99)),
        ),
        max_size=25,
    )
)
@settings(max_examples=60, deadline=None)
def test_any_cuts_anywhere_in_postcopy_lose_nothing(actions: list[Action]) -> None:
    pair = started_pair()
    for kind, value in actions:
        if pair.dest.state is DestinationState.END:
            break
        if kind == "pump":
            pair.pump(value * PAGE)
        elif kind == "fault":
            pair.dest.page_fault("pc.ram", value * PAGE)
            pair.to_source()
        elif kind == "cut":
            chunk = pair.source.data_to_send(4 * PAGE)
            pair.to_dest(chunk[: len(chunk) * value // 100])
            if pair.dest.state is DestinationState.END:
                break  # the whole stream was in it: nothing left to cut
            cut(pair)
            resume(pair)
        elif kind == "cut-ahead":
            chunk = pair.source.data_to_send(4 * PAGE)
            pair.to_dest(chunk[: len(chunk) * value // 100])
            if pair.dest.state is DestinationState.END:
                break
            placed = pair.place_ahead(chunk[len(chunk) * value // 100 :])
            cut(pair)
            for block, bitmap in placed.items():
                pair.dest.pages_placed_elsewhere(block, bitmap)
            resume(pair)
            for block, pages in ahead_pages(placed).items():
                assert not any(pair.source.by_name[block].dirty[page] for page in pages)
        else:
            cut(pair)
            pair.new_channel()
            pair.source.resume()
            pair.to_dest(pair.source.data_to_send(0)[:value])
            cut(pair)
            resume(pair)
    finish(pair)
    pair.verify()
    assert pair.dest.recoveries == pair.source.stats.recoveries
