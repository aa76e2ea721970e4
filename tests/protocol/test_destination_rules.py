"""The destination machine against QEMU's PostcopyState rules, fed bytes directly."""

from __future__ import annotations

import pytest

from qmig.errors import IllegalStateError, LocalProtocolError, MalformedError, RemoteProtocolError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.states import PostcopyState
from qmig.wire import messages as m
from qmig.wire.reader import END, NEED_DATA, ReturnPathReader
from qmig.wire.schema import schema_for

VERSION = "7.2"
S = schema_for(VERSION)
BLOCK = m.RamBlockInfo("pc.ram", 16 * 4096)


def opening(*, return_path: bool = True) -> bytes:
    return S.build_opening(m.Configuration("pc-q35-7.2"), return_path=return_path)


def ram_setup() -> bytes:
    return S.build_ram_setup(2, (BLOCK,))


ADVISE = S.build_command(m.PostcopyAdvise(4096, 4096))
DISCARD = S.build_command(m.PostcopyRamDiscard("pc.ram", (m.DiscardRange(0, 8192),)))
LISTEN = S.build_command(m.PostcopyListen())
RUN = S.build_command(m.PostcopyRun())


def drive(dest: Destination, data: bytes, *, eof: bool = False) -> list[object]:
    dest.receive_data(data)
    if eof:
        dest.receive_eof()
    events = []
    while (event := dest.next_event()) is not NEED_DATA and event is not END:
        events.append(event)
    return events


def rejected(data: bytes, **kwargs: object) -> tuple[RemoteProtocolError, Destination]:
    dest = Destination(VERSION, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError) as caught:
        drive(dest, data)
    return caught.value, dest


ILLEGAL_ORDERS = [
    # (what comes after the opening and the ram setup, rejected command, state it names)
    (ADVISE + ADVISE, "POSTCOPY_ADVISE", "ADVISE"),
    (DISCARD, "POSTCOPY_RAM_DISCARD", "NONE"),
    (ADVISE + LISTEN + DISCARD, "POSTCOPY_RAM_DISCARD", "LISTENING"),
    (LISTEN, "POSTCOPY_LISTEN", "NONE"),
    (ADVISE + LISTEN + LISTEN, "POSTCOPY_LISTEN", "LISTENING"),
    (ADVISE + RUN, "POSTCOPY_RUN", "ADVISE"),
    (ADVISE + DISCARD + RUN, "POSTCOPY_RUN", "DISCARD"),
    (ADVISE + LISTEN + RUN + RUN, "POSTCOPY_RUN", "RUNNING"),
    (ADVISE + LISTEN + ADVISE, "POSTCOPY_ADVISE", "LISTENING"),
    (ADVISE + LISTEN + RUN + LISTEN, "POSTCOPY_LISTEN", "RUNNING"),
]


@pytest.mark.parametrize(
    ("tail", "command", "state"),
    ILLEGAL_ORDERS,
    ids=[f"{command}-in-{state}-{n}" for n, (_, command, state) in enumerate(ILLEGAL_ORDERS)],
)
def test_illegal_command_orders_are_rejected_naming_the_state(
    tail: bytes, command: str, state: str
) -> None:
    prefix = opening() + ram_setup()
    error, dest = rejected(prefix + tail)
    assert isinstance(error, IllegalStateError)
    assert error.what == command
    assert error.detail == f"wrong postcopy state {state}"
    # The offset is where the rejected command starts: the last command of that name.
    record_size = {"POSTCOPY_ADVISE": len(ADVISE), "POSTCOPY_RAM_DISCARD": len(DISCARD)}.get(
        command, 5
    )
    assert error.offset is not None
    assert (prefix + tail)[error.offset] == S.profile.section_types["COMMAND"]
    assert error.offset == len(prefix + tail) - record_size
    assert dest.state is PostcopyState.FAILED
    assert error.one_line().endswith(f"at byte {error.offset}")


def test_a_failed_destination_sends_shut_1_and_refuses_more_input() -> None:
    _, dest = rejected(opening() + ram_setup() + LISTEN)
    reader = ReturnPathReader(VERSION)
    reader.feed(dest.data_to_send())
    reader.feed_eof()
    assert [record.message for record in reader] == [m.Shut(1)]
    with pytest.raises(LocalProtocolError):
        dest.receive_data(b"\x00")


def test_the_legal_order_moves_through_every_state() -> None:
    dest = Destination(VERSION)
    seen = []
    for chunk in (opening() + ram_setup(), ADVISE, DISCARD, LISTEN, RUN, b"\x00"):
        drive(dest, chunk)
        seen.append(dest.state)
    assert seen == [
        PostcopyState.NONE,
        PostcopyState.ADVISE,
        PostcopyState.DISCARD,
        PostcopyState.LISTENING,
        PostcopyState.RUNNING,
        PostcopyState.END,
    ]


def test_discard_is_skipped_when_nothing_was_discarded() -> None:
    dest = Destination(VERSION)
    events = drive(dest, opening() + ram_setup() + ADVISE + LISTEN + RUN + b"\x00")
    assert dest.state is PostcopyState.END
    assert not any(isinstance(event, ev.RangesDiscarded) for event in events)
    assert isinstance(events[-1], ev.MigrationCompleted)


def test_ping_without_a_return_path_is_rejected() -> None:
    error, _ = rejected(opening(return_path=False) + S.build_command(m.Ping(7)))
    assert (error.what, error.detail) == ("PING", "0x7 received with no return path")


def test_ping_is_answered_with_pong() -> None:
    dest = Destination(VERSION)
    drive(dest, opening() + S.build_command(m.Ping(0x42)))
    assert dest.data_to_send() == S.build_rp(m.Pong(0x42))


def test_advise_length_must_match_the_postcopy_ram_setting() -> None:
    error, _ = rejected(opening() + S.build_command(m.PostcopyAdvise()))
    assert error.detail == "RAM postcopy is enabled but have 0 byte advise"
    error, _ = rejected(opening() + ADVISE, postcopy_ram=False)
    assert error.detail == "RAM postcopy is disabled but have 16 byte advise"
    dest = Destination(VERSION, postcopy_ram=False)
    drive(dest, opening() + S.build_command(m.PostcopyAdvise()))
    assert dest.state is PostcopyState.ADVISE


def test_advise_page_sizes_are_checked_as_qemu_orders_them() -> None:
    """The summary first, then the target page size (savevm.c)."""
    error, _ = rejected(opening() + S.build_command(m.PostcopyAdvise(4096, 8192)))
    assert error.detail == "Postcopy needs matching target page sizes (s=8192 d=4096)"
    error, _ = rejected(opening() + S.build_command(m.PostcopyAdvise(8192, 8192)))
    assert error.detail == "Postcopy needs matching RAM page sizes (s=2000 d=1000)"


def test_mem_size_in_postcopy_mode_is_rejected() -> None:
    error, _ = rejected(opening() + ADVISE + LISTEN + ram_setup())
    assert error.what == "RAM"
    assert "(postcopy mode)" in error.detail


def test_eof_while_listening_is_rejected() -> None:
    error, _ = rejected(opening() + ram_setup() + ADVISE + LISTEN + b"\x00")
    assert (error.what, error.state) == ("EOF", "LISTENING")


@pytest.mark.parametrize(
    ("span", "detail"),
    [
        (m.DiscardRange(100, 4096), "not aligned"),
        (m.DiscardRange(0, 4097), "not aligned"),
        (m.DiscardRange(15 * 4096, 2 * 4096), "outside block"),
        (m.DiscardRange((1 << 64) - 4096, 8192), "outside block"),
    ],
)
def test_discard_ranges_are_bounds_checked(span: m.DiscardRange, detail: str) -> None:
    bad = S.build_command(m.PostcopyRamDiscard("pc.ram", (span,)))
    error, _ = rejected(opening() + ram_setup() + ADVISE + bad)
    assert isinstance(error, MalformedError)
    assert detail in error.detail


def test_discard_of_an_unknown_block_is_rejected() -> None:
    bad = S.build_command(m.PostcopyRamDiscard("nope", (m.DiscardRange(0, 4096),)))
    error, _ = rejected(opening() + ram_setup() + ADVISE + bad)
    assert error.detail == "failed to find block 'nope'"


def test_faults_become_req_pages_id_then_req_pages() -> None:
    dest = Destination(VERSION)
    drive(dest, opening() + ram_setup() + ADVISE + LISTEN + RUN)
    first = dest.page_fault("pc.ram", 0x3010)
    again = dest.page_fault("pc.ram", 0x3FFF)
    second = dest.page_fault("pc.ram", 0x5000)
    assert first is not None and second is not None and again is None
    assert first.message == m.ReqPagesId(0x3000, 4096, "pc.ram")
    assert second.message == m.ReqPages(0x5000, 4096)
    assert dest.data_to_send() == S.build_rp(first.message) + S.build_rp(second.message)


def test_a_page_already_received_is_not_requested() -> None:
    dest = Destination(VERSION)
    page = S.build_section(m.SectionPart(2)) + S.build_ram_page(
        m.RamPage("pc.ram", 0x2000, False, b"\x5a" * 4096)
    )
    page += S.build_ram_flag("EOS") + S.build_footer(2)
    drive(dest, opening() + ram_setup() + page + ADVISE + LISTEN + RUN)
    assert dest.page_fault("pc.ram", 0x2000) is None
    assert dest.page_fault("pc.ram", 0x1000) is not None


def test_precopy_only_completes_after_the_vmdescription() -> None:
    dest = Destination(VERSION, postcopy_ram=False)
    eof_and_description = b"\x00" + S.vmdescription.build(m.VmDescription(b'{"devices": []}'))
    events = drive(dest, opening() + ram_setup() + eof_and_description)
    assert isinstance(events[-1], ev.MigrationCompleted)
    assert dest.data_to_send() == S.build_rp(m.Shut(0))


@pytest.mark.parametrize("version", ["2.9", "7.2"])
def test_a_second_listen_is_refused_by_the_state_check_first(version: str) -> None:
    """Both versions check the state first, so a second LISTEN in a stream is refused as in
    the wrong state; 2.9's listen-thread check (reject_second_listen) comes after it."""
    schema = schema_for(version)
    listen = schema.build_command(m.PostcopyListen())
    stream = (
        schema.build_opening(m.Configuration("pc-i440fx-2.9"), return_path=True)
        + schema.build_command(m.PostcopyAdvise(4096, 4096))
        + listen
        + listen
    )
    dest = Destination(version)
    with pytest.raises(IllegalStateError) as caught:
        drive(dest, stream)
    assert (caught.value.detail, caught.value.offset) == (
        "wrong postcopy state LISTENING",
        len(stream) - len(listen),
    )


@pytest.mark.parametrize(("version", "refused"), [("2.9", True), ("7.2", False)])
def test_reject_second_listen_refuses_a_listen_while_a_listen_thread_runs(
    version: str, refused: bool
) -> None:
    """The one way past the state check: QEMU's state went back to ADVISE while its listen
    thread runs (a refused ADVISE on the listen thread stores ADVISE while the main thread
    still reads the package). 2.9/2.10 refuse the LISTEN then; 7.2 starts another thread."""
    schema = schema_for(version)
    dest = Destination(version)
    drive(
        dest,
        schema.build_opening(m.Configuration("pc-i440fx-2.9"))
        + schema.build_command(m.PostcopyAdvise(4096, 4096))
        + schema.build_command(m.PostcopyListen()),
    )
    assert dest.listen_thread_started
    dest.state = PostcopyState.ADVISE  # where the race leaves QEMU's state
    at = dest.reader.offset
    listen = schema.build_command(m.PostcopyListen())
    if not refused:
        drive(dest, listen)
        assert dest.state is PostcopyState.LISTENING
        return
    with pytest.raises(IllegalStateError) as caught:
        drive(dest, listen)
    assert caught.value.one_line() == (f"POSTCOPY_LISTEN: already has a listen thread at byte {at}")
    assert caught.value.state == "ADVISE"
