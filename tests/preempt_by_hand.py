"""qmig's source runner with postcopy-preempt, in a thread, against a destination machine
that a test drives by hand over TCP: the test decides what the destination reads, and when
(a channel left unread stalls the source as a busy QEMU would)."""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from qmig.errors import QmigError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.preempt_channel import PreemptChannel
from qmig.protocol.source import Source
from qmig.protocol.states import DestinationState
from qmig.runner.channels import PREEMPT, Channels
from qmig.runner.source import SourcePlan, SourceReport, SourceRunner
from qmig.runner.source_ram import GuestRam
from qmig.transport import Connection, Listener, connect, limit_buffers, listen

DEADLINE = 60.0  # seconds for a whole exchange, on a loaded host


@dataclass
class ByHand:
    """The destination's ends: the machine, its main channel, and (once accepted) its preempt
    channel with the machine that reads it."""

    listener: Listener
    thread: threading.Thread
    main: Connection
    dest: Destination
    reports: list[SourceReport]  # the source's, once its runner exists
    preempt: Connection | None = None
    channel: PreemptChannel | None = None
    buffer: bytearray = field(default_factory=lambda: bytearray(1 << 16))
    deadline: float = field(default_factory=lambda: time.monotonic() + DEADLINE)

    def accept_preempt(self) -> PreemptChannel:
        self.preempt = self.listener.accept(timeout=10)
        self.channel = self.dest.open_preempt_channel()
        return self.channel

    def up_to_run(self, on_event: Callable[[ev.Event], None] | None = None) -> int:
        """Read the main channel up to RUN, answering its PINGs, and accept the preempt
        channel (the 8.0 variant's opens after the PONG); the main channel's bytes read."""
        read = 0
        listening = self.listener.socket
        assert listening is not None
        while self.dest.state is not DestinationState.RUNNING:
            assert time.monotonic() < self.deadline, "no RUN"
            if self.preempt is None and select.select([listening], [], [], 0)[0]:
                self.accept_preempt()
            count = self.main.recv_into(self.buffer)
            assert count, "the source closed the stream before RUN"
            read += count
            self.dest.receive_data(memoryview(self.buffer)[:count])
            while isinstance(event := self.dest.next_event(), ev.Event):
                if on_event is not None:
                    on_event(event)
            self.main.sendall(self.dest.data_to_send())
        if self.preempt is None:
            self.accept_preempt()
        return read

    def ask(self, offsets: list[int], block: str = "pc.ram") -> None:
        """Fault on ``offsets``; their requests go out on the return path."""
        for offset in offsets:
            assert self.dest.page_fault(block, offset) is not None
        self.main.sendall(self.dest.data_to_send())


@contextlib.contextmanager
def by_hand(
    ram: GuestRam,
    version: str,
    variant: PreemptVariant | None,
    plan: SourcePlan,
    *,
    receive_buffer: int | None = None,
) -> Iterator[ByHand]:
    """A source of ``ram`` migrating under ``plan`` to a destination this test drives. The
    source's error once the destination hangs up is expected, and dropped. ``receive_buffer``:
    the destination's SO_RCVBUF (small: the source blocks soon on a channel left unread)."""
    source = Source(ram.blocks, version=version, preempt=variant)
    reports: list[SourceReport] = []
    with listen("tcp:127.0.0.1:0") as listener:
        assert listener.socket is not None
        if receive_buffer is not None:
            limit_buffers(listener.socket, receive=receive_buffer)

        def run_source() -> None:
            channels = Channels(
                connect(listener.uri),
                openers={PREEMPT: lambda timeout: connect(listener.uri, timeout)},
            )
            runner = SourceRunner(channels, source, plan)
            reports.append(runner.report)
            with contextlib.suppress(QmigError):  # the destination hangs up at the end
                runner.run()
            channels.close_all()

        thread = threading.Thread(target=run_source, daemon=True)
        thread.start()
        peer = ByHand(
            listener,
            thread,
            listener.accept(timeout=10),
            Destination(version, preempt=variant),
            reports,
        )
        if variant is PreemptVariant.PRE_7_2:  # opened at setup, before the stream
            peer.accept_preempt()
        try:
            yield peer
        finally:
            for connection in (peer.main, peer.preempt):
                if connection is not None:
                    connection.close()
            thread.join(timeout=30)
            assert not thread.is_alive()


def pages_of(event: object, block: str = "pc.ram") -> set[int]:
    """The offsets of the ``block`` pages that ``event`` brought."""
    if not isinstance(event, ev.PagesReceived) or event.run.block != block:
        return set()
    return {offset for offset, _zero, _data in event.run.pages()}
