"""Postcopy recovery's received bitmap, between the machines' page maps and the wire.

Both machines keep one byte per target page (the destination: 0 = missing; the source: 1 =
dirty). On the wire the destination's map is a bitmap of little-endian 64-bit words, bit i
of the block set when target page i was received, padded to whole words (QEMU's
``ramblock_recv_bitmap_send``). Bit i of a little-endian word array is bit i % 8 of byte
i // 8, so the bitmap is the map's bytes packed eight to a byte, lowest page first.
"""

from __future__ import annotations

WORD = 8  # bytes in one of the bitmap's 64-bit words

# byte value -> "0" or "1": the map as text, for int() to pack (linear, in C).
_AS_BITS = bytes.maketrans(bytes(range(256)), b"0" + b"1" * 255)


def bitmap_size(pages: int) -> int:
    """The bitmap's bytes for a block of ``pages`` target pages (whole 64-bit words)."""
    return -(-pages // 64) * WORD


def received_bitmap(state: bytes | bytearray, pages: int) -> bytes:
    """The destination's map of its first ``pages`` target pages, as the wire's bitmap."""
    size = bitmap_size(pages)
    if pages == 0:
        return b""
    text = bytes(state[:pages]).translate(_AS_BITS)[::-1]  # page 0 is the lowest bit
    return int(text, 2).to_bytes(size, "little")


def mark_placed(state: bytearray, placed: bytes | bytearray | memoryview, pages: int) -> int:
    """Mark received in the map (as data pages: their kind is not known) every one of the
    first ``pages`` target pages whose bit is set in ``placed``, packed as the wire's bitmap
    (page i is bit i % 8 of byte i // 8; shorter than the map: the rest are not set). Returns
    how many the map had missing. Linear in C but for one slice per run of new pages."""
    if pages == 0:
        return 0
    new = int.from_bytes(placed, "little") & ((1 << pages) - 1)
    new &= ~int.from_bytes(received_bitmap(state, pages), "little")
    if not new:
        return 0
    text = format(new, "b")[::-1]  # page 0 first; ends at the last new page
    marked = 0
    start = text.find("1")
    while start >= 0:
        end = text.find("0", start)
        end = len(text) if end < 0 else end
        state[start:end] = b"\1" * (end - start)
        marked += end - start
        start = text.find("1", end)
    return marked


def missing_pages(bitmap: bytes, pages: int) -> bytearray:
    """The source's new dirty map from a received bitmap: 1 for every target page of the
    first ``pages`` whose bit is clear (QEMU takes the complement as its dirty bitmap)."""
    value = int.from_bytes(bitmap, "little")
    text = format(value, "b").zfill(pages)[::-1][:pages] if pages else ""
    # "1" (received) -> 0, "0" (missing) -> 1
    return bytearray(text.encode().translate(bytes.maketrans(b"01", b"\x01\x00")))
