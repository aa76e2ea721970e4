"""The destination's own RAM (RamConfig): ADVISE's page sizes and MEM_SIZE's blocks are
checked against it as a QEMU destination checks them against its command line."""

from __future__ import annotations

import pytest

from qmig.errors import RemoteProtocolError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.ram_config import DeclaredBlock, RamConfig, parse_blocks
from qmig.protocol.states import DestinationState
from qmig.wire import messages as m
from qmig.wire.reader import NEED_DATA
from qmig.wire.schema import schema_for

VERSION = "7.2"
S = schema_for(VERSION)
MIB = 1 << 20
OPENING = S.build_opening(m.Configuration("pc-q35-7.2"), return_path=True)


def mem_size(*blocks: m.RamBlockInfo, total: int | None = None) -> bytes:
    if total is None:
        total = sum(block.used_length for block in blocks)
    return (
        S.build_section(m.SectionStart(2, "ram", 0, 4))
        + S.build_mem_size(m.MemSize(total, blocks))
        + S.build_ram_flag("EOS")
        + S.build_footer(2)
    )


def mem_size_offset() -> int:
    """Where the MEM_SIZE record starts: after the opening and the section header."""
    return len(OPENING) + len(S.build_section(m.SectionStart(2, "ram", 0, 4)))


def feed(dest: Destination, data: bytes) -> list[ev.Event]:
    dest.receive_data(data)
    events = []
    while isinstance(event := dest.next_event(), ev.Event):
        events.append(event)
    return events


def refused(data: bytes, ram: RamConfig | None = None) -> tuple[RemoteProtocolError, Destination]:
    dest = Destination(VERSION, ram=ram)
    with pytest.raises(RemoteProtocolError) as caught:
        feed(dest, data)
    assert dest.state is DestinationState.FAILED
    assert "\n" not in caught.value.one_line()
    return caught.value, dest


# --- ADVISE: page sizes ---------------------------------------------------------------


def test_a_2m_summary_to_ordinary_ram_is_refused_at_the_command() -> None:
    error, _ = refused(OPENING + S.build_command(m.PostcopyAdvise(2 * MIB, 4096)))
    assert error.one_line() == (
        "POSTCOPY_ADVISE: Postcopy needs matching RAM page sizes (s=200000 d=1000) "
        f"at byte {len(OPENING)}"
    )


def test_huge_page_ram_takes_the_summary_of_huge_ram_and_host_page_roms() -> None:
    ram = RamConfig(page_size=2 * MIB)
    dest = Destination(VERSION, ram=ram)
    events = feed(dest, OPENING + S.build_command(m.PostcopyAdvise(2 * MIB | 4096, 4096)))
    assert ev.PostcopyAdvised(2 * MIB | 4096, 4096) in events
    error, _ = refused(OPENING + S.build_command(m.PostcopyAdvise(4096, 4096)), ram)
    assert error.detail == "Postcopy needs matching RAM page sizes (s=1000 d=201000)"


def test_huge_page_ram_tracks_its_blocks_by_their_own_page_sizes() -> None:
    advise = S.build_command(m.PostcopyAdvise(2 * MIB | 4096, 4096))
    blocks = (m.RamBlockInfo("pc.ram", 4 * MIB, 2 * MIB), m.RamBlockInfo("pc.bios", 256 << 10))
    dest = Destination(VERSION, ram=RamConfig(page_size=2 * MIB))
    feed(dest, OPENING + advise + mem_size(*blocks))
    assert {name: t.page_size for name, t in dest.blocks.items()} == {
        "pc.ram": 2 * MIB,
        "pc.bios": 4096,
    }


# --- MEM_SIZE: declared blocks and the limit -------------------------------------------

DECLARED = RamConfig(
    blocks=(
        DeclaredBlock("pc.ram", 64 * MIB),
        DeclaredBlock("/rom@etc/acpi/tables", 128 << 10, 2 * MIB),
    )
)


def test_declared_blocks_take_a_matching_mem_size() -> None:
    dest = Destination(VERSION, ram=DECLARED)
    blocks = (m.RamBlockInfo("pc.ram", 64 * MIB), m.RamBlockInfo("/rom@etc/acpi/tables", 192 << 10))
    events = feed(dest, OPENING + mem_size(*blocks))
    assert ev.RamBlocksAnnounced(blocks) in events  # a resizeable block grows up to its maximum


def test_an_unknown_block_is_refused_as_qemu_does() -> None:
    error, _ = refused(OPENING + mem_size(m.RamBlockInfo("vga.vram", 16 * MIB)), DECLARED)
    assert error.one_line() == (
        f'RAM: Unknown ramblock "vga.vram", cannot accept migration at byte {mem_size_offset()}'
    )


def test_a_size_mismatch_is_refused_as_qemu_does() -> None:
    error, _ = refused(OPENING + mem_size(m.RamBlockInfo("pc.ram", 32 * MIB)), DECLARED)
    assert error.one_line() == (
        f"RAM: Size mismatch: pc.ram: 0x2000000 != 0x4000000 at byte {mem_size_offset()}"
    )


def test_a_resizeable_block_may_not_grow_past_its_maximum() -> None:
    tables = m.RamBlockInfo("/rom@etc/acpi/tables", 4 * MIB)
    error, _ = refused(OPENING + mem_size(tables), DECLARED)
    assert error.one_line() == (
        "RAM: Size too large: /rom@etc/acpi/tables: 0x400000 > 0x200000 "
        f"at byte {mem_size_offset()}"
    )


def test_a_claim_over_the_limit_is_refused_before_anything_is_tracked() -> None:
    ram = RamConfig(max_ram=1 << 30)
    error, dest = refused(OPENING + mem_size(m.RamBlockInfo("pc.ram", 1 << 62)), ram)
    assert error.one_line() == (
        "RAM: MEM_SIZE claims 0x4000000000000000 bytes of RAM, more than this destination's "
        f"limit of 0x40000000 at byte {mem_size_offset()}"
    )
    assert dest.blocks == {}


def test_a_huge_block_without_a_limit_is_an_error_line_not_a_memory_error() -> None:
    error, dest = refused(OPENING + mem_size(m.RamBlockInfo("pc.ram", 1 << 62)))
    assert error.one_line() == (
        "RAM: block 'pc.ram' of 0x4000000000000000 bytes is more than this host can track "
        f"at byte {mem_size_offset()}"
    )
    assert dest.blocks == {}


def test_a_large_block_costs_no_memory_until_its_pages_arrive() -> None:
    # 1 TiB of guest RAM: 256 MiB of page states, mapped but not written.
    dest = Destination(VERSION)
    feed(dest, OPENING + mem_size(m.RamBlockInfo("pc.ram", 1 << 40)))
    tracker = dest.blocks["pc.ram"]
    assert len(tracker.state) == (1 << 40) // 4096
    assert not tracker.host_page_present((1 << 40) - 4096)


def test_block_lists_parse_names_with_colons_and_maximum_sizes() -> None:
    assert parse_blocks("0000:00:02.0/vga.vram:16M,/rom@etc/acpi/tables:128K/2M") == (
        DeclaredBlock("0000:00:02.0/vga.vram", 16 * MIB),
        DeclaredBlock("/rom@etc/acpi/tables", 128 << 10, 2 * MIB),
    )


def test_nothing_is_read_past_need_data() -> None:
    dest = Destination(VERSION, ram=DECLARED)
    dest.receive_data(OPENING[:5])
    assert dest.next_event() is NEED_DATA
