"""A destination that misbehaves on purpose, as real destinations can: the fault knobs of
``qmig receive`` (``--reject``, ``--stall-after``, ``--stall-after-pages``, ``--delay-requests``,
``--shut-status``), for projects that test how their migration code copes with a bad peer.

Two pieces do it, and the runner needs no change: :class:`MisbehavingDestination`, the
protocol machine with a few of its decisions turned (a command refused, SHUT's status,
pages counted), and :class:`MisbehavingConnection`, which stands in for the channel and
stops reading or holds page requests back. The machine tells the connection when to stall
through the shared :class:`Misbehaviour`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

from qmig.errors import IllegalStateError, RemoteProtocolError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.states import destination_refusal
from qmig.transport import Connection, ConnectionProxy
from qmig.wire import messages as m
from qmig.wire.reading.records import Record

# The commands a destination can be told to refuse, by QEMU's names (MIG_CMD_*), and the
# messages that carry them.
REJECTABLE: dict[str, tuple[type, ...]] = {
    "OPEN_RETURN_PATH": (m.OpenReturnPath,),
    "PING": (m.Ping,),
    "POSTCOPY_ADVISE": (m.PostcopyAdvise,),
    "POSTCOPY_RAM_DISCARD": (m.PostcopyRamDiscard, m.PostcopyRamDiscards),
    "POSTCOPY_LISTEN": (m.PostcopyListen,),
    "POSTCOPY_RUN": (m.PostcopyRun,),
    "POSTCOPY_RESUME": (m.PostcopyResume,),
    "RECV_BITMAP": (m.RecvBitmap,),
}

# What QEMU's handlers say when they fail on a well-formed command (other than the postcopy
# ones' state checks).
_FAILURES = {
    "OPEN_RETURN_PATH": "failed (the return path could not be opened)",
    "PING": "received with no return path",
    "RECV_BITMAP": "block not found",
}


@dataclass
class Misbehaviour:
    """What to do wrong. ``stall_for``: how long a stall lasts (None: for good, until the
    process ends); ``delay_requests``: seconds each page request is held back."""

    reject: str | None = None
    stall_after: int | None = None  # bytes read
    stall_after_pages: int | None = None  # pages placed
    stall_for: float | None = None
    delay_requests: float = 0.0
    shut_status: int | None = None
    stalled: threading.Event = field(default_factory=threading.Event, repr=False)
    _stalls_left: int = field(default=1, repr=False)
    _request_pending: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        if self.reject is not None and self.reject not in REJECTABLE:
            raise ValueError(f"cannot reject {self.reject!r}: one of {', '.join(REJECTABLE)}")

    @property
    def active(self) -> bool:
        return any(
            (
                self.reject,
                self.stall_after is not None,
                self.stall_after_pages is not None,
                self.delay_requests,
                self.shut_status is not None,
            )
        )

    def stall_now(self) -> None:
        if self._stalls_left:
            self._stalls_left -= 1
            self.stalled.set()

    def request_queued(self) -> None:
        """A page request was just queued on this thread: hold its send back."""
        if self.delay_requests:
            self._request_pending.value = True

    def request_delay(self) -> float:
        """Seconds to hold this thread's send back (once per request queued)."""
        if not getattr(self._request_pending, "value", False):
            return 0.0
        self._request_pending.value = False
        return self.delay_requests

    def destination(self, *args: Any, **kwargs: Any) -> MisbehavingDestination:
        """The protocol machine (:class:`Destination`'s arguments), misbehaving as asked."""
        return MisbehavingDestination(*args, misbehaviour=self, **kwargs)

    def wrap(self, connection: Connection) -> Connection:
        """``connection``, misbehaving as asked (itself when nothing is asked of it)."""
        if self.stall_after is None and self.stall_after_pages is None and not self.delay_requests:
            return connection
        return cast("Connection", MisbehavingConnection(connection, self))


class MisbehavingDestination(Destination):
    """QEMU's incoming side, with the decisions :class:`Misbehaviour` asks for."""

    def __init__(self, *args: Any, misbehaviour: Misbehaviour, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.misbehaviour = misbehaviour
        self._refused = REJECTABLE.get(misbehaviour.reject or "", ())
        self._pages = 0

    def _handle(self, record: Record) -> None:
        if isinstance(record.message, self._refused):
            raise self._refusal(record)
        super()._handle(record)

    def _refusal(self, record: Record) -> RemoteProtocolError:
        """QEMU's error for the command where its handler fails: the postcopy commands as in
        a state that does not take them, the others with their handler's own failure."""
        name = self.misbehaviour.reject or ""
        if name.startswith("POSTCOPY_"):
            return IllegalStateError(
                name, destination_refusal(self.state), record.offset, state=self.state.name
            )
        return RemoteProtocolError(name, _FAILURES[name], record.offset)

    def next_event(self) -> ev.Event | ev.Sentinel:
        event = super().next_event()
        limit = self.misbehaviour.stall_after_pages
        if limit is not None and isinstance(event, ev.PagesReceived):
            self._pages += event.run.count
            if self._pages >= limit:
                self.misbehaviour.stall_now()
        return event

    def page_fault(self, block: str, offset: int) -> ev.PageRequested | None:
        asked = super().page_fault(block, offset)
        if asked is not None:
            self.misbehaviour.request_queued()  # the runner sends it next, on this thread
        return asked

    def _shut(self, status: int) -> None:
        if status == 0 and self.misbehaviour.shut_status is not None:
            status = self.misbehaviour.shut_status
        super()._shut(status)


class MisbehavingConnection(ConnectionProxy):
    """A channel that stops reading when the misbehaviour says so, and holds page requests
    back; everything else goes to the connection."""

    def __init__(self, connection: Connection, misbehaviour: Misbehaviour) -> None:
        super().__init__(connection)
        self._misbehaviour = misbehaviour
        self._read = 0

    def recv_into(self, buffer: Any, *args: Any) -> int:
        misbehaviour = self._misbehaviour
        if misbehaviour.stalled.is_set():
            self._stall()
        limit = misbehaviour.stall_after
        if limit is not None and self._read < limit:
            # Read no further than the stall point, so that the source's bytes past it stay
            # in the socket and its buffers fill as with a destination that stopped reading.
            buffer = memoryview(buffer)[: limit - self._read]
        count: int = self._connection.recv_into(buffer, *args)
        self._read += count
        if limit is not None and self._read >= limit:
            misbehaviour.stall_now()
        return count

    def _stall(self) -> None:
        misbehaviour = self._misbehaviour
        if misbehaviour.stall_for is None:
            while True:  # for good: the process ends it
                time.sleep(3600)
        time.sleep(misbehaviour.stall_for)
        misbehaviour.stalled.clear()

    def sendall(self, data: Any) -> None:
        delay = self._misbehaviour.request_delay()
        if delay:
            time.sleep(delay)
        self._connection.sendall(data)
