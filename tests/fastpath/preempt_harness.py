"""Running a real destination (userfaultfd RAM, sockets) with a postcopy-preempt channel, with
the C receive path on that channel and without it, and keeping what each placed.

A sans-IO source builds the main stream: precopy with some pages dirtied again, postcopy
started, RUN. The feeder sends it up to RUN, waits for the guest to run here (and, with the
fast path, for the C thread to have taken the preempt channel), then sends the preempt
channel's bytes in pieces, waiting after each until the channel's machine has read all of it
and waits for more. What the blocks hold then (their received bitmaps and those pages) is
kept, before the rest of the main stream completes the migration: the same point in both
runs, whatever the timing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastpath_harness import (
    AGREED,
    WAIT,
    KeepingRunner,
    after_run,
    assert_same,
    received_bitmap,
    received_contents,
    wait_until,
)

from qmig.errors import QmigError
from qmig.protocol.destination import Destination
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.preempt_channel import PreemptChannel
from qmig.protocol.source import Source, SourceBlock
from qmig.runner.channels import PREEMPT, Channels
from qmig.runner.fastpath import FastPath
from qmig.runner.preempt_recv import PreemptReceiver
from qmig.transport import Connection

PAGE = 4096
BLOCK = "pc.ram"
PAGES = 64
MACHINES = {PreemptVariant.V8_0: "pc-q35-10.0", PreemptVariant.PRE_7_2: "pc-i440fx-7.2"}
VERSIONS = {PreemptVariant.V8_0: "10.0", PreemptVariant.PRE_7_2: "7.2"}


@dataclass(frozen=True)
class MainStream:
    """The main channel's bytes up to RUN (``head``), and the rest (``tail``), which
    completes the migration; ``end``: what the source's preempt channel ends with."""

    head: bytes
    tail: bytes
    end: bytes


def main_stream(variant: PreemptVariant, dirty: Sequence[int] = range(8, PAGES, 3)) -> MainStream:
    """A small guest's migration: every page in precopy, ``dirty`` ones written again, so
    that they are discarded at the switchover and missing once the guest runs here."""
    ram = bytearray(PAGES * PAGE)
    for page in range(PAGES):
        ram[page * PAGE : page * PAGE + 8] = (page + 1).to_bytes(8, "little")
    source = Source(
        [SourceBlock(BLOCK, len(ram), ram)],
        version=VERSIONS[variant],
        machine_type=MACHINES[variant],
        preempt=variant,
    )
    source.start()
    head = source.data_to_send(1 << 30)
    source.sync_dirty(BLOCK, dirty)
    source.start_postcopy()
    head += source.data_to_send(0)
    tail = b""
    while data := source.data_to_send(1 << 20):
        tail += data
    return MainStream(head, tail, source.preempt_data())


@dataclass
class PreemptOutcome:
    error: str | None
    error_offset: int | None
    # After the preempt channel's bytes, before the rest of the main stream: the received
    # bitmap and the received pages' contents.
    received: bytes = b""
    ram: dict[int, bytes] = field(default_factory=dict)
    # At the end.
    final_received: dict[str, bytes] = field(default_factory=dict)
    final_ram: dict[int, bytes] = field(default_factory=dict)
    preempt_pages: int = 0
    placed_pages: dict[str, int] = field(default_factory=dict)
    block_pages: dict[str, list[int]] = field(default_factory=dict)
    fast_path: dict[str, Any] = field(default_factory=dict)


def assert_runs_agree(fast: PreemptOutcome, slow: PreemptOutcome) -> None:
    assert_same(fast, slow, *AGREED, "final_received", "final_ram", "preempt_pages")
    assert "preempt_records" not in slow.fast_path


class _Reader(PreemptReceiver):
    """Says when the preempt thread waits for bytes, and whether its C thread took over."""

    waiting = False
    taken = False

    def receive(self, connection: Connection, buffer: bytearray, fast: FastPath | None) -> int:
        self.waiting = True
        try:
            return super().receive(connection, buffer, fast)
        finally:
            self.waiting = False

    def take_over(self, connection: Connection, channel: PreemptChannel) -> FastPath | None:
        fast = super().take_over(connection, channel)
        self.taken = self.taken or fast is not None
        return fast


class _Runner(KeepingRunner):
    """Reads the preempt channel with a :class:`_Reader`; keeps the received bitmaps before
    the RAM goes."""

    preempt_receiver = _Reader

    @property
    def preempt(self) -> _Reader:
        assert isinstance(self._preempt, _Reader)
        return self._preempt


class _Feeder:
    def __init__(
        self,
        main: socket.socket,
        preempt: socket.socket,
        stream: MainStream,
        preempt_bytes: bytes,
        pieces: Sequence[int],
        outcome: PreemptOutcome,
    ) -> None:
        self.main, self.preempt = main, preempt
        self.stream, self.preempt_bytes = stream, preempt_bytes
        self.pieces = [p for p in sorted(set(pieces)) if 0 < p < len(preempt_bytes)]
        self.outcome = outcome
        self.done = threading.Event()  # the runner returned or failed
        self.runner: _Runner | None = None
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.drain = threading.Thread(target=self._read_return_path, daemon=True)

    def start(self, runner: _Runner) -> None:
        self.runner = runner
        self.drain.start()
        self.thread.start()

    def _read_return_path(self) -> None:
        try:
            while self.main.recv(1 << 16):
                pass
        except OSError:
            pass

    def _consumed(self, sent: int) -> bool:
        runner = self.runner
        assert runner is not None
        channel = runner.dest.preempt_channel
        thread = runner.preempt.thread
        if runner.preempt.error is not None or thread is None or not thread.is_alive():
            return True  # failed, or ended (EOS)
        return channel is not None and channel.reader.fed >= sent and runner.preempt.waiting

    def _keep(self) -> None:
        runner = self.runner
        assert runner is not None
        session = runner.session
        if session is None or runner.preempt.error is not None or self.done.is_set():
            return
        block = session.block(BLOCK)
        self.outcome.received = received_bitmap(block)
        self.outcome.ram = received_contents(block)

    def _feed(self) -> None:
        runner = self.runner
        assert runner is not None
        try:
            self.main.sendall(self.stream.head)
            wait_until(
                lambda: (
                    runner.report.running_at is not None
                    and runner.preempt.waiting
                    and (runner.preempt.taken or not runner.fast_path)
                ),
                self.done,
            )
            sent = 0
            for end in [*self.pieces, len(self.preempt_bytes)]:
                self.preempt.sendall(self.preempt_bytes[sent:end])
                sent = end
                wait_until(lambda sent=sent: self._consumed(sent), self.done)
            if runner.preempt.error is not None:
                return  # the rest would race with the failure's cut of the main channel
            self._keep()
            self.main.sendall(self.stream.tail)
            self.main.shutdown(socket.SHUT_WR)
            if runner.dest.preempt is PreemptVariant.V8_0:
                self.done.wait(WAIT)  # nothing ends it but the migration's end
            else:  # the load is over, and waits for the channel's end
                wait_until(lambda: runner.completed, self.done)
            self.preempt.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the destination failed and closed first


def split_at_run(stream: bytes, version: str) -> MainStream:
    """A recorded main stream cut where its guest starts running (its preempt channel's
    end is in the channel's own recording)."""
    run_end = after_run(stream, version)
    assert run_end is not None, "no POSTCOPY_RUN in the stream"
    return MainStream(stream[:run_end], stream[run_end:], b"")


def run_preempt(
    variant: PreemptVariant,
    stream: MainStream,
    preempt_bytes: bytes,
    *,
    fast_path: bool,
    pieces: Sequence[int] = (),
    version: str | None = None,
) -> PreemptOutcome:
    """Migrate ``stream`` into a destination whose preempt channel brings ``preempt_bytes``
    once the guest runs there (in ``pieces``), and report what it placed."""
    main_ours, main_theirs = socket.socketpair()
    preempt_ours, preempt_theirs = socket.socketpair()
    for sock in (main_ours, preempt_ours):
        sock.settimeout(30.0)
    preempt = Connection("preempt channel", preempt_ours)
    channels = Channels(Connection("stream", main_ours), None, {PREEMPT: lambda _t: preempt})
    runner = _Runner(
        channels,
        Destination(version or VERSIONS[variant], preempt=variant),
        keep_ram=True,
        fast_path=fast_path,
        idle_timeout=30.0,
    )
    outcome = PreemptOutcome(None, None)
    feeder = _Feeder(main_theirs, preempt_theirs, stream, preempt_bytes, pieces, outcome)
    feeder.start(runner)
    try:
        report = runner.run()
    except QmigError as error:
        outcome.error, outcome.error_offset = str(error), getattr(error, "offset", None)
        report = runner.report
    feeder.done.set()
    if outcome.error is None and runner.session is not None:
        outcome.final_ram = received_contents(runner.session.block(BLOCK))
        runner.session.close()
    channels.close_all()
    feeder.thread.join(WAIT)
    feeder.drain.join(WAIT)
    main_theirs.close()
    preempt_theirs.close()
    outcome.final_received = getattr(runner, "kept", {})
    outcome.preempt_pages = report.preempt_pages
    outcome.placed_pages = dict(report.placed_pages)
    outcome.block_pages = {k: list(v) for k, v in report.block_pages.items()}
    outcome.fast_path = dict(report.fast_path)
    return outcome
