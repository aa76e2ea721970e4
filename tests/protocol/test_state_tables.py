"""The transition tables drive both machines: every (state, input) pair of each table, walked.

Each pair starts a fresh machine in the state (placed there directly), applies the input
the way it really arrives (stream bytes, a return-path message, a runner's call) and checks
what the table says: an allowed input leads to its next state; an ignored one leaves the
state and is reported as a notice; any other is refused with one error naming the state, a
RemoteProtocolError when the peer sent it and a LocalProtocolError when qmig was asked.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qmig.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.source import Source, SourceBlock
from qmig.protocol.states import (
    DESTINATION_STOPS_READING,
    LOCAL_SOURCE_INPUTS,
    SOURCE_STOPS_READING,
    DestinationInput,
    DestinationState,
    Ignored,
    Refused,
    SourceInput,
    SourceState,
    destination_refusal,
    destination_rules,
    source_refusal,
    source_table,
)
from qmig.wire import messages as m
from qmig.wire.reader import NEED_DATA
from qmig.wire.schema import Schema, schema_for

VERSION = "7.2"
S = schema_for(VERSION)
PAGE = 4096
BLOCK = m.RamBlockInfo("pc.ram", 16 * PAGE)
TABLE = destination_rules(S.profile).table
VERSIONS = ("2.9", "7.2", "10.0")

# --- the destination --------------------------------------------------------------------


def opening(schema: Schema) -> bytes:
    return schema.build_opening(
        m.Configuration("pc-i440fx-2.9"), return_path=True
    ) + schema.build_ram_setup(2, (BLOCK,))


def input_bytes(schema: Schema, action: DestinationInput) -> bytes:
    match action:
        case DestinationInput.ADVISE:
            return schema.build_command(m.PostcopyAdvise(PAGE, PAGE))
        case DestinationInput.RAM_DISCARD:
            ranges = (m.DiscardRange(0, 2 * PAGE),)
            return schema.build_command(m.PostcopyRamDiscard("pc.ram", ranges))
        case DestinationInput.LISTEN:
            return schema.build_command(m.PostcopyListen())
        case DestinationInput.RUN:
            return schema.build_command(m.PostcopyRun())
        case DestinationInput.EOF:
            return schema.eof.build(m.Eof())
        case DestinationInput.VMDESCRIPTION:
            return schema.vmdescription.build(m.VmDescription(b"{}"))
        case DestinationInput.RECV_BITMAP:
            return schema.build_command(m.RecvBitmap("pc.ram"))
        case DestinationInput.RESUME:
            return schema.build_command(m.PostcopyResume())
        case _:  # the runner's calls, not bytes
            raise AssertionError(action)


# The runner's calls (the others arrive as stream bytes).
CALLS = (DestinationInput.CHANNEL_BROKEN, DestinationInput.NEW_CHANNEL)


RECOVERY_COMMANDS = (DestinationInput.RECV_BITMAP, DestinationInput.RESUME)
DESTINATION_PAIRS = [
    (version, state, action)
    for version in VERSIONS
    for state in DestinationState
    for action in DestinationInput
    # 2.9 has no recovery commands (it reads them as unknown commands)
    if action not in RECOVERY_COMMANDS or action.value in schema_for(version).profile.commands
]


def destination_in(version: str, state: DestinationState) -> Destination:
    dest = Destination(version)
    schema = dest.reader.schema
    dest.receive_data(opening(schema))
    while dest.next_event() is not NEED_DATA:
        pass
    if state is DestinationState.EOF_READ:
        # The reader, too, must have seen the EOF (it reads a VMDESCRIPTION next).
        dest.receive_data(input_bytes(schema, DestinationInput.EOF))
        while dest.next_event() is not NEED_DATA:
            pass
    dest.state = state
    return dest


@pytest.mark.parametrize(
    ("version", "state", "action"),
    DESTINATION_PAIRS,
    ids=[f"{v}-{s.name}-{a.name}" for v, s, a in DESTINATION_PAIRS],
)
def test_destination_does_what_its_table_says(
    version: str, state: DestinationState, action: DestinationInput
) -> None:
    dest = destination_in(version, state)
    entry = dest.rules.table[state].get(action)
    if action in CALLS:
        check_call(dest, state, action, entry)
        return
    data = input_bytes(dest.reader.schema, action)
    at = dest.reader.offset
    if state is DestinationState.PAUSED:
        with pytest.raises(LocalProtocolError, match="paused"):  # no channel to read
            dest.receive_data(data)
        return
    if state is DestinationState.FAILED:
        assert entry is None  # nothing is legal after a failure, and the runner is told so
        with pytest.raises(LocalProtocolError, match="state FAILED"):
            dest.receive_data(data)
        return
    dest.receive_data(data)
    if state is DestinationState.EOF_READ:
        dest.receive_eof()  # what follows a precopy EOF is read up to the end of input
    if state in DESTINATION_STOPS_READING:
        assert dest.next_event() is not NEED_DATA and dest.state is state  # never read
        return
    if isinstance(entry, Ignored):
        events = []
        while isinstance(event := dest.next_event(), ev.Event):
            events.append(event)
        assert dest.state is state
        assert ev.Notice(action.value, entry.reason, at) in events
        assert dest.data_to_send() == b""  # not answered
        return
    if isinstance(entry, DestinationState):
        events = []
        while isinstance(event := dest.next_event(), ev.Event):
            events.append(event)
        assert dest.state is entry
        assert any(isinstance(e, ev.MigrationCompleted) for e in events) == (
            entry is DestinationState.END
        )
        return
    with pytest.raises(RemoteProtocolError) as caught:
        while isinstance(dest.next_event(), ev.Event):
            pass
    error = caught.value
    assert (error.state, error.offset) == (state.name, at)
    assert dest.state is DestinationState.FAILED
    # What QEMU's state is left at: commands that store theirs before the check leave it.
    assert dest.state_before_failure is dest.rules.sets_before_check.get(action, state)
    if action is not DestinationInput.VMDESCRIPTION:  # elsewhere an unknown section type
        reason = entry.reason if isinstance(entry, Refused) else destination_refusal(state)
        assert (error.what, error.detail) == (action.value, reason)
    assert "\n" not in error.one_line()


def check_call(
    dest: Destination, state: DestinationState, action: DestinationInput, entry: object
) -> None:
    if state is DestinationState.FAILED:
        with pytest.raises(LocalProtocolError, match="state FAILED"):
            dest.channel_broken()
        return
    if action is DestinationInput.NEW_CHANNEL:
        if entry is None:
            with pytest.raises(LocalProtocolError, match=f"state {state.name}"):
                dest.new_channel()
            assert dest.state is state
        else:
            dest.new_channel()
            assert dest.state is entry
        return
    paused = dest.channel_broken()
    assert paused == (entry is DestinationState.PAUSED)
    if entry is DestinationState.PAUSED:
        assert dest.state is DestinationState.PAUSED
    elif entry is None and state is not DestinationState.END:
        assert dest.state is DestinationState.FAILED  # before RUN a broken channel fails


def test_every_destination_state_has_a_row() -> None:
    assert set(TABLE) == set(DestinationState)
    # Only a running guest pauses; a recovery's new channel can break again.
    pausing = {s for s, row in TABLE.items() if row.get(DestinationInput.CHANNEL_BROKEN)}
    assert pausing - {DestinationState.EOF_READ} == {
        DestinationState.RUNNING,
        DestinationState.PAUSED,
        DestinationState.RECOVER,
    }
    # QEMU's PostcopyState values, as its messages print them.
    assert [int(s) for s in DestinationState][:6] == [0, 1, 2, 3, 4, 5]


# --- the source -------------------------------------------------------------------------

SOURCE_TABLE = source_table()


def make_source() -> Source:
    return Source([SourceBlock("pc.ram", 8 * PAGE, bytearray(8 * PAGE))], version=VERSION)


def source_in(state: SourceState) -> Source:
    source = make_source()
    if state is not SourceState.IDLE:
        source.start()
        source.data_to_send()
    while source.next_event() is not NEED_DATA:
        pass
    source.state = state
    source._postcopy_started = state is SourceState.COMPLETING  # a postcopy completion
    return source


SOURCE_ACTIONS: dict[SourceInput, Callable[[Source], object]] = {
    SourceInput.START: Source.start,
    SourceInput.SYNC_DIRTY: lambda source: source.sync_dirty("pc.ram", [1]),
    SourceInput.BEGIN_PASS: Source.begin_pass,
    SourceInput.START_POSTCOPY: Source.start_postcopy,
    SourceInput.COMPLETE_PRECOPY: Source.complete_precopy,
    # The machine's own progress: it makes these inputs itself, through the same gate.
    SourceInput.PASS_SENT: lambda source: source._move(SourceInput.PASS_SENT),
    SourceInput.STREAM_SENT: lambda source: source._move(SourceInput.STREAM_SENT),
    SourceInput.NO_RETURN_PATH: lambda source: source._move(SourceInput.NO_RETURN_PATH),
    SourceInput.REQUEST: lambda source: source.receive_data(
        S.build_rp(m.ReqPagesId(0, PAGE, "pc.ram"))
    ),
    SourceInput.SHUT: lambda source: source.receive_data(S.build_rp(m.Shut(0))),
    SourceInput.RETURN_PATH_CLOSED: Source.receive_eof,
    SourceInput.CHANNEL_BROKEN: Source.channel_broken,
    SourceInput.RESUME: Source.resume,
    SourceInput.RECV_BITMAP: lambda source: source.receive_data(
        S.build_rp(m.RpRecvBitmap("pc.ram", bytes(8)))
    ),
    SourceInput.RESUME_ACK: lambda source: source.receive_data(S.build_rp(m.ResumeAck(1))),
}
SOURCE_PAIRS = [(state, action) for state in SourceState for action in SourceInput]


@pytest.mark.parametrize(
    ("state", "action"), SOURCE_PAIRS, ids=[f"{s.name}-{a.name}" for s, a in SOURCE_PAIRS]
)
def test_source_does_what_its_table_says(state: SourceState, action: SourceInput) -> None:
    source = source_in(state)
    entry = SOURCE_TABLE[state].get(action)
    remote = action not in LOCAL_SOURCE_INPUTS
    if remote and state in SOURCE_STOPS_READING:
        if action is SourceInput.RETURN_PATH_CLOSED:
            assert entry is state
        SOURCE_ACTIONS[action](source)
        assert source.state is state and source.next_event() is NEED_DATA  # never read
        return
    if isinstance(entry, Ignored):
        SOURCE_ACTIONS[action](source)
        assert source.state is state
        assert source.next_event() == ev.Notice(action.value, entry.reason, 0)
        return
    if isinstance(entry, SourceState):
        SOURCE_ACTIONS[action](source)
        assert source.state is entry
        changes = []
        while isinstance(event := source.next_event(), ev.Event):
            if isinstance(event, ev.PhaseChanged):
                changes.append((event.old, event.new))
        assert changes == ([] if entry is state else [(state, entry)])
        return
    expected: type[ProtocolError] = RemoteProtocolError if remote else LocalProtocolError
    with pytest.raises(ProtocolError) as caught:
        SOURCE_ACTIONS[action](source)
    error = caught.value
    assert type(error) is expected
    reason = entry.reason if isinstance(entry, Refused) else source_refusal(state, action)
    if isinstance(error, RemoteProtocolError):
        assert (error.state, error.detail) == (state.value, reason)
        assert source.state is SourceState.FAILED
    else:
        assert error.detail == f"{reason} (state {state.value})"
        assert source.state is state  # a refused call changes nothing
    assert "\n" not in error.one_line()


def test_every_source_state_has_a_row() -> None:
    assert set(SOURCE_TABLE) == set(SourceState)
    pausing = {s for s, row in SOURCE_TABLE.items() if row.get(SourceInput.CHANNEL_BROKEN)}
    assert pausing == {
        SourceState.POSTCOPY,
        SourceState.COMPLETING,
        SourceState.PAUSED,
        SourceState.RECOVER,
    }


def test_source_reports_each_change_of_state_and_each_pass() -> None:
    source = make_source()
    source.start()
    source.data_to_send(1 << 20)
    source.begin_pass()
    source.sync_dirty("pc.ram", [3])
    source.data_to_send(1 << 20)
    source.start_postcopy()
    events = []
    while (event := source.next_event()) is not NEED_DATA:
        events.append(event)
    P = SourceState
    assert events == [
        ev.PhaseChanged(P.IDLE, P.PRECOPY),
        ev.PhaseChanged(P.PRECOPY, P.PASS_COMPLETE),
        ev.PassCompleted(1),
        ev.PhaseChanged(P.PASS_COMPLETE, P.PRECOPY),
        ev.PhaseChanged(P.PRECOPY, P.PASS_COMPLETE),
        ev.PassCompleted(2),
        ev.PhaseChanged(P.PASS_COMPLETE, P.POSTCOPY),
    ]
