"""The source runner's side of the C answer thread (:mod:`qmig.runner.answer`): when it takes
the return path over and when it stops, when the runner's loop holds it off, and what it
answered, for the machine, the cap's window and the report.

The thread answers on the 8.0 preempt variant's channel, or, without preempt, on the main
channel between the pieces of stream the loop writes (each piece is built and written holding
the channel, :meth:`AnswerControl.turn`). A pause stops it; once the migration is back in
postcopy on the new channels, a new thread takes the return path over at the first byte that
starts a message. The pre-7.2 preempt variant has no thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.runner.answer import Answered, AnswerTimes, FastAnswer
from qmig.runner.cap_window import CapWindow
from qmig.runner.channels import PREEMPT, Channels
from qmig.runner.misbehave_source import MisbehavingSourceConnection
from qmig.runner.source_report import SourceReport
from qmig.transport import Connection


class AnswerControl:
    """The answer thread of one migration's source, if ``enabled`` (``SourcePlan.fast_answer``).
    ``window``: the cap's, which the thread's main-channel pages count in (and its preempt
    ones, where the profile's rate limit counts every channel); ``await_room``:
    the loop's wait for room in the main channel's socket (reading the return path
    meanwhile); ``stall_timeout``: the main-channel thread's bound on a socket that takes
    nothing."""

    def __init__(
        self,
        source: Source,
        channels: Channels,
        report: SourceReport,
        window: CapWindow,
        *,
        enabled: bool,
        stall_timeout: float,
        await_room: Callable[[], None],
    ) -> None:
        self._source = source
        self._channels = channels
        self._report = report
        self._window = window
        self._enabled = enabled
        self._stall_timeout = stall_timeout
        self._await_room = await_room
        self.fast: FastAnswer | None = None
        # Requests the C thread answered, taken by the runner as the machine reports the
        # requests (:meth:`answered`).
        self._times = AnswerTimes()
        # The thread is to (re)start as soon as the return path is between messages: set at
        # the switchover and after each recovery, cleared once it runs.
        self.wanted = False
        self._holding = False  # inside turn() or picking(): the wire is this loop's
        self._turn: FastAnswer | None = None  # the thread whose wire turn() holds

    @property
    def main(self) -> bool:
        """Does the thread answer on the main channel (no preempt)?"""
        return self.fast is not None and self.fast.main

    def want(self, phase: SourceState) -> None:
        """Postcopy (again): the thread answers from the first return-path byte that starts
        a message, now or after a later read (:meth:`start`)."""
        preempt = self._source.preempt
        # The pre-7.2 variant's urgent pages are the migration thread's (QEMU 7.2), and its
        # preempt channel ends with this loop's EOS: no thread writes there.
        if self._enabled and (preempt is None or not preempt.opened_at_setup):
            self.wanted = True
            self.start(phase)

    def start(self, phase: SourceState) -> None:
        """The thread answers from now on, if it is wanted and can take the return path over
        from the next byte."""
        connection = self._channels.main
        if (
            not self.wanted
            or self.fast is not None
            or phase is not SourceState.POSTCOPY  # past it, every page is out already
            or connection.unread_prefix
            or not self._source.return_path_between_messages
        ):
            return
        if self._source.preempt is None:
            # The thread writes the socket itself: not through a connection that changes
            # what it sends on purpose, nor to a file.
            if isinstance(connection, MisbehavingSourceConnection) or connection.socket is None:
                self.wanted = False
                return
            self.fast = FastAnswer(
                self._source, connection, None, stall_timeout=self._stall_timeout
            )
            self._count_start()
            return
        channel = self._channels.get(PREEMPT)
        if channel is None:
            return
        self.fast = FastAnswer(self._source, connection, channel)
        self._count_start()
        # While the thread writes on the channel, the machine's own preempt records name
        # their block: the channel's last block may be one the thread named since.
        self._source.forget_preempt_block()

    def _count_start(self) -> None:
        self.wanted = False
        totals = self._report.fast_answer
        totals["started"] = totals.get("started", 0) + 1  # once, and again per recovery

    def pause(self) -> None:
        """The channel broke: no thread on the channels of the recovered migration."""
        self.wanted = False
        self.stop()
        # Timings of pages whose request the thread read and this loop never did (its bytes
        # went with the pipe): no request of the recovered migration may take them.
        self._times.clear()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Build and write a piece of main-channel stream with the channel held: the C thread
        answering there (no preempt) writes only between pieces. What it wrote so far the
        machine learns first, so that its records follow on right (its next one names its
        block) and do not send a page again."""
        if self.fast is not None and self.fast.main:
            # Room in the socket first: held while it waits for room, the channel would keep
            # the thread's answer waiting behind a backlog it need not wait for.
            self._await_room()
        fast = self.fast  # the thread may have stopped meanwhile (the return path ended)
        if fast is None or not fast.main:
            yield
            return
        fast.hold()
        self._holding = True
        self._turn = fast
        done = False
        try:
            self.apply()
            yield
            done = True
        finally:
            if self._turn is fast:
                self._let_go(open_records=done and self._source.records_may_follow)

    def let_go(self) -> None:
        """Inside :meth:`turn`: the rest of the turn writes nothing, so the thread may answer
        from now on instead of waiting for the turn's end. The machine must learn what the
        turn wrote before it learns of the thread's answers (it does: those are applied at
        its next read of the return path, or its next turn)."""
        if self._turn is not None:
            self._let_go(open_records=self._source.records_may_follow)

    def _let_go(self, *, open_records: bool) -> None:
        fast, self._turn = self._turn, None
        self._holding = False
        window = self._window
        assert fast is not None
        fast.release(open_records=open_records, credit=window.credit(), window_end=window.end)

    @contextlib.contextmanager
    def picking(self) -> Iterator[None]:
        """With the preempt channel's thread: the machine picks pages from the dirty map
        (and learns what the thread sent) with the thread held off, so that no page goes out
        on both channels (QEMU clears a page's dirty bit under its bitmap lock, from either
        thread). Held for the picking only: the main channel's write does not hold the
        thread's answers back."""
        fast = self.fast
        if fast is None or fast.main:
            yield
            return
        fast.hold()
        self._holding = True
        try:
            self.apply()
            yield
        finally:
            self._holding = False
            fast.release(open_records=False, credit=None, window_end=0.0)

    def read_into(self, buffer: bytearray, connection: Connection) -> int:
        """The return path's next bytes into ``buffer`` (0 at its end): from the thread,
        what it answered applied first, or from ``connection``."""
        fast = self.fast
        count = 0 if fast is None else fast.read_into(buffer)
        if fast is not None and count:
            self.apply()  # before the machine reads the requests: they are answered
        elif fast is not None:
            # The thread met the socket's end or an error and ended (the pipe's end is its
            # last act), so joining it waits for nothing, wire held or not; this loop meets
            # the socket's end there too.
            self._join()
            count = connection.recv_into(buffer)
        else:
            count = connection.recv_into(buffer)
        return count

    def write(self, data: bytes) -> bool:
        """Preempt pages of requests the thread left to the machine, written through the
        thread; False: no thread."""
        if self.fast is None:
            return False
        self.fast.write(data)
        self._source.forget_preempt_block()
        return True

    def stop(self) -> None:
        """Join the thread; what it wrote is the machine's to know. The return path's bytes
        it read and this loop did not are lost with the channel it stops for (a pause, or
        the end). Never from inside :meth:`turn` or :meth:`picking`: the thread may be
        waiting for the wire they hold, and would never be joined."""
        assert self.fast is None or not self._holding, "answer thread stopped, wire held"
        self._join()

    def _join(self) -> None:
        fast = self.fast
        if fast is None:
            return
        self.fast = None
        self._note(fast.stop(), main=fast.main)
        if not fast.main:
            self._report.preempt_bytes += fast.bytes
        totals = self._report.fast_answer
        totals["pages"] = totals.get("pages", 0) + fast.pages
        totals["declined"] = totals.get("declined", 0) + fast.declined

    def apply(self) -> None:
        assert self.fast is not None
        self._note(self.fast.apply(), main=self.fast.main)

    def answered(self, block: str, start: int) -> tuple[int, int, bool] | None:
        """When the thread read the request for ``block`` at ``start`` and wrote its last
        page (ns), and whether its pages had all gone out before (the thread wrote none),
        if it answered it; each answer is taken once."""
        return self._times.take(block, start)

    def _note(self, answered: list[Answered], *, main: bool) -> None:
        if not answered:
            return
        if not main:
            self._source.forget_preempt_block()
        for page in answered:
            self._window.count(page.bytes, preempt=not main, written=page.sent_ns / 1e9)
            self._times.add(page)
