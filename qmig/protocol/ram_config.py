"""The destination's own RAM, as a QEMU destination has it from its command line.

A QEMU destination does not take its RAM from the stream: its RAMBlocks, their sizes and
their page sizes come from its own configuration, and the stream must match them. ADVISE's
page-size summary must equal the OR of its blocks' page sizes ("Postcopy needs matching RAM
page sizes", savevm.c), and MEM_SIZE may only name blocks it has, with their sizes ("Unknown
ramblock", "Size mismatch" in ram.c and qemu_ram_resize). qmig's destination learns its
blocks from MEM_SIZE unless it is given a list; a limit on the RAM a MEM_SIZE may claim
bounds what a hostile source can make it map.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmig.errors import QmigError
from qmig.host import HOST_PAGE_SIZE as HOST_PAGE_SIZE  # re-exported for the machine
from qmig.sizes import parse_size


@dataclass(frozen=True)
class DeclaredBlock:
    """One RAMBlock the destination has. ``max_size``: resizeable (QEMU's RAM_RESIZEABLE,
    e.g. the ACPI tables' ROMs), up to that size; None: the size must match."""

    idstr: str
    size: int
    max_size: int | None = None


@dataclass(frozen=True)
class RamConfig:
    """``page_size``: what the guest RAM is backed with, the host's pages (ordinary RAM) or
    huge pages (hugetlbfs); other blocks (ROMs, video RAM) keep the host's pages, as in
    QEMU. ``blocks``: the blocks the destination has (None: whatever MEM_SIZE announces).
    ``max_ram``: the most RAM, in bytes, a MEM_SIZE may claim (None: no limit)."""

    page_size: int = HOST_PAGE_SIZE
    blocks: tuple[DeclaredBlock, ...] | None = None
    max_ram: int | None = None

    def __post_init__(self) -> None:
        size = self.page_size
        if size < HOST_PAGE_SIZE or size & (size - 1):
            raise QmigError("RAM page size", f"{size:#x} is not a power of two of 4 KiB or more")
        names = [block.idstr for block in self.blocks or ()]
        if len(set(names)) != len(names):
            raise QmigError("--blocks", "a block is declared twice")

    def page_sizes(self, host_page_size: int) -> frozenset[int]:
        return frozenset({host_page_size, self.page_size})

    def page_size_summary(self, host_page_size: int) -> int:
        """QEMU's ram_pagesize_summary: the OR of every block's page size."""
        return host_page_size | self.page_size

    def declared(self, idstr: str) -> DeclaredBlock | None:
        return next((block for block in self.blocks or () if block.idstr == idstr), None)


def parse_blocks(text: str) -> tuple[DeclaredBlock, ...]:
    """``NAME:SIZE[/MAX],...`` (a block's name may hold colons: the size follows the last)."""
    blocks = []
    for item in filter(None, text.split(",")):
        name, _, sizes = item.rpartition(":")
        if not name or not sizes:
            raise QmigError("--blocks", f"{item!r} is not NAME:SIZE or NAME:SIZE/MAX")
        size, _, most = sizes.partition("/")
        block = DeclaredBlock(name, parse_size(size), parse_size(most) if most else None)
        if block.max_size is not None and block.max_size < block.size:
            raise QmigError("--blocks", f"{name}: maximum size below its size")
        blocks.append(block)
    return tuple(blocks)
