"""The source guest's memory in a simulation: generated contents and a dirtying workload.

Pages are a mix of zero pages and pages whose first bytes name their block and index, so
that a misplaced page is caught by verification, followed by random filler.
"""

from __future__ import annotations

import ctypes
import mmap
import random
from bisect import bisect_right
from dataclasses import dataclass, field

from qmig.protocol.source import SourceBlock
from qmig.wire.profiles import target_page_size

TARGET_PAGE = target_page_size()
REGION = 2 << 20
FILLER = 1 << 16
DIRTY_PATTERNS = ("random", "sequential")


class GuestMemory:
    """One block's anonymous memory, mapped as a VMM maps guest RAM: THP-advised.

    Each 2 MiB is read once at the start, which maps the kernel's huge zero page over it where
    the kernel offers one, so that reading zero memory (most of a guest's, and every page
    precopy checks) costs no page fault; page by page it costs one per 4 KiB. Writing into the
    huge zero page would allocate and clear a whole huge page, so a region's first write drops
    the 4 KiB page it writes first (:meth:`will_write`), which splits the mapping into 4 KiB
    zero pages and the write allocates one. Every writer calls :meth:`will_write` first: a
    page it drops must still be zero.
    """

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map.madvise(mmap.MADV_HUGEPAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        # Offsets of the huge-page boundaries: (offset + self._skew) // REGION is a region.
        self._skew = base % REGION
        regions = (size - 1 + self._skew) // REGION + 1
        self._split = bytearray(regions)
        for region in range(regions):
            self.map[max(0, region * REGION - self._skew)]

    def will_write(self, offset: int) -> None:
        """Call before the first write at ``offset`` (a page-aligned byte offset) of a page."""
        region = (offset + self._skew) // REGION
        if not self._split[region]:
            self._split[region] = 1
            self.map.madvise(mmap.MADV_DONTNEED, offset, TARGET_PAGE)


@dataclass
class GuestRam:
    """Named blocks of anonymous memory filled with recognisable data."""

    blocks: list[SourceBlock]
    maps: list[mmap.mmap] = field(repr=False)
    # Per block, for writers (None: an ordinary mapping, written anywhere freely).
    memories: list[GuestMemory | None] = field(default_factory=list, repr=False)

    @classmethod
    def generate(
        cls, layout: list[tuple[str, int]], *, zero_fraction: float = 0.5, seed: int = 1
    ) -> GuestRam:
        rng = random.Random(seed)
        filler = rng.randbytes(FILLER + TARGET_PAGE)
        blocks, maps = [], []
        memories: list[GuestMemory | None] = []
        for number, (idstr, size) in enumerate(layout):
            guest = GuestMemory(size)
            memory = guest.map
            pages = size // TARGET_PAGE
            for index in range(pages):
                if rng.random() < zero_fraction:
                    continue
                offset = index * TARGET_PAGE
                guest.will_write(offset)
                start = rng.randrange(0, FILLER, 8)
                memory[offset : offset + TARGET_PAGE] = filler[start : start + TARGET_PAGE]
                memory[offset : offset + 8] = (number << 48 | index).to_bytes(8, "big")
            blocks.append(SourceBlock(idstr, size, memory))
            maps.append(memory)
            memories.append(guest)
        return cls(blocks, maps, memories)

    @classmethod
    def from_image(cls, idstr: str, path: str) -> GuestRam:
        with open(path, "rb") as file:
            data = file.read()
        size = -(-len(data) // TARGET_PAGE) * TARGET_PAGE
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory[: len(data)] = data
        return cls([SourceBlock(idstr, size, memory)], [memory], [None])


@dataclass
class Dirtier:
    """The source guest writing to its memory at ``rate`` pages per second.

    It runs in steps driven by the runner's clock, so the runner stays single-threaded; each
    step returns the target pages it changed, per block, for the next dirty-bitmap sync.
    """

    ram: GuestRam
    rate: float
    seed: int = 2
    # Dirty only the first this-many target pages of RAM (blocks in order), the guest's
    # working set, as a real guest rewrites the same pages; None: anywhere.
    working_set: int | None = None
    # "random": pages picked at random; "sequential": one after another through the working
    # set, over and over, as qmig's QEMU test guest (qmig.qemu.guest) writes its range.
    pattern: str = "random"
    _rng: random.Random = field(init=False, repr=False)
    _next: int = 0  # sequential: the next page to write
    _carry: float = 0.0
    _pending: dict[str, set[int]] = field(default_factory=dict)
    pages_dirtied: int = 0

    def __post_init__(self) -> None:
        if self.pattern not in DIRTY_PATTERNS:
            raise ValueError(f"dirtying pattern {self.pattern!r}: not one of {DIRTY_PATTERNS}")
        self._rng = random.Random(self.seed)
        # Where each block's pages start in one numbering of all pages, for bisect.
        self._firsts: list[int] = []
        total = 0
        for block in self.ram.blocks:
            self._firsts.append(total)
            total += block.used_length // TARGET_PAGE
        self._total = total

    def step(self, seconds: float) -> None:
        self._carry += self.rate * seconds
        count = int(self._carry)
        self._carry -= count
        if not count or not self._total or self.working_set == 0:
            return
        # This runs on the source's sending thread, so every page costs stream time: draw
        # all the picks at once and keep the per-page loop to an index and one byte.
        rng = self._rng
        limit = self._total if self.working_set is None else min(self.working_set, self._total)
        if self.pattern == "sequential":
            picks = [(self._next + k) % limit for k in range(count)]
            self._next = (self._next + count) % limit
        else:
            picks = rng.choices(range(limit), k=count)
        bytes_at = rng.choices(range(8, TARGET_PAGE), k=count)  # keep the page's tag intact
        firsts, maps, blocks = self._firsts, self.ram.maps, self.ram.blocks
        guests = self.ram.memories or [None] * len(maps)
        pending = [self._pending.setdefault(block.idstr, set()) for block in blocks]
        for pick, byte in zip(picks, bytes_at, strict=True):
            index = bisect_right(firsts, pick) - 1
            page = pick - firsts[index]
            guest = guests[index]
            if guest is not None:
                guest.will_write(page * TARGET_PAGE)
            at = page * TARGET_PAGE + byte
            memory = maps[index]
            memory[at] = (memory[at] + 1) & 0xFF
            pending[index].add(page)
        self.pages_dirtied += count

    def collect(self) -> dict[str, set[int]]:
        """The pages dirtied since the last collect (QEMU's dirty-bitmap sync)."""
        pending, self._pending = self._pending, {}
        return pending
