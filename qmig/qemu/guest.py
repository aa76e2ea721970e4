"""qmig's own test guest: a one-sector x86 boot image that keeps dirtying memory.

SeaBIOS loads the sector at 0x7c00 and jumps to it in real mode. The code enables A20, switches
to 32-bit protected mode with a flat GDT and then loops forever::

    for each pass:
        for page in range(start, end, stride): byte[page] += 1     # stride: 4096 by default
        out 0x3f8, MARKER

so each of those pages is written once per pass (a migration never converges on its own) and
the serial port shows one marker per pass. With a ``walk`` above one the pass visits the same
pages out of address order, ``walk`` pages apart (modulo the range), so that a postcopy guest
faults on pages scattered through its RAM rather than on the next one up. The code is emitted
byte by byte below; each line carries its assembly so the encoding can be checked against any
x86 reference. The image never writes its disk, so source and destination can each use a
private copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import gcd
from pathlib import Path

MIB = 1 << 20
PAGE_SIZE = 4096
LOAD_ADDRESS = 0x7C00
SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"
SERIAL_PORT = 0x3F8
DEFAULT_START = 1 * MIB
DEFAULT_END = 100 * MIB
DEFAULT_MARKER = ord("*")

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10


@dataclass(frozen=True)
class GuestSpec:
    """What the incrementer touches: the first byte of one page per ``stride`` in [start, end).

    The default stride writes every 4 KiB page. A larger stride leaves clean pages between the
    dirty ones, which breaks postcopy's discard list into many ranges. ``walk``: how many of
    those pages lie between two touches in a row, modulo the range (1: address order); any
    number below the page count and prime to it touches every page once per pass.
    """

    start: int = DEFAULT_START
    end: int = DEFAULT_END
    marker: int = DEFAULT_MARKER
    stride: int = PAGE_SIZE
    walk: int = 1

    def __post_init__(self) -> None:
        if self.start % PAGE_SIZE or self.end % PAGE_SIZE:
            raise ValueError("start and end must be page aligned")
        if self.stride % PAGE_SIZE or self.stride <= 0 or (self.end - self.start) % self.stride:
            raise ValueError("stride must be a multiple of 4 KiB that divides end - start")
        # Below 1 MiB lie the boot sector, the BIOS data and the VGA/ROM holes.
        if not MIB <= self.start < self.end <= 0xFFFF_F000:
            raise ValueError("need 1 MiB <= start < end < 4 GiB")
        if not 0 <= self.marker <= 0xFF:
            raise ValueError("marker must be one byte")
        if self.walk != 1 and not (1 < self.walk < self.pages and gcd(self.walk, self.pages) == 1):
            raise ValueError("walk must be 1, or below the page count and prime to it")

    @property
    def pages(self) -> int:
        """How many pages the guest writes per pass."""
        return (self.end - self.start) // self.stride

    def touched(self, index: int) -> int:
        """Which page (0: the first of the range) a pass touches ``index``-th."""
        return index * self.walk % self.pages


def scattered_walk(pages: int) -> int:
    """A walk that scatters a pass over ``pages`` pages: the first number prime to the page
    count from about 0.618 of it on (the golden ratio's fraction spreads consecutive touches
    evenly over the range); 1 where there are fewer than three pages."""
    if pages < 3:
        return 1
    walk = max(2, round(pages * 0.618))
    while gcd(walk, pages) != 1:
        walk += 1
    return walk


def highest_safe_end(memory_mib: int) -> int:
    """The highest ``end`` that keeps the counters out of the firmware's data.

    SeaBIOS leaves data (non-zero before the guest runs) just below RAM top - 16 MiB when the
    guest has 64 MiB or more (seen at 0x2fe2000..0x3000000 with 64 MiB, 0x6fe2000..0x7000000
    with 128 MiB), and in the last MiB with 32 MiB. Counters there would not start at zero.
    """
    return (memory_mib - (1 if memory_mib <= 32 else 17)) * MIB


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def _rel8(source_end: int, target: int) -> bytes:
    distance = target - source_end
    if not -128 <= distance <= 127:
        raise AssertionError("short jump out of range")
    return distance.to_bytes(1, "little", signed=True)


# A piece is a label name (str), an alignment in bytes (int, padded with zeros) or a fixed-size
# encoder taking (labels, own address): sizes never depend on label values, so two passes do.
Piece = str | int | tuple[int, Callable[[dict[str, int], int], bytes]]


def _fixed(code: bytes) -> Piece:
    return (len(code), lambda _labels, _here: code)


def _program(spec: GuestSpec) -> Sequence[Piece]:
    gdt = "gdt"
    return [
        # --- 16-bit real mode, CS:IP = 0000:7c00 ---
        _fixed(b"\xfa"),  # cli            ; no interrupt handlers exist past this point
        _fixed(b"\x31\xc0"),  # xor ax, ax
        _fixed(b"\x8e\xd8"),  # mov ds, ax     ; lgdt below uses a DS-relative address
        _fixed(b"\x8e\xd0"),  # mov ss, ax
        _fixed(b"\xbc" + _u16(LOAD_ADDRESS)),  # mov sp, 0x7c00
        _fixed(b"\xe4\x92"),  # in al, 0x92    ; "fast A20" port
        _fixed(b"\x0c\x02"),  # or al, 2       ; A20 on
        _fixed(b"\x24\xfe"),  # and al, 0xfe   ; keep bit 0 clear: it resets the machine
        _fixed(b"\xe6\x92"),  # out 0x92, al
        (5, lambda labels, _here: b"\x0f\x01\x16" + _u16(labels["gdt_descriptor"])),
        # ^ lgdt [gdt_descriptor]
        _fixed(b"\x0f\x20\xc0"),  # mov eax, cr0
        _fixed(b"\x0c\x01"),  # or al, 1       ; PE
        _fixed(b"\x0f\x22\xc0"),  # mov cr0, eax
        (5, lambda labels, _here: b"\xea" + _u16(labels["protected"]) + _u16(CODE_SELECTOR)),
        # ^ jmp 0x08:protected   ; far jump loads the 32-bit code segment
        # --- 32-bit protected mode, flat 4 GiB segments ---
        "protected",
        _fixed(b"\x66\xb8" + _u16(DATA_SELECTOR)),  # mov ax, 0x10
        _fixed(b"\x8e\xd8"),  # mov ds, ax
        _fixed(b"\x8e\xc0"),  # mov es, ax
        _fixed(b"\x8e\xd0"),  # mov ss, ax
        _fixed(b"\xbc" + _u32(LOAD_ADDRESS)),  # mov esp, 0x7c00
        "next_pass",
        *(_address_order(spec) if spec.walk == 1 else _walk_order(spec)),
        _fixed(b"\x66\xba" + _u16(SERIAL_PORT)),  # mov dx, 0x3f8
        _fixed(b"\xb0" + bytes([spec.marker])),  # mov al, marker
        _fixed(b"\xee"),  # out dx, al     ; the UART sends it whatever the baud setup
        (2, lambda labels, here: b"\xeb" + _rel8(here + 2, labels["next_pass"])),
        # ^ jmp next_pass
        # --- data ---
        8,  # the CPU reads descriptors faster when the GDT is 8-byte aligned
        gdt,
        _fixed(bytes(8)),  # selector 0: the mandatory null descriptor
        _fixed(bytes.fromhex("ffff0000009acf00")),  # 0x08: code, base 0, limit 4 GiB, 32-bit
        _fixed(bytes.fromhex("ffff00000092cf00")),  # 0x10: data, base 0, limit 4 GiB, writable
        "gdt_descriptor",
        (6, lambda labels, _here: _u16(3 * 8 - 1) + _u32(labels[gdt])),  # limit, linear base
    ]


def _address_order(spec: GuestSpec) -> list[Piece]:
    """One pass, page after page up the range."""
    return [
        _fixed(b"\xbb" + _u32(spec.start)),  # mov ebx, start
        "next_page",
        _fixed(b"\xfe\x03"),  # inc byte [ebx]
        _fixed(b"\x81\xc3" + _u32(spec.stride)),  # add ebx, stride
        _fixed(b"\x81\xfb" + _u32(spec.end)),  # cmp ebx, end
        (2, lambda labels, here: b"\x72" + _rel8(here + 2, labels["next_page"])),
        # ^ jb next_page          ; unsigned: end may be above 2 GiB
    ]


def _walk_order(spec: GuestSpec) -> list[Piece]:
    """One pass, ``walk`` pages on each time, wrapping at the range's end: ``pages`` touches
    land on every page once, since the walk is prime to the page count."""
    span = spec.end - spec.start
    return [
        _fixed(b"\xbb" + _u32(0)),  # mov ebx, 0         ; the offset into the range
        _fixed(b"\xb9" + _u32(spec.pages)),  # mov ecx, pages
        "next_touch",
        _fixed(b"\xfe\x83" + _u32(spec.start)),  # inc byte [ebx + start]
        _fixed(b"\x81\xc3" + _u32(spec.walk * spec.stride)),  # add ebx, walk * stride
        _fixed(b"\x81\xfb" + _u32(span)),  # cmp ebx, end - start
        (2, lambda labels, here: b"\x72" + _rel8(here + 2, labels["in_range"])),
        # ^ jb in_range
        _fixed(b"\x81\xeb" + _u32(span)),  # sub ebx, end - start
        "in_range",
        _fixed(b"\x49"),  # dec ecx
        (2, lambda labels, here: b"\x75" + _rel8(here + 2, labels["next_touch"])),
        # ^ jnz next_touch
    ]


def _assemble(program: Sequence[Piece], origin: int) -> bytes:
    labels: dict[str, int] = {}
    address = origin
    for piece in program:
        if isinstance(piece, str):
            labels[piece] = address
        elif isinstance(piece, int):
            address += -address % piece
        else:
            address += piece[0]
    code = bytearray()
    for piece in program:
        if isinstance(piece, str):
            continue
        if isinstance(piece, int):
            code += bytes(-(origin + len(code)) % piece)
            continue
        size, encode = piece
        encoded = encode(labels, origin + len(code))
        if len(encoded) != size:
            raise AssertionError("encoder produced the wrong size")
        code += encoded
    return bytes(code)


def boot_sector(spec: GuestSpec = GuestSpec()) -> bytes:
    """The 512-byte boot sector for ``spec``."""
    code = _assemble(_program(spec), LOAD_ADDRESS)
    if len(code) > SECTOR_SIZE - len(BOOT_SIGNATURE):
        raise AssertionError("boot code does not fit in one sector")
    return code.ljust(SECTOR_SIZE - len(BOOT_SIGNATURE), b"\x00") + BOOT_SIGNATURE


def disk_image(spec: GuestSpec = GuestSpec()) -> bytes:
    """A raw disk image: the boot sector padded to a whole 4 KiB so block layers are happy."""
    return boot_sector(spec).ljust(PAGE_SIZE, b"\x00")


def write_disk_image(path: Path, spec: GuestSpec = GuestSpec()) -> Path:
    path.write_bytes(disk_image(spec))
    return path


def known_data(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes to preload into a paused guest's RAM."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"qmig-known-data:{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def loader_args(path: Path, address: int) -> list[str]:
    """QEMU arguments that put the contents of ``path`` at guest-physical ``address``.

    The generic loader device copies the file into RAM at machine reset, so a guest started
    with ``-S`` already holds it before any instruction runs.
    """
    return ["-device", f"loader,file={path},addr={address:#x},force-raw=on"]
