"""The POSTCOPY_RAM_DISCARD fast path decodes exactly what the schema decodes.

``DiscardReader`` takes well-formed discard commands without construct and declines the
rest. A stream holding a discard command, intact or damaged in any of its fields (section
type, command number, length, version, name length, terminator, ranges cut short, bytes
cut off the end; inside a PACKAGED or not; fed whole or in pieces), must read to the same
records, or fail with the same error (class, field, message and offset), whether the fast
path is on or off. The destination then validates and applies the ranges with one C call
(``apply_to_state``): it must accept, reject (same message, same offset) and mark pages
exactly as the per-range rules it replaces.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reading import Outcome, assert_same, read_outcome

from qmig.errors import MalformedError, QmigError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.source import Source, SourceBlock
from qmig.wire import messages as m
from qmig.wire.discard import DiscardRanges, apply_to_state
from qmig.wire.profiles import available_versions
from qmig.wire.reader import NEED_DATA, StreamReader
from qmig.wire.schema import schema_for

VERSIONS = available_versions()
SLOW = timedelta(seconds=5)
PAGE = 4096

u64 = st.integers(0, (1 << 64) - 1)
ranges = st.lists(st.builds(m.DiscardRange, u64, u64), max_size=14)
names = st.binary(min_size=1, max_size=12).map(lambda raw: raw.decode("latin-1"))


def prefix(version: str) -> bytes:
    schema = schema_for(version)
    return schema.build_opening(m.Configuration("pc-i440fx-7.2"))


def read(data: bytes, *, fast: bool, version: str, chunk: int) -> Outcome:
    """The records of ``data`` up to the error, if any; with the discard fast path on or off."""
    reader = StreamReader(version)
    reader._discards.enabled = fast
    return read_outcome(reader, data, chunk)


def same(a: Outcome, b: Outcome) -> None:
    assert_same(a, b)
    for x, y in zip(a[0], b[0], strict=True):
        if isinstance(x.message, m.PostcopyRamDiscard):
            assert tuple(x.message.ranges) == tuple(y.message.ranges)
            assert hash(x.message) == hash(y.message)


@st.composite
def damaged_discards(draw: st.DrawFn, version: str) -> bytes:
    """A discard command, intact or with one field damaged, and what may follow it."""
    schema = schema_for(version)
    command = bytearray(
        schema.build_command(m.PostcopyRamDiscard(draw(names), tuple(draw(ranges))))
    )
    name_length = command[6]
    damage = draw(
        st.sampled_from(
            ["none", "type", "cmd", "len", "version", "name_length", "terminator", "cut", "byte"]
        )
    )
    if damage == "type":
        command[0] = draw(st.integers(0, 255))
    elif damage == "cmd":
        command[1:3] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    elif damage == "len":
        length = int.from_bytes(command[3:5], "big") + draw(st.integers(-40, 40))
        command[3:5] = (length & 0xFFFF).to_bytes(2, "big")
    elif damage == "version":
        command[5] = draw(st.integers(0, 255))
    elif damage == "name_length":
        command[6] = draw(st.sampled_from([0, name_length - 1, name_length + 1, 255]))
    elif damage == "terminator":
        command[7 + name_length] = draw(st.integers(1, 255))
    elif damage == "cut":
        del command[draw(st.integers(0, len(command) - 1)) :]
    elif damage == "byte":
        command[draw(st.integers(0, len(command) - 1))] = draw(st.integers(0, 255))
    follow = draw(st.sampled_from([b"", schema.build_command(m.Ping(7)), b"\x00\x00"]))
    return bytes(command) + follow


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data(), packaged=st.booleans(), chunk=st.integers(1, 600))
@settings(deadline=SLOW, max_examples=300)
def test_fast_path_reads_as_the_schema_does(
    version: str, data: st.DataObject, packaged: bool, chunk: int
) -> None:
    schema = schema_for(version)
    body = data.draw(damaged_discards(version))
    if packaged:
        slack = data.draw(st.integers(-8, 8))
        body = schema.build_command(m.Packaged(max(0, len(body) + slack))) + body
    stream = prefix(version) + body
    fast = read(stream, fast=True, version=version, chunk=chunk)
    same(fast, read(stream, fast=False, version=version, chunk=chunk))
    whole = read(stream, fast=True, version=version, chunk=len(stream))
    same(whole, read(stream, fast=False, version=version, chunk=len(stream)))


@pytest.mark.parametrize("version", VERSIONS)
@given(block=names, spans=ranges)
@settings(deadline=SLOW)
def test_intact_commands_take_the_fast_path(
    version: str, block: str, spans: list[m.DiscardRange]
) -> None:
    schema = schema_for(version)
    command = schema.build_command(m.PostcopyRamDiscard(block, tuple(spans)))
    length = int.from_bytes(command[3:5], "big")
    if not schema.profile.command_lengths["POSTCOPY_RAM_DISCARD"].allows(length):
        return
    reader = StreamReader(version)
    decoded = reader._discards.read(memoryview(command), 0, len(command))
    assert decoded is not None
    message, size = decoded
    assert size == len(command)
    assert isinstance(message.ranges, DiscardRanges)
    assert message == m.PostcopyRamDiscard(block, tuple(spans))
    assert list(message.ranges) == spans
    assert [message.ranges[i] for i in range(-len(spans), len(spans))] == spans + spans


def test_discard_ranges_equal_their_tuples() -> None:
    spans = (m.DiscardRange(0, PAGE), m.DiscardRange(5 * PAGE, 2 * PAGE))
    packed = DiscardRanges.of(spans)
    assert packed == spans and spans == packed and packed == list(spans)
    assert hash(packed) == hash(spans)
    assert DiscardRanges.of(packed) is packed
    assert packed[1:] == spans[1:]
    assert packed != spans[:1]
    with pytest.raises(IndexError):
        packed[2]
    with pytest.raises(ValueError):
        DiscardRanges(b"\x00" * 15)


# --- the destination's batch, against the per-range rules it replaces --------------------


def reference(
    spans: list[m.DiscardRange], page_size: int, used: int, offset: int, block: str
) -> tuple[str, int] | None:
    """The per-range checks the destination made before (first failing range wins)."""
    for index, span in enumerate(spans):
        at = offset + 5 + 3 + len(block) + 16 * index
        if span.start % page_size or span.length % page_size:
            return "aligned", at
        if span.start + span.length > used:
            return "outside", at
    return None


BLOCK_PAGES = 64

near_block = st.builds(
    m.DiscardRange,
    st.integers(0, BLOCK_PAGES + 2).map(lambda p: p * PAGE)
    | st.integers(0, (BLOCK_PAGES + 2) * PAGE)
    | st.just((1 << 64) - PAGE),
    st.integers(0, 4).map(lambda p: p * PAGE) | st.integers(0, 3 * PAGE) | st.just(1 << 63),
)


@given(spans=st.lists(near_block, min_size=1, max_size=12))
@settings(deadline=SLOW)
def test_apply_to_state_matches_the_per_range_rules(spans: list[m.DiscardRange]) -> None:
    used = BLOCK_PAGES * PAGE
    state = bytearray(b"\x01") * BLOCK_PAGES
    bad, cleared = apply_to_state(DiscardRanges.of(spans), PAGE, used, PAGE, state)
    expected = reference(spans, PAGE, used, 0, "b")
    if expected is not None:
        assert bad is not None and cleared == 0
        assert state == bytearray(b"\x01") * BLOCK_PAGES  # nothing changed
        assert 5 + 3 + 1 + 16 * bad == expected[1]
        return
    assert bad is None
    want = bytearray(b"\x01") * BLOCK_PAGES
    for span in spans:
        want[span.start // PAGE : (span.start + span.length) // PAGE] = bytes(span.length // PAGE)
    assert state == want
    assert cleared == sum(span.length // PAGE for span in spans)


def _destination_upto_discards(version: str) -> tuple[Destination, bytes]:
    source = Source(
        [SourceBlock("pc.ram", BLOCK_PAGES * PAGE, bytearray(BLOCK_PAGES * PAGE))],
        version=version,
    )
    source.start()
    stream = source.data_to_send(1 << 20)
    while not source.pass_complete:
        stream += source.data_to_send(1 << 20)
    return Destination(version), stream


@pytest.mark.parametrize("version", VERSIONS)
@given(spans=st.lists(near_block, min_size=1, max_size=12), fast=st.booleans())
@settings(deadline=SLOW)
def test_destination_discards_as_the_per_range_rules_say(
    version: str, spans: list[m.DiscardRange], fast: bool
) -> None:
    dest, stream = _destination_upto_discards(version)
    dest.reader._discards.enabled = fast
    command = dest.reader.schema.build_command(m.PostcopyRamDiscard("pc.ram", tuple(spans)))
    length = int.from_bytes(command[3:5], "big")
    if not dest.profile.command_lengths["POSTCOPY_RAM_DISCARD"].allows(length):
        return
    dest.receive_data(stream)
    while dest.next_event() is not NEED_DATA:
        pass
    offset = dest.reader.offset
    tracker = dest.blocks["pc.ram"]
    before = bytes(tracker.state)
    dest.receive_data(command)
    expected = reference(spans, tracker.page_size, tracker.info.used_length, offset, "pc.ram")
    if expected is not None:
        with pytest.raises(MalformedError) as caught:
            dest.next_event()
        assert caught.value.what == "POSTCOPY_RAM_DISCARD"
        assert expected[0] in caught.value.detail
        assert caught.value.offset == expected[1]
        assert bytes(tracker.state) == before
        return
    events = []
    while (event := dest.next_event()) is not NEED_DATA:
        events.append(event)
    nonempty = [span for span in spans if span.length]
    assert [e for e in events if isinstance(e, ev.RangesDiscarded)] == (
        [ev.RangesDiscarded("pc.ram", DiscardRanges.of(spans))] if spans else []
    )
    assert tracker.discarded_pages == sum(span.length // PAGE for span in nonempty)
    for span in nonempty:
        first = span.start // PAGE
        assert tracker.state[first : first + span.length // PAGE] == bytes(span.length // PAGE)


# --- a run of commands read as one record, against the commands one by one ---------------


def _discard_outcome(
    version: str, commands: bytes, coalesce: bool, chunk: int
) -> tuple[list[tuple[str, bytes]], bytes, int, tuple[str, str, int | None] | None]:
    """What a destination makes of ``commands``: the ranges discarded per block, in order
    (events merged per block, as the runner merges them), its tracker's state, the pages it
    counted; or, when one is bad, only its error (what, detail, offset): the migration fails
    there, whatever came before."""
    dest, stream = _destination_upto_discards(version)
    dest.reader.coalesce_discards = coalesce
    dest.receive_data(stream)
    while dest.next_event() is not NEED_DATA:
        pass
    discarded: list[tuple[str, bytes]] = []
    error = None
    try:
        for at in range(0, len(commands), chunk):
            dest.receive_data(commands[at : at + chunk])
            while (event := dest.next_event()) is not NEED_DATA:
                if isinstance(event, ev.RangesDiscarded):
                    if discarded and discarded[-1][0] == event.block:
                        discarded[-1] = (event.block, discarded[-1][1] + event.ranges.packed)
                    else:
                        discarded.append((event.block, event.ranges.packed))
    except QmigError as caught:
        return [], b"", 0, (caught.what, caught.detail, caught.offset)
    tracker = dest.blocks["pc.ram"]
    return discarded, bytes(tracker.state), tracker.discarded_pages, error


@pytest.mark.parametrize("version", VERSIONS)
@given(
    batches=st.lists(st.lists(near_block, min_size=1, max_size=12), min_size=1, max_size=8),
    other=st.sampled_from(["none", "unknown block", "ping"]),
    chunk=st.sampled_from([7, 100, 1 << 20]),
)
@settings(deadline=SLOW, max_examples=150)
def test_a_run_of_discards_read_as_one_does_what_each_would(
    version: str, batches: list[list[m.DiscardRange]], other: str, chunk: int
) -> None:
    schema = schema_for(version)
    rule = schema.profile.command_lengths["POSTCOPY_RAM_DISCARD"]
    commands = [schema.build_command(m.PostcopyRamDiscard("pc.ram", tuple(b))) for b in batches]
    if not all(rule.allows(int.from_bytes(c[3:5], "big")) for c in commands):
        return
    if other == "unknown block":  # a command of another block ends the run
        commands.insert(len(commands) // 2, schema.build_command(
            m.PostcopyRamDiscard("nope", (m.DiscardRange(0, PAGE),))
        ))  # fmt: skip
    elif other == "ping":
        commands.insert(len(commands) // 2, schema.build_command(m.Ping(3)))
    stream = b"".join(commands)
    one_by_one = _discard_outcome(version, stream, coalesce=False, chunk=chunk)
    assert _discard_outcome(version, stream, coalesce=True, chunk=chunk) == one_by_one


def test_consecutive_discards_of_a_block_are_one_record() -> None:
    schema = schema_for("7.2")
    spans = [(m.DiscardRange(k * PAGE, PAGE),) for k in range(0, 20, 2)]
    first = [schema.build_command(m.PostcopyRamDiscard("pc.ram", s)) for s in spans[:6]]
    then = [schema.build_command(m.PostcopyRamDiscard("vga", s)) for s in spans[6:]]
    data = b"".join(first + then)
    reader = StreamReader("7.2")
    reader.coalesce_discards = True
    found = reader._discards.read(memoryview(data), 0, len(data))
    assert found is not None
    run, size = reader._discards.read_run(memoryview(data), 0, len(data), found)
    assert isinstance(run, m.PostcopyRamDiscards) and size == sum(map(len, first))
    assert run.block == "pc.ram" and list(run.ranges) == [s[0] for s in spans[:6]]
    assert run.commands == tuple((sum(map(len, first[:k])), 1) for k in range(6))
