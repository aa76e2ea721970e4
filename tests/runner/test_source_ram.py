"""The simulated source guest: its memory, as generated and as its dirtier changes it."""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest

from qmig.runner.source_ram import Dirtier, GuestMemory, GuestRam

PAGE = 4096
REGION = 2 << 20


KPF_THP = 22  # /proc/kpageflags: the page is part of a transparent huge page
KPF_ZERO_PAGE = 24  # the zero page, or the huge zero page
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63


def allocated_pages(memory: mmap.mmap) -> list[int]:
    """The flags of every page of ``memory`` that holds memory of its own: mapped, and not
    the kernel's (huge) zero page. Read from the page tables (/proc/self/pagemap and
    /proc/kpageflags, as root), for this mapping's range alone: the kernel may merge it with
    a neighbouring mapping, whose pages smaps would count with it."""
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(base // PAGE * 8)
        raw = pagemap.read(len(memory) // PAGE * 8)
    entries = struct.unpack(f"{len(raw) // 8}Q", raw)
    flags: list[int] = []
    with open("/proc/kpageflags", "rb") as kpageflags:
        for entry in entries:
            if entry & PRESENT:
                kpageflags.seek((entry & PFN_MASK) * 8)
                (page_flags,) = struct.unpack("Q", kpageflags.read(8))
                if not page_flags >> KPF_ZERO_PAGE & 1:
                    flags.append(page_flags)
    return flags


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
    assert allocated_pages(guest.map) == []  # the huge zero page maps it: nothing allocated
    for page in (3, 700, 1500):
        guest.will_write(page * PAGE)
        guest.map[page * PAGE + 1] = 7
    written = allocated_pages(guest.map)
    assert len(written) == 3  # a 4 KiB page per write
    assert not any(flags >> KPF_THP & 1 for flags in written)  # never a huge page
    assert [guest.map[page * PAGE + 1] for page in (3, 700, 1500)] == [7, 7, 7]
    assert view.tobytes().count(0) == 8 * REGION - 3
    view.release()
