"""The simulated source guest: its memory, as generated and as its dirtier changes it."""

from __future__ import annotations

import ctypes

import pytest

from qmig.ram.support import mapping_fields
from qmig.runner.source_ram import Dirtier, GuestMemory, GuestRam

PAGE = 4096
REGION = 2 << 20


def _smaps_kib(address: int, field: str) -> int:
    return int(mapping_fields(address)[field].split()[0])


def test_sequential_dirtying_walks_the_working_set_in_order_and_wraps() -> None:
    ram = GuestRam.generate([("a", 64 * PAGE), ("b", 64 * PAGE)], zero_fraction=1.0)
    dirtier = Dirtier(ram, rate=1000.0, working_set=100, pattern="sequential")
    dirtier.step(0.07)  # 70 pages: all of a, then six of b
    assert dirtier.collect() == {"a": set(range(64)), "b": set(range(6))}
    dirtier.step(0.05)  # 50 more: b up to the working set's end (page 100), then a again
    assert dirtier.collect() == {"a": set(range(20)), "b": set(range(6, 36))}
    assert dirtier.pages_dirtied == 120
    first = bytes(ram.maps[0][:PAGE])
    assert first[8:] != bytes(PAGE - 8) and first[:8] == bytes(8)  # changed, tag kept


def test_an_unknown_dirtying_pattern_is_refused() -> None:
    ram = GuestRam.generate([("a", 4 * PAGE)])
    with pytest.raises(ValueError, match="dirtying pattern 'zigzag'"):
        Dirtier(ram, rate=1.0, pattern="zigzag")


def test_guest_memory_reads_zero_without_allocating_and_writes_only_what_it_writes() -> None:
    guest = GuestMemory(8 * REGION)
    view = memoryview(guest.map)
    assert view.tobytes().count(0) == 8 * REGION  # all zero, read everywhere
    base = ctypes.addressof(ctypes.c_char.from_buffer(guest.map))
    assert _smaps_kib(base, "Rss") <= 64  # the huge zero page maps it: nothing allocated
    for page in (3, 700, 1500):
        guest.will_write(page * PAGE)
        guest.map[page * PAGE + 1] = 7
    assert _smaps_kib(base, "AnonHugePages") == 0  # a write never allocates a huge page
    assert _smaps_kib(base, "Rss") <= 64 + 3 * 4
    assert [guest.map[page * PAGE + 1] for page in (3, 700, 1500)] == [7, 7, 7]
    assert view.tobytes().count(0) == 8 * REGION - 3
    view.release()
