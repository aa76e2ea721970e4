"""The multifd source machine: pages, zero pages and sync points, as each version does them."""

from __future__ import annotations

import random

import pytest
from multifd_send_driver import drive, sync_points

from qmig.errors import QmigError
from qmig.protocol.multifd_source import MultifdSendOptions
from qmig.protocol.source import Source, SourceBlock

PAGE = 4096


def guest(pages: int = 700, seed: int = 1, name: str = "pc.ram") -> SourceBlock:
    """Every third page zero, the rest recognisable."""
    rng = random.Random(seed)
    ram = bytearray(pages * PAGE)
    for page in range(pages):
        if page % 3:
            ram[page * PAGE : page * PAGE + 16] = rng.randbytes(16)
    return SourceBlock(name, len(ram), ram)


def blocks() -> list[SourceBlock]:
    return [guest(), guest(40, seed=2, name="vga.vram")]


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_7_2_pages_in_packets_zero_pages_on_main_sync_before_every_eos(channels: int) -> None:
    source, got = drive(blocks(), "7.2", MultifdSendOptions(channels))
    for block in source.blocks:
        assert got.ram[block.idstr] == block.ram
    assert all(not p.zero_offsets for p in got.packets), "7.2 lists no zero pages"
    assert got.main_pages == 700 // 3 + 1 + 40 // 3 + 1, "zero pages, as ZERO records"
    points = sync_points(got.timeline, channels)
    assert points and all(point == "EOS+sync" for point in points)
    assert b"MULTIFD" not in got.main
    numbers = [p.header.packet_num for p in got.packets]
    assert sorted(numbers) == list(range(len(numbers))), "one counter over all channels"
    assert all(p.header.pages_alloc == 128 for p in got.packets), "7.2: SYNC packets too"
    assert max(p.header.normal_pages for p in got.packets) == 128


def test_10_0_modern_machine_lists_zero_pages_and_flushes_per_round() -> None:
    source, got = drive(
        blocks(), "10.0", MultifdSendOptions(2), machine_type="pc-q35-10.0", passes=2,
        dirty_between=[("pc.ram", [1, 2, 3, 500])],
    )  # fmt: skip
    for block in source.blocks:
        assert got.ram[block.idstr] == block.ram
    assert got.main_pages == 0, "every page went by multifd"
    assert sum(len(p.zero_offsets) for p in got.packets) > 0
    for packet in got.packets:
        assert packet.offsets == packet.normal_offsets + packet.zero_offsets
    points = sync_points(got.timeline, 2)
    # setup: sync, FLUSH, EOS; each pass's end and the completion: sync, FLUSH; EOS alone
    assert points[:2] == ["MULTIFD_FLUSH+sync", "EOS"]
    assert points.count("MULTIFD_FLUSH+sync") == 4  # setup, 2 passes, completion
    assert "EOS+sync" not in points
    assert points[-2:] == ["MULTIFD_FLUSH+sync", "EOS"]


def test_10_0_old_machine_types_keep_7_2_rules() -> None:
    """hw_compat: a pc-i440fx-7.2 guest on QEMU 10.0 syncs per section and keeps zero pages
    on the main channel."""
    source, got = drive(blocks(), "10.0", MultifdSendOptions(2), machine_type="pc-i440fx-7.2")
    assert source.multifd is not None
    assert source.multifd.per_section and source.multifd.zero_pages == "legacy"
    assert all(point == "EOS+sync" for point in sync_points(got.timeline, 2))
    assert got.main_pages > 0 and all(not p.zero_offsets for p in got.packets)


@pytest.mark.parametrize(("detection", "main_zero"), [("legacy", True), ("none", False)])
def test_zero_page_detection_option(detection: str, main_zero: bool) -> None:
    source, got = drive(
        blocks(), "10.0", MultifdSendOptions(2, zero_page_detection=detection),
        machine_type="pc-q35-10.0",
    )  # fmt: skip
    for block in source.blocks:
        assert got.ram[block.idstr] == block.ram
    assert (got.main_pages > 0) == main_zero
    assert all(not p.zero_offsets for p in got.packets)
    if detection == "none":
        assert sum(p.header.normal_pages for p in got.packets) == 700 + 40


def test_pages_sent_again_win_in_sync_order() -> None:
    block = guest(300)
    source = Source(
        [block], version="10.0", machine_type="pc-q35-10.0", postcopy_ram=False,
        return_path=False, multifd=MultifdSendOptions(3),
    )  # fmt: skip
    source.start()
    while not source.pass_complete:
        source.data_to_send(1 << 20)
    first = source.take_multifd_steps()
    block.ram[5 * PAGE] = 0xEE
    source.sync_dirty("pc.ram", [5])
    source.begin_pass()
    while not source.pass_complete:
        source.data_to_send(1 << 20)
    second = [s for s in source.take_multifd_steps() if not isinstance(s, bytes)]
    assert first and any(5 * PAGE in _offsets(p) for p in second)


def _offsets(packet: object) -> list[int]:
    from qmig.wire.multifd_reader import MultifdChannelReader

    reader = MultifdChannelReader("10.0")
    reader.init = object()  # type: ignore[assignment]
    reader.feed(packet.header)  # type: ignore[attr-defined]
    reader.feed(bytes(packet.normal_pages * PAGE))  # type: ignore[attr-defined]
    event = reader.next_event()
    return list(event.offsets)  # type: ignore[union-attr]


def test_handshakes_carry_uuid_and_ids() -> None:
    uuid = bytes(range(16))
    source = Source(
        [guest(8)], version="7.2", postcopy_ram=False, multifd=MultifdSendOptions(3, uuid=uuid)
    )
    assert source.multifd is not None
    hellos = source.multifd.handshakes()
    assert [len(h) for h in hellos] == [64] * 3
    assert [h[8:24] for h in hellos] == [uuid] * 3 and [h[24] for h in hellos] == [0, 1, 2]


def test_refusals() -> None:
    with pytest.raises(QmigError, match="refuses multifd together with postcopy-ram"):
        Source([guest(8)], version="10.0", multifd=MultifdSendOptions(2))
    with pytest.raises(QmigError, match="no zero-page-detection parameter"):
        Source(
            [guest(8)], version="7.2", postcopy_ram=False,
            multifd=MultifdSendOptions(2, zero_page_detection="multifd"),
        )  # fmt: skip
    with pytest.raises(QmigError, match="has no multifd"):
        Source([guest(8)], version="2.9", postcopy_ram=False, multifd=MultifdSendOptions(2))
    with pytest.raises(QmigError, match="is not one of"):
        Source(
            [guest(8)], version="10.0", postcopy_ram=False,
            multifd=MultifdSendOptions(2, zero_page_detection="sometimes"),
        )  # fmt: skip


def test_postcopy_between_qmig_peers_flushes_and_syncs_before_the_switch() -> None:
    block = guest(300)
    source = Source(
        [block], version="10.0", machine_type="pc-q35-10.0",
        multifd=MultifdSendOptions(2, qmig_peer=True),
    )  # fmt: skip
    source.start()
    while not source.pass_complete:
        source.data_to_send(1 << 20)
    source.take_multifd_steps()
    block.ram[7 * PAGE] = 0x77
    source.sync_dirty("pc.ram", [7])
    source.start_postcopy()
    switch = source.take_multifd_steps()
    packets = [s for s in switch if not isinstance(s, bytes)]
    assert [p.sync for p in packets] == [True, True], "a sync round, nothing queued left"
    rest = source.data_to_send(0)
    # the sync round, then MULTIFD_FLUSH and EOS in a RAM section of their own, then LISTEN
    flush = rest.index(bytes(6) + b"\x02\x00")
    assert rest[flush + 8 : flush + 16] == bytes(7) + b"\x10"
    while source.state.value == "postcopy":
        rest += source.data_to_send(1 << 20)
    assert not source.take_multifd_steps(), "postcopy pages stay on the main channel"
    assert source.stats.postcopy_pages == 1
