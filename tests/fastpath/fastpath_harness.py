"""Running a real destination (userfaultfd RAM) on a stream fed through a socket, with the C
receive path and without it, and keeping what each placed and asked for.

The stream can be fed in pieces: after each piece the feeder waits until the destination's
machine has read every byte sent so far. A piece that ends right after POSTCOPY_RUN makes
the C thread take the channel over before the rest arrives (a stream sent in one go is read
by Python whole, before RUN, and the fast path then has nothing to do). A page can be
touched once that piece is in: the touch faults, the fault becomes a page request on the
return path, and the feeder sends on only once it has seen the request, so that both runs
ask for the same pages in the same order whatever the timing.
"""

from __future__ import annotations

import functools
import lzma
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmig.ram._uffd import ffi

from qmig.errors import QmigError
from qmig.protocol.destination import Destination
from qmig.ram.blocks import RamBlock
from qmig.ram.session import RamSession
from qmig.ram.workload import Workload
from qmig.runner.destination import DestinationRunner
from qmig.transport import Connection
from qmig.wire import messages as m
from qmig.wire.reading.return_path import ReturnPathReader
from qmig.wire.reading.stream import StreamReader

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
WAIT = 20.0  # the longest wait for the destination to read a piece


@functools.cache
def fixture_stream(name: str) -> bytes:
    return lzma.decompress((FIXTURES / name / "stream.bin.xz").read_bytes())


@dataclass(frozen=True)
class Touch:
    """A page the guest touches once the stream's first piece is in."""

    block: str
    offset: int
    length: int  # the block's page size


@dataclass
class Outcome:
    """What a destination did with one stream."""

    error: str | None
    error_offset: int | None
    # block → the bytes of every run of received target pages, by its offset. A stream may
    # complete with pages never sent (a generated one, or a hostile one): those are compared
    # by the received bitmaps, and nothing reads them (a read of a missing page would block).
    ram: dict[str, dict[int, bytes]] = field(default_factory=dict)
    received: dict[str, bytes] = field(default_factory=dict)  # block → received bitmap
    placed_pages: dict[str, int] = field(default_factory=dict)
    block_pages: dict[str, list[int]] = field(default_factory=dict)
    requests: int = 0
    # The page requests on the return path, in order, and every other message, counted.
    asked: list[Any] = field(default_factory=list)
    replies: Counter[str] = field(default_factory=Counter)
    fast_path: dict[str, Any] = field(default_factory=dict)


def received_bitmap(block: RamBlock) -> bytes:
    """The block's received bitmap, one bit a target page, as the C side keeps it."""
    bits = -(-block.used_length // block.c_block.target_page // 8)
    return bytes(ffi.buffer(block.c_block.bitmap, bits))


class KeepingRunner(DestinationRunner):
    """Keeps each block's received bitmap before the RAM is torn down, whatever the
    outcome."""

    kept: dict[str, bytes]

    def _close_session(self) -> None:
        self.kept = {}
        if self.session is not None:
            for block in self.session.blocks:
                self.kept[block.idstr] = received_bitmap(block)
        super()._close_session()


class _KeepingRunner(KeepingRunner):
    """Says when the main channel waits for bytes."""

    waiting = False  # in _receive: every byte fed so far has been acted on

    def _receive(self, buffer: bytearray) -> int:
        self.waiting = True
        try:
            return super()._receive(buffer)
        finally:
            self.waiting = False


def wait_until(condition: Callable[[], bool], done: threading.Event, timeout: float = WAIT) -> bool:
    """Polls ``condition`` until it holds (True), or ``timeout`` passes or ``done`` is set
    (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done.is_set():
        if condition():
            return True
        time.sleep(0.001)
    return False


# What both kinds of run keep and must agree on: the error and where, what each block received
# and holds, what was placed where.
AGREED = ("error", "error_offset", "received", "ram", "placed_pages", "block_pages")


def assert_same(fast: object, slow: object, *fields: str) -> None:
    """The two runs' outcomes hold the same ``fields``."""
    for name in fields:
        assert getattr(fast, name) == getattr(slow, name), name


def received_contents(block: RamBlock) -> dict[int, bytes]:
    """The block's received target pages, as runs: offset → bytes."""
    page = block.c_block.target_page
    runs: dict[int, bytes] = {}
    bit, end = 0, block.used_length // page
    while bit < end:
        if not block.received.test(bit):
            bit += 1
            continue
        start = bit
        while bit < end and block.received.test(bit):
            bit += 1
        runs[start * page] = block.read(start * page, (bit - start) * page)
    return runs


def after_run(stream: bytes, version: str | None) -> int | None:
    """Where the C thread can take over: the first section after POSTCOPY_RUN (past the
    commands that follow it, such as QEMU's PING 4, which the C reader leaves to the
    machine), or None where the stream has no RUN that can be read."""
    reader = StreamReader(version)
    reader.feed(stream)
    run_end: int | None = None
    try:
        for record in reader:
            message = record.message
            if isinstance(message, m.PostcopyRun):
                run_end = record.offset + record.size
            elif run_end is not None and record.depth == 0:
                if isinstance(message, m.SectionPart | m.SectionEnd | m.Eof):
                    return record.offset
                run_end = record.offset + record.size
    except QmigError:
        pass
    return run_end


class _Feeder:
    """Sends the stream in pieces, reads the return path, and touches the page."""

    def __init__(
        self, sock: socket.socket, stream: bytes, pieces: Sequence[int], touch: Touch | None
    ) -> None:
        self.sock = sock
        self.stream = stream
        self.pieces = [p for p in sorted(set(pieces)) if 0 < p < len(stream)]
        self.touch = touch
        self.runner: DestinationRunner | None = None
        self.returned = bytearray()
        self._lock = threading.Lock()
        self.finished = threading.Event()  # the runner returned or failed
        self._requests_seen = threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self._drain = threading.Thread(target=self._read_return_path, daemon=True)

    def start(self, runner: DestinationRunner) -> None:
        self.runner = runner
        self._drain.start()
        self.thread.start()

    def join(self) -> None:
        self.thread.join(WAIT)
        self._drain.join(WAIT)

    def _read_return_path(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 16):
                with self._lock:
                    self.returned += chunk
                if _has_request(bytes(self.returned)):
                    self._requests_seen.set()
        except OSError:
            pass

    def _wait_read(self, sent: int) -> None:
        """Until the destination has acted on every byte sent and waits for more (or it has
        ended): the same point in both runs, whatever the timing."""
        runner = self.runner
        assert isinstance(runner, _KeepingRunner)
        wait_until(lambda: runner.dest.reader.fed >= sent and runner.waiting, self.finished)

    def _do_touch(self) -> None:
        runner, touch = self.runner, self.touch
        assert runner is not None and touch is not None
        # The first piece ends just after RUN, and the destination has acted on all of it:
        # the guest runs here, unless a changed byte stopped it first, and the page is
        # missing, unless a changed byte brought it before; both runs see the same.
        session = runner.session
        if runner.report.running_at is None or session is None or self.finished.is_set():
            return
        block = next((b for b in session.blocks if b.idstr == touch.block), None)
        if (
            block is None
            or touch.offset >= block.used_length
            or block.host_page_received(touch.offset // block.page_size)
        ):
            return
        session.start_vcpu(touch.block, Workload(touches=1), touch.offset, touch.length)
        self._requests_seen.wait(WAIT)

    def _feed(self) -> None:
        try:
            sent = 0
            for index, end in enumerate([*self.pieces, len(self.stream)]):
                self.sock.sendall(self.stream[sent:end])
                sent = end
                if end == len(self.stream):
                    break
                self._wait_read(sent)
                if index == 0 and self.touch is not None:
                    self._do_touch()
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the destination failed and closed first


def _has_request(returned: bytes) -> bool:
    return any(isinstance(message, m.ReqPages | m.ReqPagesId) for message in _messages(returned))


def _messages(returned: bytes, version: str | None = "7.2") -> list[Any]:
    reader = ReturnPathReader(version)
    reader.feed(returned)
    out = []
    try:
        for record in reader:
            out.append(record.message)
    except QmigError:
        pass
    return out


def run_destination(
    stream: bytes,
    version: str | None,
    *,
    fast_path: bool,
    pieces: Sequence[int] = (),
    touch: Touch | None = None,
) -> Outcome:
    """Feed ``stream`` to a destination through a socket pair, in ``pieces`` (offsets where
    the feeder waits for the destination to read all it sent), with ``touch`` touched after
    the first piece, and report what it did."""
    ours, theirs = socket.socketpair()
    ours.settimeout(30.0)
    feeder = _Feeder(theirs, stream, pieces, touch)
    runner = _KeepingRunner(
        Connection("stream", ours),
        Destination(version),
        keep_ram=True,
        fast_path=fast_path,
        idle_timeout=30.0,
    )
    feeder.start(runner)
    error: QmigError | None = None
    try:
        report = runner.run()
    except QmigError as failed:
        error = failed
        report = runner.report
    feeder.finished.set()
    ram: dict[str, dict[int, bytes]] = {}
    if error is None and runner.session is not None:
        for idstr in report.blocks:
            ram[idstr] = received_contents(runner.session.block(idstr))
        runner.session.close()
    ours.close()
    feeder.join()
    theirs.close()
    returned = _messages(bytes(feeder.returned), version)
    return Outcome(
        error=None if error is None else str(error),
        error_offset=None if error is None else getattr(error, "offset", None),
        ram=ram,
        received=getattr(runner, "kept", {}),
        placed_pages=dict(report.placed_pages),
        block_pages={k: list(v) for k, v in report.block_pages.items()},
        requests=report.requests,
        asked=[msg for msg in returned if isinstance(msg, m.ReqPages | m.ReqPagesId)],
        replies=Counter(
            type(msg).__name__ for msg in returned if not isinstance(msg, m.ReqPages | m.ReqPagesId)
        ),
        fast_path=dict(report.fast_path),
    )


def serve_requests(
    ram: RamSession, sock: socket.socket, asked: list[tuple[str, int]], delay: float = 0.0
) -> None:
    """A source on the far end of a return path: each REQ_PAGES(_ID) read from ``sock`` is
    noted in ``asked`` and answered ``delay`` seconds later with a zero page, placed
    directly, until the socket ends."""
    reader = ReturnPathReader("10.0")
    last = None
    while chunk := sock.recv(1 << 16):
        reader.feed(chunk)
        for record in reader:
            message = record.message
            if isinstance(message, m.ReqPagesId):
                last = message.block
            assert isinstance(message, m.ReqPages | m.ReqPagesId) and last is not None
            asked.append((last, message.start))
            if delay:
                time.sleep(delay)
            ram.block(last).receive_zero(message.start, message.length)
