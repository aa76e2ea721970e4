"""The machine's reads gather while the C receive thread follows the stream.

The thread places the page records it follows before the machine reads them, so a read waits
for ``gather`` bytes (within ``gather_ms`` of its first byte) instead of taking each recv's
worth alone; anything the thread does not follow, the peer's EOF, or a preempt channel's
bytes end the wait at once. The window here is far longer than any test waits (the default
is 2 ms), so a read that returned early did so for one of those reasons, not the clock.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from qmig.ram.blocks import BlockSpec
from qmig.ram.session import RamSession
from qmig.runner.fastpath import FastPath
from qmig.wire import messages as m
from qmig.wire.reading.stream import StreamReader
from qmig.wire.schema import schema_for

VERSION = "7.2"
SCHEMA = schema_for(VERSION)
PAGE = SCHEMA.target_page_size
PAGES = 256
GATHER = 256 << 10
WINDOW_MS = 60_000  # never reached: each test ends its wait otherwise
EARLY = 20.0  # seconds: a read that waited this long waited for the window


def page_records(first: int, count: int, *, part: bool = True) -> bytes:
    """A ram section part (``part``: with its header) of ``count`` data pages from page
    ``first`` on (the part's first names the block), without its end: the thread follows
    it all."""
    data = SCHEMA.build_section(m.SectionPart(2)) if part else b""
    for index in range(first, first + count):
        block = "pc.ram" if index == first and part else None
        data += SCHEMA.build_ram_page(m.RamPage(block, index * PAGE, False, bytes([index]) * PAGE))
    return data


@contextmanager
def following() -> Iterator[tuple[FastPath, socket.socket]]:
    """A thread following a main channel between two sections of a stream whose ram section
    has been set up, and the socket that feeds it."""
    opening = SCHEMA.build_opening(m.Configuration("pc"))
    opening += SCHEMA.build_ram_setup(2, (m.RamBlockInfo("pc.ram", PAGES * PAGE),))
    reader = StreamReader(VERSION)
    reader.feed(opening)
    assert not isinstance(list(reader)[-1], Exception)
    ours, theirs = socket.socketpair()
    with RamSession([BlockSpec("pc.ram", PAGES * PAGE)]) as session:
        fast = FastPath(
            ours.fileno(), reader, [session.block("pc.ram")], gather=GATHER, gather_ms=WINDOW_MS
        )
        fast.sync(reader)
        try:
            yield fast, theirs
        finally:
            fast.stop()
            ours.close()
            theirs.close()


def wait_received(fast: FastPath, count: int) -> None:
    deadline = time.monotonic() + 10
    while fast.stats().bytes < count:
        assert time.monotonic() < deadline, f"the thread received {fast.stats().bytes} bytes"
        time.sleep(0.001)


def timed_read(fast: FastPath, buffer: bytearray) -> tuple[int, float]:
    began = time.monotonic()
    count = fast.read(buffer, 30.0, "main")
    return count, time.monotonic() - began


def test_a_read_waits_for_more_while_the_thread_follows() -> None:
    first, rest = page_records(0, 16), page_records(16, 64, part=False)
    with following() as (fast, peer):
        peer.sendall(first)
        wait_received(fast, len(first))
        later = threading.Timer(0.05, peer.sendall, args=(rest,))
        later.start()
        buffer = bytearray(1 << 20)
        count, elapsed = timed_read(fast, buffer)
        later.join()
        # Not the bytes there when it began: the gathered ones, with the thread synced
        # all along (it placed every page before the read returned them).
        assert count >= GATHER > len(first)
        assert elapsed < EARLY
        assert fast.stats().synced


def test_what_the_thread_does_not_follow_ends_the_wait() -> None:
    first = page_records(0, 16)
    # The stream's end: the thread follows no EOF, so the machine must read up to it.
    end = SCHEMA.build_ram_flag("EOS") + SCHEMA.build_footer(2) + bytes(SCHEMA.eof.build(m.Eof()))
    with following() as (fast, peer):
        peer.sendall(first + end)
        wait_received(fast, len(first + end))
        count, elapsed = timed_read(fast, bytearray(1 << 20))
        assert count == len(first + end) < GATHER
        assert elapsed < EARLY
        assert not fast.stats().synced


def test_the_peers_eof_ends_the_wait() -> None:
    first = page_records(0, 16)
    with following() as (fast, peer):
        peer.sendall(first)
        wait_received(fast, len(first))
        peer.shutdown(socket.SHUT_WR)
        buffer = bytearray(1 << 20)
        count, elapsed = timed_read(fast, buffer)
        assert count == len(first) and elapsed < EARLY
        assert fast.read(buffer, 30.0, "main") == 0


def test_without_gathering_a_read_takes_what_is_there() -> None:
    first = page_records(0, 16)
    with following() as (fast, peer):
        fast.gather = 0
        peer.sendall(first)
        wait_received(fast, len(first))
        count, elapsed = timed_read(fast, bytearray(1 << 20))
        assert count == len(first) and elapsed < EARLY
