"""Running a :class:`~qmig.protocol.source.Source` over a connection.

One thread: it sends the stream in chunks under a bandwidth cap and, between chunks and
while it waits for the cap, reads the return path, so that page requests jump the queue
within one chunk's time. The guest dirtier runs in steps of the same loop until switchover.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qmig.errors import TransportError
from qmig.protocol import events as ev
from qmig.protocol.source import Source, SourcePhase
from qmig.runner.source_ram import Dirtier
from qmig.transport import Connection
from qmig.wire.reader import NEED_DATA

CHUNK = 256 << 10
SHUT_TIMEOUT = 60.0
MAX_PRECOPY_PASSES = 30


@dataclass
class SourceReport:
    started: float = 0.0
    stopped: float | None = None  # the guest stopped (switchover or precopy completion)
    finished: float = 0.0
    passes: int = 0
    requests: list[tuple[float, str, int]] = field(default_factory=list)
    pongs: list[int] = field(default_factory=list)


@dataclass
class SourcePlan:
    """When to switch: after ``postcopy_after`` precopy passes, or never (precopy only)."""

    postcopy_after: int | None = 1
    bandwidth: float | None = None  # bytes per second, None: unlimited
    converge_pages: int = 64  # precopy only: stop when at most this many pages are dirty


class SourceRunner:
    def __init__(
        self,
        connection: Connection,
        source: Source,
        plan: SourcePlan,
        *,
        dirtier: Dirtier | None = None,
        on_progress: Callable[[str, int], None] | None = None,
    ) -> None:
        self.connection = connection
        self.source = source
        self.plan = plan
        self.dirtier = dirtier
        self.on_progress = on_progress
        self.report = SourceReport()
        self._sent = 0
        self._clock = 0.0
        self._rp_buffer = bytearray(64 << 10)

    def run(self) -> SourceReport:
        source, plan = self.source, self.plan
        self.report.started = self._clock = time.monotonic()
        source.start()
        if plan.postcopy_after == 0:
            self._switch_over()
        while source.phase is SourcePhase.PRECOPY:
            self._send(source.data_to_send(CHUNK))
            if source.pass_complete:
                self._end_of_pass()
        while source.phase is SourcePhase.POSTCOPY:
            self._send(source.data_to_send(CHUNK))
        self._send(source.data_to_send(CHUNK))
        deadline = time.monotonic() + SHUT_TIMEOUT
        while source.phase is SourcePhase.COMPLETING:
            if time.monotonic() > deadline:
                raise TransportError(
                    self.connection.name,
                    f"no SHUT from the destination within {SHUT_TIMEOUT:.0f} s",
                )
            self._poll_return_path(1.0)
        self.report.finished = time.monotonic()
        self.report.passes = source.stats.passes
        self.report.pongs = list(source.pongs)
        return self.report

    def _end_of_pass(self) -> None:
        source, plan = self.source, self.plan
        self._sync_dirty()
        passes = source.stats.passes
        if plan.postcopy_after is not None and passes >= plan.postcopy_after:
            self._switch_over()
        elif plan.postcopy_after is None and (
            source.dirty_pages() <= plan.converge_pages or passes >= MAX_PRECOPY_PASSES
        ):
            self._stop_guest()
            source.complete_precopy()
        else:
            source.begin_pass()

    def _switch_over(self) -> None:
        self._stop_guest()
        self.source.start_postcopy()

    def _stop_guest(self) -> None:
        self._advance_dirtier()
        self._sync_dirty()
        self.dirtier = None
        self.report.stopped = time.monotonic()

    def _sync_dirty(self) -> None:
        if self.dirtier is None:
            return
        for block, pages in self.dirtier.collect().items():
            self.source.sync_dirty(block, pages)

    def _advance_dirtier(self) -> None:
        now = time.monotonic()
        if self.dirtier is not None:
            self.dirtier.step(now - self._clock)
        self._clock = now

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            piece, view = view[:CHUNK], view[CHUNK:]
            self._throttle(len(piece))
            self.connection.sendall(piece)
            self._sent += len(piece)
            if self.on_progress is not None:
                self.on_progress(self.source.phase.value, len(piece))
            self._poll_return_path(0)
            self._advance_dirtier()

    def _throttle(self, size: int) -> None:
        """Wait until the cap allows ``size`` more bytes, serving the return path meanwhile."""
        cap = self.plan.bandwidth
        if cap is None:
            return
        while True:
            elapsed = time.monotonic() - self.report.started
            ahead = (self._sent + size) / cap - elapsed
            if ahead <= 0:
                return
            self._poll_return_path(ahead)

    def _poll_return_path(self, timeout: float) -> None:
        ready, _, _ = select.select([self.connection], [], [], timeout)
        if not ready:
            return
        count = self.connection.recv_into(self._rp_buffer)
        if count == 0:
            self.source.receive_eof()
            return
        self.source.receive_data(bytes(self._rp_buffer[:count]))
        while (event := self.source.next_event()) is not NEED_DATA:
            if isinstance(event, ev.RequestReceived):
                self.report.requests.append((time.monotonic(), event.block, event.start))

    def stats(self) -> dict[str, Any]:
        return vars(self.source.stats)
