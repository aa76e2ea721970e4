"""Properties of the multifd sender, over generated guests: whatever the pages, the packets it
builds parse back with qmig's channel reader to the same RAM, each within QEMU's limits, and
its sync points come in the order the version's destination waits for them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multifd_send_driver import drive, sync_points

from qmig.protocol.multifd_source import MultifdSendOptions
from qmig.protocol.source import SourceBlock
from qmig.replay import load_recording

PAGE = 4096


@st.composite
def guests(draw: st.DrawFn) -> list[SourceBlock]:
    """One to three blocks; each page zero, a marker page, or a page of one repeated byte."""
    blocks = []
    for number in range(draw(st.integers(1, 3))):
        pages = draw(st.integers(1, 300))
        kinds = draw(st.lists(st.sampled_from("zmf"), min_size=pages, max_size=pages))
        ram = bytearray(pages * PAGE)
        for page, kind in enumerate(kinds):
            if kind == "m":
                ram[page * PAGE : page * PAGE + 8] = (number << 32 | page).to_bytes(8, "big")
            elif kind == "f":
                ram[page * PAGE : (page + 1) * PAGE] = bytes([1 + page % 255]) * PAGE
        blocks.append(SourceBlock(f"block{number}", len(ram), ram))
    return blocks


SETUPS = st.sampled_from(
    [
        ("7.2", "pc-i440fx-7.2", None),
        ("10.0", "pc-i440fx-7.2", None),  # hw_compat: per section, legacy zero pages
        ("10.0", "pc-q35-10.0", None),
        ("10.0", "pc-q35-10.0", "legacy"),
        ("10.0", "pc-q35-10.0", "none"),
        ("10.0", "pc-i440fx-8.1", "multifd"),  # per round, zero pages listed
    ]
)


@settings(deadline=None, max_examples=60)
@given(
    blocks=guests(),
    setup=SETUPS,
    channels=st.integers(1, 6),
    passes=st.integers(1, 3),
    budget=st.sampled_from([1, 20_000, 1 << 20]),
    redirty=st.lists(st.integers(0, 299), max_size=30),
)
def test_packets_parse_back_to_the_same_ram_with_syncs_in_order(
    blocks: list[SourceBlock],
    setup: tuple[str, str, str | None],
    channels: int,
    passes: int,
    budget: int,
    redirty: list[int],
) -> None:
    version, machine, zero = setup
    first = blocks[0]
    dirty = [p for p in redirty if p < first.used_length // PAGE]
    source, got = drive(
        blocks, version, MultifdSendOptions(channels, zero), machine_type=machine, passes=passes,
        dirty_between=[(first.idstr, dirty)], budget=budget,
    )  # fmt: skip
    plan = source.multifd
    assert plan is not None
    for block in blocks:
        assert got.ram[block.idstr] == block.ram
    page_count = plan.page_count
    numbers = [p.header.packet_num for p in got.packets]
    assert sorted(numbers) == list(range(len(numbers)))
    for packet in got.packets:
        header = packet.header
        sync_alloc = page_count if version == "7.2" else 0  # observed in real QEMU
        assert header.pages_alloc == (sync_alloc if packet.sync else page_count)
        assert header.normal_pages + header.zero_pages <= page_count
        assert header.next_packet_size == header.normal_pages * PAGE
        assert packet.sync == (header.normal_pages + header.zero_pages == 0)
        if plan.zero_pages != "multifd":
            assert not packet.zero_offsets
        for page in packet.pages:
            assert page != bytes(PAGE) or plan.zero_pages == "none"
    points = sync_points(got.timeline, channels)
    if plan.per_section:
        assert all(point == "EOS+sync" for point in points)
        assert got.timeline.count(("main", "EOS")) == len(points)
    else:
        # setup and the end of each pass (completion included) sync and say so; EOS alone
        assert points.count("MULTIFD_FLUSH+sync") == passes + 2
        assert set(points) == {"MULTIFD_FLUSH+sync", "EOS"}
    assert plan.syncs == len([p for p in points if p.endswith("+sync")])
    total = sum(-(-b.used_length // PAGE) for b in blocks) + len(set(dirty)) * (passes - 1)
    assert source.stats.precopy_pages == total


@settings(deadline=None, max_examples=25)
@given(
    blocks=guests(),
    setup=SETUPS,
    channels=st.integers(1, 4),
    changes=st.lists(
        st.lists(st.tuples(st.integers(0, 299), st.sampled_from("zmf")), max_size=40),
        min_size=1, max_size=3,
    ),
)  # fmt: skip
def test_a_multifd_capture_folder_rebuilds_the_newest_copy_of_every_page(
    tmp_path_factory: pytest.TempPathFactory,
    blocks: list[SourceBlock],
    setup: tuple[str, str, str | None],
    channels: int,
    changes: list[list[tuple[int, str]]],
) -> None:
    """The guest changes pages between passes (to zero, to data, to another fill): the folder
    of main channel and channels, read back in sync order, is the guest's last state."""
    version, machine, zero = setup
    first = blocks[0]
    pages = first.used_length // PAGE

    def between(number: int) -> list[tuple[str, list[int]]]:
        dirtied = []
        for page, kind in changes[number]:
            if page >= pages:
                continue
            at = page * PAGE
            if kind == "z":
                first.ram[at : at + PAGE] = bytes(PAGE)
            elif kind == "m":
                first.ram[at : at + 8] = (number + 1 << 40 | page).to_bytes(8, "big")
            else:
                first.ram[at : at + PAGE] = bytes([0xA0 + number]) * PAGE
            dirtied.append(page)
        return [(first.idstr, dirtied)]

    _, got = drive(
        blocks, version, MultifdSendOptions(channels, zero), machine_type=machine,
        passes=len(changes) + 1, between=between,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("capture")
    (folder / "stream.bin").write_bytes(got.main)
    for number, data in enumerate(got.channels):
        (folder / f"multifd-{number}.bin").write_bytes(data)
    recording = load_recording(folder, version)
    try:
        for block in blocks:
            rebuilt = next(b for b in recording.blocks if b.idstr == block.idstr)
            assert rebuilt.memory[: block.used_length] == block.ram
    finally:
        recording.close()
