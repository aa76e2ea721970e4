"""Hostile input: the readers raise only qmig's own errors, promptly, in bounded memory.

Arbitrary bytes, every truncation of a valid stream and mutated valid streams must end in
a record list or a :class:`~qmig.errors.QmigError` (never another exception, never a
hang). Length fields that claim gigabytes must be refused or streamed, not allocated. Each
targeted invalid variant of :mod:`qmig.strategies` must raise ``MalformedError`` naming
the faulty record, at an offset inside it.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.errors import MalformedError, QmigError, RemoteProtocolError, TruncatedError
from qmig.protocol.destination import Destination
from qmig.protocol.source import Source, SourceBlock
from qmig.wire import messages as m
from qmig.wire.profiles import available_versions
from qmig.wire.reader import END, MAX_RECORD, NEED_DATA, Record, ReturnPathReader, StreamReader
from qmig.wire.schema import schema_for

pytestmark = pytest.mark.timeout(120)  # a hang fails here, not after CI's budget

VERSIONS = available_versions()
SLOW = timedelta(seconds=5)
MEMORY_BOUND = 32 << 20  # far below any claimed length, above qmig's 8 MiB record limit
FOUR_GIB = 0xFFFFFFFF

Reader = StreamReader | ReturnPathReader


def read(reader: Reader, data: bytes, chunk: int | None = None) -> list[Record]:
    """Every record of ``data``; checks the reader makes progress on every call."""
    records: list[Record] = []
    chunk = chunk or max(len(data), 1)
    for at in range(0, len(data), chunk):
        reader.feed(data[at : at + chunk])
        _drain(reader, records, len(data))
    reader.feed_eof()
    _drain(reader, records, len(data))
    return records


def _drain(reader: Reader, records: list[Record], size: int) -> None:
    for record in reader:
        records.append(record)
        # Every record but a package's end marker and an empty device state takes a byte.
        assert len(records) <= 2 * size + 8, "the reader is not making progress"


def outcome(reader: Reader, data: bytes, chunk: int | None = None) -> QmigError | None:
    """``None`` if ``data`` reads cleanly, else the QmigError; anything else fails the test."""
    try:
        read(reader, data, chunk)
    except QmigError as error:
        assert error.offset is None or 0 <= error.offset <= len(data)
        assert error.one_line().startswith(f"{error.what}: ")
        return error
    return None


def valid_prefix(version: str) -> bytes:
    schema = schema_for(version)
    return schema.build_opening(m.Configuration("pc-i440fx-7.2"))


# --- arbitrary bytes ----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@given(
    lead=st.sampled_from(["none", "header", "configuration"]),
    body=st.binary(max_size=2048),
    chunk=st.none() | st.integers(1, 64),
)
@settings(deadline=SLOW)
def test_arbitrary_bytes_raise_only_qmig_errors(
    version: str, lead: str, body: bytes, chunk: int | None
) -> None:
    # Behind a valid header (and configuration) the bytes reach the deeper grammar.
    prefix = valid_prefix(version)[: {"none": 0, "header": 8, "configuration": None}[lead]]
    outcome(StreamReader(version), prefix + body, chunk)


@pytest.mark.parametrize("version", VERSIONS)
@given(body=st.binary(max_size=2048), chunk=st.none() | st.integers(1, 64))
@settings(deadline=SLOW)
def test_arbitrary_return_path_bytes_raise_only_qmig_errors(
    version: str, body: bytes, chunk: int | None
) -> None:
    outcome(ReturnPathReader(version), body, chunk)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(deadline=SLOW)
def test_return_path_messages_then_garbage(version: str, data: st.DataObject) -> None:
    schema = schema_for(version)
    # A REQ_PAGES_ID first: a REQ_PAGES among the messages then has a block to refer to.
    sent = [
        data.draw(qs.req_pages_ids()),
        *data.draw(st.lists(qs.return_path_messages(version), max_size=5)),
    ]
    garbage = data.draw(st.binary(max_size=64))
    wire = b"".join(schema.build_rp(message) for message in sent)
    reader = ReturnPathReader(version)
    error = outcome(reader, wire + garbage)
    if error is None:
        # Garbage that happens to be valid messages; the sent ones come first regardless.
        reader = ReturnPathReader(version)
        assert [r.message for r in read(reader, wire)] == sent
    else:
        assert error.offset is not None and error.offset >= len(wire)


# --- truncations --------------------------------------------------------------------------


def _cuts(stream: qs.GeneratedStream) -> list[int]:
    """Every offset except those deep inside page data (all alike to the reader)."""
    records = read(StreamReader(stream.version), stream.data)
    skip: set[int] = set()
    for record in records:
        if isinstance(record.message, m.RamPageRun):
            run = record.message
            for header, body in zip(run.headers, run.bodies, strict=True):
                if header & run.page_flag:
                    skip.update(range(body + 2, body + run.target_page_size - 1))
    return [cut for cut in range(len(stream.data)) if cut not in skip]


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=5, deadline=None)  # hundreds of reads per example
def test_every_truncation_raises_truncated_error(version: str, data: st.DataObject) -> None:
    stream = data.draw(
        qs.postcopy_streams(
            version, max_pages_per_section=2, max_precopy_sections=1, max_postcopy_sections=1
        )
    )
    for cut in _cuts(stream):
        error = outcome(StreamReader(stream.version), stream.data[:cut])
        assert isinstance(error, TruncatedError), (cut, error)
        assert error.offset is not None and error.offset <= cut


# --- mutations ----------------------------------------------------------------------------

INTERESTING = [b"\x00", b"\xff", b"\x7e", b"\x08", b"\x04", b"\xff\xff\xff\xff", b"\x00\x00"]


@st.composite
def mutated(draw: st.DrawFn, version: str) -> bytes:
    stream = draw(qs.postcopy_streams(version, max_pages_per_section=2, max_precopy_sections=1))
    data = bytearray(stream.data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if operation == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            value = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=4))
            data[at : at + len(value)] = value
        elif operation == "insert":
            data[at:at] = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=4))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data(), chunk=st.none() | st.integers(1, 4096))
@settings(max_examples=60, deadline=SLOW)
def test_mutated_streams_raise_only_qmig_errors(
    version: str, data: st.DataObject, chunk: int | None
) -> None:
    outcome(StreamReader(version), data.draw(mutated(version)), chunk)


# --- claimed lengths ----------------------------------------------------------------------


def _peak_while(action: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def _feed_repeatedly(reader: Reader, head: bytes, chunk: bytes, times: int) -> QmigError | None:
    """Feed ``head`` then ``chunk`` ``times`` times, draining as a consumer would."""
    records: list[Record] = []
    try:
        reader.feed(head)
        _drain(reader, records, 1 << 40)
        for _ in range(times):
            reader.feed(chunk)
            _drain(reader, records, 1 << 40)
            records.clear()
        reader.feed_eof()
        _drain(reader, records, 1 << 40)
    except QmigError as error:
        return error
    return None


def _pings(schema: Any, size: int) -> bytes:
    ping = schema.build_command(m.Ping(7))
    return ping * (size // len(ping))


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_a_4gib_package_is_streamed_not_allocated(version: str) -> None:
    schema = schema_for(version)
    head = valid_prefix(version) + schema.build_command(m.Packaged(FOUR_GIB))
    head += _pings(schema, 4096)
    # Inside the package, a RAM section streams 64 MiB of page records through the fast
    # path before the input ends, far before the package does.
    block = m.RamBlockInfo("pc.ram", 1 << 30)
    head += schema.build_section(m.SectionStart(2, "ram", 0, 4))
    head += schema.build_mem_size(m.MemSize(block.used_length, (block,)))
    head += schema.build_ram_page(m.RamPage("pc.ram", 0, True, b"\x00"))
    zero = schema.build_ram_page(m.RamPage(None, 0x1000, True, b"\x00"))
    chunk = zero * ((1 << 20) // len(zero))
    error, peak = _peak_while(lambda: _feed_repeatedly(StreamReader(version), head, chunk, 64))
    assert isinstance(error, TruncatedError)
    assert peak < MEMORY_BOUND


def test_a_package_over_16_mib_is_refused_by_2_9() -> None:
    schema = schema_for("2.9")
    data = valid_prefix("2.9") + schema.build_command(m.Packaged(FOUR_GIB))
    with pytest.raises(MalformedError) as caught:
        read(StreamReader("2.9"), data)
    assert caught.value.what == "PACKAGED"
    assert caught.value.offset == len(valid_prefix("2.9"))


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_a_device_state_with_no_footer_in_a_huge_package_is_bounded(version: str) -> None:
    schema = schema_for(version)
    head = valid_prefix(version) + schema.build_command(m.Packaged(FOUR_GIB))
    head += schema.build_section(m.SectionFull(3, "timer", 0, 1))
    chunk = b"\x00" * (1 << 20)
    error, peak = _peak_while(lambda: _feed_repeatedly(StreamReader(version), head, chunk, 24))
    assert isinstance(error, MalformedError) and error.what.startswith("SECTION_FULL")
    # The reader buffers up to one record's limit while it looks for the footer, and holds a
    # few copies of that buffer; nothing scales with the 4 GiB the package claims.
    assert peak < 8 * MAX_RECORD


def _claims(version: str) -> list[tuple[str, bytes, str]]:
    """(case, bytes, WHAT) for a length field claiming ~4 GiB; bytes end right after it."""
    schema = schema_for(version)
    header = bytes(schema.header.build(m.StreamHeader(3)))
    prefix = valid_prefix(version)
    ram = prefix + schema.build_section(m.SectionStart(2, "ram", 0, 4))
    ram += schema.build_mem_size(m.MemSize(1 << 20, (m.RamBlockInfo("pc.ram", 1 << 20),)))
    page = schema.build_ram_page(m.RamPage("pc.ram", 0, True, b"\x00"))
    flags = schema.profile.ram_flags
    cases = [
        ("configuration name", header + b"\x07" + FOUR_GIB.to_bytes(4, "big"), "CONFIGURATION"),
        ("vmdescription", prefix + b"\x00\x06" + FOUR_GIB.to_bytes(4, "big"), "VMDESCRIPTION"),
        (
            "xbzrle",
            ram
            + page
            + (0x1000 | flags["XBZRLE"] | flags["CONTINUE"]).to_bytes(8, "big")
            # An over-long XBZRLE length must be refused before its data is awaited.
            + b"\x01\xff\xff",
            "RAM",
        ),
        (
            "mem_size total",
            prefix
            + schema.build_section(m.SectionStart(2, "ram", 0, 4))
            + ((U64_PAGES - 1) << 12 | flags["MEM_SIZE"]).to_bytes(8, "big")
            # More one-page blocks than qmig accepts, none adding up to the claimed total.
            + (b"\x03b00" + (1 << 12).to_bytes(8, "big")) * 5000,
            "MEM_SIZE",
        ),
    ]
    if "COMPRESS_PAGE" in flags:
        header_word = 0x1000 | flags["COMPRESS_PAGE"] | flags["CONTINUE"]
        cases.append(
            (
                "compressed page",
                ram + page + header_word.to_bytes(8, "big") + FOUR_GIB.to_bytes(4, "big"),
                "RAM",
            )
        )
    return cases


U64_PAGES = 1 << 52


@pytest.mark.parametrize("version", VERSIONS)
def test_claimed_lengths_are_refused_without_allocating(version: str) -> None:
    for case, data, what in _claims(version):
        error, peak = _peak_while(lambda data=data: outcome(StreamReader(version), data))
        assert isinstance(error, MalformedError), case
        assert not isinstance(error, TruncatedError), (case, error)
        assert error.what == what, (case, error)
        assert peak < MEMORY_BOUND, case


@pytest.mark.parametrize("version", VERSIONS)
def test_a_return_path_length_over_512_is_refused(version: str) -> None:
    schema = schema_for(version)
    number = schema.profile.rp_messages["REQ_PAGES_ID"]
    data = bytes(schema.rp_header.build({"type": number, "len": 0xFFFF}))
    with pytest.raises(MalformedError) as caught:
        read(ReturnPathReader(version), data)
    assert caught.value.what == "REQ_PAGES_ID" and caught.value.offset == 0


# --- targeted invalid variants --------------------------------------------------------------

CAUGHT_VARIANTS = [
    "command_lengths",
    "rp_lengths",
    "overlong_names",
    "wrapping_discards",
    "unknown_commands",
    "unknown_rp_messages",
    "orphan_req_pages",
]


def check_invalid(bad: qs.InvalidStream, version: str) -> None:
    reader: Reader = (
        ReturnPathReader(version) if bad.channel == "return_path" else StreamReader(version)
    )
    with pytest.raises(MalformedError) as caught:
        read(reader, bad.data)
    error = caught.value
    assert error.what == bad.what, (bad.description, error)
    assert error.offset is not None and bad.start <= error.offset < bad.end, (
        bad.description,
        error,
    )


@pytest.mark.parametrize("variant", CAUGHT_VARIANTS)
@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=40, deadline=SLOW)
def test_invalid_variants_are_refused_where_they_are(
    variant: str, version: str, data: st.DataObject
) -> None:
    check_invalid(data.draw(qs.INVALID_STRATEGIES[variant](version)), version)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=40, deadline=SLOW)
def test_empty_names_are_refused_where_they_are(version: str, data: st.DataObject) -> None:
    # The error points at the empty name's length byte, inside the record even when that
    # byte is the record's last (a RECV_BITMAP command of length 1).
    check_invalid(data.draw(qs.invalid_empty_names(version)), version)


# --- variants only the protocol layer can refuse ---------------------------------------------
# The readers only delimit records. Whether a discard range fits its block, or a requested
# block exists, is decided by qmig.protocol's Destination and Source, which know the blocks.
# (A REQ_PAGES with no REQ_PAGES_ID before it is refused by the reader already, and by the
# source on its own too.)


def destination_error(bad: qs.InvalidStream, version: str) -> QmigError:
    destination = Destination(version)
    destination.receive_data(bad.data)
    destination.receive_eof()
    with pytest.raises(QmigError) as caught:
        for _ in range(2 * len(bad.data) + 8):
            if destination.next_event() in (NEED_DATA, END):
                break
    return caught.value


def source_error(bad: qs.InvalidStream, version: str) -> QmigError:
    blocks = [SourceBlock("pc.ram", 1 << 20, bytearray(1 << 20))]
    source = Source(blocks, version=version)
    with pytest.raises(QmigError) as caught:
        source.receive_data(bad.data)
    return caught.value


def check_refused(error: QmigError, bad: qs.InvalidStream) -> None:
    assert isinstance(error, RemoteProtocolError)
    assert error.what == bad.what, (bad.description, error)
    assert error.offset is not None and bad.start <= error.offset < bad.end, (
        bad.description,
        error,
    )


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=30, deadline=SLOW)
def test_discard_ranges_beyond_the_block_are_refused_by_the_destination(
    version: str, data: st.DataObject
) -> None:
    bad = data.draw(qs.invalid_discard_ranges(version))
    error = destination_error(bad, version)
    assert isinstance(error, MalformedError)
    check_refused(error, bad)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=30, deadline=SLOW)
def test_unaligned_discard_ranges_are_refused_by_the_destination(
    version: str, data: st.DataObject
) -> None:
    bad = data.draw(qs.invalid_unaligned_discards(version))
    error = destination_error(bad, version)
    assert isinstance(error, MalformedError)
    check_refused(error, bad)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=30, deadline=SLOW)
def test_req_pages_without_a_previous_block_is_refused_by_the_source(
    version: str, data: st.DataObject
) -> None:
    bad = data.draw(qs.invalid_orphan_req_pages(version))
    check_refused(source_error(bad, version), bad)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
@settings(max_examples=10, deadline=SLOW)
def test_an_empty_requested_block_is_refused_by_the_source(
    version: str, data: st.DataObject
) -> None:
    bad = data.draw(qs.invalid_empty_rp_names(version, ["REQ_PAGES_ID"]))
    check_refused(source_error(bad, version), bad)


# --- the bitmap after RP RECV_BITMAP: outside the message's length, so bounded by qmig ---------


def test_a_recv_bitmap_claiming_a_huge_bitmap_is_refused_at_its_size() -> None:
    schema = schema_for("7.2")
    message = schema.build_rp(m.RpRecvBitmap("pc.ram"))[:11]  # the message, without a bitmap
    data = message + (0xFFFF_FFFF_FFFF_FFF8).to_bytes(8, "big")
    error = outcome(ReturnPathReader("7.2"), data)
    assert isinstance(error, MalformedError) and error.what == "RECV_BITMAP"
    assert error.offset == len(message) and "limit" in error.detail


def test_a_recv_bitmap_cut_short_is_truncated_not_malformed() -> None:
    schema = schema_for("7.2")
    whole = schema.build_rp(m.RpRecvBitmap("pc.ram", bytes(16)))
    for cut in range(4, len(whole)):  # from the first byte past the message header
        error = outcome(ReturnPathReader("7.2"), whole[:cut])
        assert isinstance(error, TruncatedError) and error.what == "RECV_BITMAP", (cut, error)
    assert [r.message for r in read(ReturnPathReader("7.2"), whole, chunk=3)] == [
        m.RpRecvBitmap("pc.ram", bytes(16))
    ]
