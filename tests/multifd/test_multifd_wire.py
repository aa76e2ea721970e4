"""Multifd handshakes and packets: round trips through the schemas and the incremental reader,
and one error line (offset and field) for each hostile field."""

from __future__ import annotations

import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.errors import MalformedError, QmigError, TruncatedError
from qmig.wire.multifd import MultifdInit, MultifdPacketHeader, multifd_schema
from qmig.wire.multifd_reader import DeviceState, Handshake, MultifdChannelReader, Packet
from qmig.wire.reading.records import END, NEED_DATA

PAGE = 4096
UUID = bytes(range(16))


def read_all(version: str, data: bytes, step: int = 0, **kwargs: object) -> list[object]:
    reader = MultifdChannelReader(version, **kwargs)  # type: ignore[arg-type]
    events: list[object] = []
    for i in range(0, len(data), step or len(data) or 1):
        reader.feed(data[i : i + (step or len(data))])
        events.extend(reader)
    reader.feed_eof()
    events.extend(reader)
    assert reader.next_event() is END
    return events


def packet(version: str, **fields: object) -> MultifdPacketHeader:
    base: dict[str, object] = dict(
        flags=0,
        pages_alloc=128,
        normal_pages=1,
        next_packet_size=PAGE,
        packet_num=1,
        zero_pages=0,
        ramblock="pc.ram",
    )
    base.update(fields)
    return MultifdPacketHeader(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_sizes_are_qemus(version: str) -> None:
    schema = multifd_schema(version)
    assert (schema.init_size, schema.packet_size) == (64, 320)
    # the offset array always has room for a full packet: 512 KiB of 4 KiB pages
    assert schema.packet_len(PAGE) == 320 + 8 * 128


def test_no_multifd_in_2_9_is_one_line() -> None:
    with pytest.raises(QmigError, match=r"QEMU 2\.9 has no multifd format"):
        multifd_schema("2.9")


@settings(max_examples=40, deadline=None)
@given(version=st.sampled_from(["7.2", "10.0"]), data=st.data())
def test_channel_round_trip_in_any_pieces(version: str, data: st.DataObject) -> None:
    channel = data.draw(qs.multifd_channels(version))
    step = data.draw(st.integers(1, 5000))
    events = read_all(version, channel.data, step)
    assert isinstance(events[0], Handshake) and events[0].init == channel.init
    packets = events[1:]
    assert len(packets) == len(channel.packets)
    for got, sent in zip(packets, channel.packets, strict=True):
        assert isinstance(got, Packet)
        assert got.header == sent.header and got.offsets == sent.offsets
        assert got.pages == sent.pages
    # every byte is in one event
    assert sum(e.size for e in events) == len(channel.data)  # type: ignore[attr-defined]


@settings(max_examples=30, deadline=None)
@given(version=st.sampled_from(["7.2", "10.0"]), data=st.data())
def test_zlib_packet_round_trip(version: str, data: st.DataObject) -> None:
    wire = data.draw(qs.multifd_packets(version, method="ZLIB"))
    schema = multifd_schema(version)
    init = schema.build_init(MultifdInit(UUID, 0))
    events = read_all(version, init + wire.data)
    got = events[1]
    assert isinstance(got, Packet) and got.method == "ZLIB" and got.pages == wire.pages


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_zstd_stream_spans_packets(version: str) -> None:
    # One zstd stream per channel, flushed (not ended) after each packet's pages.
    schema = multifd_schema(version)
    compressor = zstandard.ZstdCompressor().compressobj()
    data = schema.build_init(MultifdInit(UUID, 1))
    pages = [bytes([n]) * PAGE for n in range(1, 4)]
    for n, page in enumerate(pages):
        payload = compressor.compress(page) + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        header = packet(version, flags=4, next_packet_size=len(payload), packet_num=n)
        data += schema.build_packet(header, [n * PAGE]) + payload
    events = read_all(version, data, 7)
    assert [e.pages for e in events[1:]] == [(page,) for page in pages]  # type: ignore[attr-defined]


def test_10_0_zero_pages_and_sync_and_device_state() -> None:
    schema = multifd_schema("10.0")
    data = schema.build_init(MultifdInit(UUID, 0))
    data += schema.build_packet(packet("10.0", zero_pages=2), [0, PAGE, 2 * PAGE]) + b"a" * PAGE
    sync = packet("10.0", flags=1, normal_pages=0, next_packet_size=0, ramblock="")
    data += schema.build_packet(sync, [])
    from qmig.wire.multifd import MultifdDeviceStateHeader

    state = MultifdDeviceStateHeader(0x40, "0000:00:02.0/vfio", 0, 5)
    data += schema.build_device_state(state) + b"state"
    events = read_all("10.0", data, 1000, blocks={"pc.ram": 16 * PAGE}, uuid=UUID, channels=2)
    first, second, third = events[1:]
    assert isinstance(first, Packet) and first.zero_offsets == (PAGE, 2 * PAGE)
    assert isinstance(second, Packet) and second.sync and second.size == 1344
    assert isinstance(third, DeviceState) and third.data == b"state"
    assert third.header.idstr == "0000:00:02.0/vfio"


def test_7_2_lists_no_zero_pages() -> None:
    with pytest.raises(QmigError, match="lists no zero pages"):
        multifd_schema("7.2").build_packet(packet("7.2", zero_pages=1), [0, PAGE])


def error_of(version: str, data: bytes, **kwargs: object) -> MalformedError:
    with pytest.raises(MalformedError) as caught:
        read_all(version, data, **kwargs)
    assert "\n" not in str(caught.value)
    return caught.value


def with_init(version: str, rest: bytes) -> bytes:
    return multifd_schema(version).build_init(MultifdInit(UUID, 3)) + rest


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_hostile_handshakes(version: str) -> None:
    good = multifd_schema(version).build_init(MultifdInit(UUID, 3))
    bad = error_of(version, b"\x11\x22\x33\x45" + good[4:])
    assert (bad.what, bad.offset) == ("MULTIFD_INIT", 0) and "magic" in bad.detail
    bad = error_of(version, good[:7] + b"\x02" + good[8:])
    assert bad.offset == 4 and "version: 2" in bad.detail
    bad = error_of(version, good, uuid=bytes(16))
    assert bad.offset == 8 and "uuid" in bad.detail
    bad = error_of(version, good, channels=3)
    assert bad.offset == 24 and "channel id: 3 is not below the 3 channels" in bad.detail
    with pytest.raises(TruncatedError):
        read_all(version, good[:63])


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_hostile_counts_are_refused_before_anything_is_waited_for(version: str) -> None:
    schema = multifd_schema(version)
    head = schema.build_packet(packet(version, normal_pages=0, next_packet_size=0), [])
    # pages_alloc claims 2**32-1 pages: refused from the fixed part alone
    hostile = head[:12] + (2**32 - 1).to_bytes(4, "big") + head[16:]
    reader = MultifdChannelReader(version)
    reader.feed(with_init(version, hostile))
    assert isinstance(reader.next_event(), Handshake)
    with pytest.raises(MalformedError) as caught:
        reader.next_event()
    assert caught.value.offset == 64 + 12 and "pages_alloc: 4294967295" in caught.value.detail
    # normal_pages above pages_alloc
    hostile = head[:16] + (129).to_bytes(4, "big") + head[20:]
    bad = error_of(version, with_init(version, hostile))
    assert bad.offset == 64 + 16 and "normal_pages: 129" in bad.detail
    # unknown flags and compression methods
    hostile = head[:8] + (0x80000).to_bytes(4, "big") + head[12:]
    assert "unknown bits" in error_of(version, with_init(version, hostile)).detail


def test_10_0_zero_pages_beyond_alloc() -> None:
    head = multifd_schema("10.0").build_packet(packet("10.0", normal_pages=0, pages_alloc=4), [])
    hostile = head[:32] + (5).to_bytes(4, "big") + head[36:]
    bad = error_of("10.0", with_init("10.0", hostile))
    assert bad.offset == 64 + 32 and "zero_pages: 5" in bad.detail


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_offsets_outside_the_block_and_unknown_blocks(version: str) -> None:
    schema = multifd_schema(version)
    wire = schema.build_packet(packet(version, normal_pages=2), [0, 16 * PAGE]) + bytes(2 * PAGE)
    bad = error_of(version, with_init(version, wire), blocks={"pc.ram": 16 * PAGE})
    assert bad.offset == 64 + 320 + 8 and "offset[1]" in bad.detail
    bad = error_of(version, with_init(version, wire), blocks={"other": 16 * PAGE})
    assert "unknown block 'pc.ram'" in bad.detail


def test_compressed_payloads_that_lie() -> None:
    schema = multifd_schema("10.0")
    payload = zlib.compress(b"x" * PAGE)[:-8]
    wire = schema.build_packet(packet("10.0", flags=2, next_packet_size=len(payload)), [0])
    bad = error_of("10.0", with_init("10.0", wire + payload))
    assert "ZLIB payload decodes to" in bad.detail and bad.offset == 64 + 1344
    huge = schema.build_packet(packet("10.0", flags=4, next_packet_size=2**32 - 1), [0])
    reader = MultifdChannelReader("10.0")
    reader.feed(with_init("10.0", huge))
    reader.next_event()
    with pytest.raises(MalformedError, match="next_packet_size: 4294967295"):
        reader.next_event()


def test_reader_waits_without_buffering_claims() -> None:
    schema = multifd_schema("10.0")
    wire = schema.build_packet(packet("10.0"), [0])
    reader = MultifdChannelReader("10.0")
    reader.feed(with_init("10.0", wire))
    assert isinstance(reader.next_event(), Handshake)
    assert reader.next_event() is NEED_DATA
    reader.feed(b"p" * PAGE)
    event = reader.next_event()
    assert isinstance(event, Packet) and event.pages == (b"p" * PAGE,)


@settings(max_examples=100, deadline=None)
@given(version=st.sampled_from(["7.2", "10.0"]), data=st.data())
def test_every_spoilt_field_is_one_error_at_its_offset(version: str, data: st.DataObject) -> None:
    bad = data.draw(qs.invalid_multifd_channels(version))
    reader = MultifdChannelReader(version)
    reader.feed(bad.data)
    reader.feed_eof()
    with pytest.raises(MalformedError) as caught:
        list(reader)
    error = caught.value
    assert (error.what, error.offset) == (bad.what, bad.offset), str(error)
    assert error.detail.startswith(bad.field), str(error)
    assert "\n" not in str(error)


def test_the_negotiated_method_and_the_device_state_limit() -> None:
    schema = multifd_schema("10.0")
    wire = schema.build_packet(packet("10.0"), [0]) + bytes(PAGE)
    bad = error_of("10.0", with_init("10.0", wire), method="ZSTD")
    assert bad.offset == 64 + 8 and "NOCOMP packet where ZSTD was negotiated" in bad.detail
    assert len(read_all("10.0", with_init("10.0", wire), method="NOCOMP")) == 2
    from qmig.wire.multifd import MultifdDeviceStateHeader

    state = schema.build_device_state(MultifdDeviceStateHeader(0x40, "dev", 0, 2**32 - 1))
    reader = MultifdChannelReader("10.0", max_payload=1 << 20)
    reader.feed(with_init("10.0", state))
    reader.next_event()
    with pytest.raises(MalformedError, match="next_packet_size: 4294967295") as caught:
        reader.next_event()
    assert caught.value.offset == 64 + schema.device_state_size - 4
    # 7.2 knows no device-state packets: the flag is an unknown bit there
    raw = bytearray(multifd_schema("7.2").build_packet(packet("7.2"), [0]))
    raw[8:12] = (0x40).to_bytes(4, "big")
    assert "unknown bits 0x40" in error_of("7.2", with_init("7.2", bytes(raw))).detail
