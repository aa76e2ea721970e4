"""A source that misbehaves on purpose: the fault knobs of ``qmig replay``
(``--stall-after``, ``--cut-after-pages``, ``--corrupt``), for projects that test how a
destination copes with a bad source.

:class:`MisbehavingSourceConnection` stands in for the stream's channel, so the source runner
needs no change. To find a command or count pages it follows what goes out with a
:class:`~qmig.wire.reader.StreamReader` of its own, fed before the bytes leave: a command is
corrupted in the piece that carries its header, before that piece is sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from qmig.errors import QmigError, TransportError
from qmig.transport import Connection, ConnectionProxy
from qmig.wire import messages as m
from qmig.wire.reader import NEED_DATA, StreamReader
from qmig.wire.reading.records import Record

# The commands a source can be told to corrupt, by QEMU's names (MIG_CMD_*).
CORRUPTIBLE: dict[str, tuple[type, ...]] = {
    "OPEN_RETURN_PATH": (m.OpenReturnPath,),
    "PING": (m.Ping,),
    "POSTCOPY_ADVISE": (m.PostcopyAdvise,),
    "POSTCOPY_RAM_DISCARD": (m.PostcopyRamDiscard, m.PostcopyRamDiscards),
    "POSTCOPY_LISTEN": (m.PostcopyListen,),
    "POSTCOPY_RUN": (m.PostcopyRun,),
    "PACKAGED": (m.Packaged,),
}
# The length a corrupted command claims: no command of the protocol has a 1-byte payload, so
# QEMU's destination refuses it at the command ("received with bad length", or the variable
# ones' "invalid length").
CORRUPT_LENGTH = 1


@dataclass
class SourceMisbehaviour:
    """What to do wrong. ``stall_for``: seconds a stall lasts (None: for good)."""

    version: str | None = None  # the stream's profile, to follow it
    stall_after: int | None = None  # bytes sent
    stall_for: float | None = None
    cut_after_pages: int | None = None  # postcopy pages sent, then the channel is closed
    corrupt: str | None = None

    def __post_init__(self) -> None:
        if self.corrupt is not None and self.corrupt not in CORRUPTIBLE:
            raise ValueError(f"cannot corrupt {self.corrupt!r}: one of {', '.join(CORRUPTIBLE)}")

    @property
    def active(self) -> bool:
        return any(
            value is not None for value in (self.stall_after, self.cut_after_pages, self.corrupt)
        )

    def wrap(self, connection: Connection) -> Connection:
        """``connection`` (the first channel), misbehaving as asked."""
        return cast("Connection", MisbehavingSourceConnection(connection, self))


class MisbehavingSourceConnection(ConnectionProxy):
    """A stream channel that stalls, corrupts a command or is cut, as asked; everything else
    goes to the connection. Writes are whole: a piece is followed before it is sent."""

    def __init__(self, connection: Connection, misbehaviour: SourceMisbehaviour) -> None:
        super().__init__(connection)
        self._misbehaviour = misbehaviour
        self._sent = 0
        follow = misbehaviour.corrupt is not None or misbehaviour.cut_after_pages is not None
        self._reader = StreamReader(misbehaviour.version) if follow else None
        self._fed = 0
        self._targets = CORRUPTIBLE.get(misbehaviour.corrupt or "", ())
        self._corrupted = False
        self._postcopy = False
        self._pages = 0
        self._stalled = False

    def send_some(self, data: Any) -> int:
        self.sendall(data)
        return len(data)

    def sendall(self, data: Any) -> None:
        out = bytearray(data)
        cut = self._follow(out)
        self._send(out)
        if cut:
            self._connection.close()
            raise TransportError(self._connection.name, "channel cut on purpose")

    def _send(self, out: bytearray) -> None:
        limit = self._misbehaviour.stall_after
        if limit is not None and not self._stalled and self._sent + len(out) >= limit:
            before = limit - self._sent
            self._connection.sendall(out[:before])
            self._sent += before
            self._stalled = True
            self._stall()
            out = out[before:]
        self._connection.sendall(out)
        self._sent += len(out)

    def _stall(self) -> None:
        stall_for = self._misbehaviour.stall_for
        if stall_for is None:
            while True:  # for good: the process ends it
                time.sleep(3600)
        time.sleep(stall_for)

    # --- following the stream -----------------------------------------------------------

    def _follow(self, out: bytearray) -> bool:
        """Corrupt the wanted command if its header is in ``out``; True: cut after sending."""
        reader = self._reader
        if reader is None:
            return False
        at = self._fed
        reader.feed(bytes(out))
        self._fed += len(out)
        cut = False
        try:
            while isinstance(record := reader.next_record(), Record):
                self._corrupt_at(record.offset, out, at, isinstance(record.message, self._targets))
                cut = self._count(record) or cut
            if record is NEED_DATA:
                self._corrupt_at(reader.offset, out, at, self._pending_is_target(out, at))
        except QmigError:
            self._reader = None  # a stream qmig cannot follow: no more knobs that need it
        return cut

    def _pending_is_target(self, out: bytearray, at: int) -> bool:
        """Whether the record not yet complete, whose header may already be in ``out``, is
        the wanted command (the reader returns it only once it is whole)."""
        reader = self._reader
        if not self._targets or reader is None or self._corrupted:
            return False
        start = reader.offset - at
        schema = reader.schema
        head = out[start : start + schema.command_header_size]
        if start < 0 or len(head) < schema.command_header_size:
            return False
        try:
            header = schema.command_header.parse(bytes(head))
        except Exception:  # construct's errors: not a command
            return False
        name = reader.profile.command_names.get(header.cmd)
        return name is not None and name == self._misbehaviour.corrupt

    def _corrupt_at(self, offset: int, out: bytearray, at: int, wanted: bool) -> None:
        if not wanted or self._corrupted or self._reader is None:
            return
        schema = self._reader.schema
        start = offset - at
        if start < 0 or start + schema.command_header_size > len(out):
            return  # its header already left: too late for this one
        header = schema.command_header.parse(bytes(out[start : start + schema.command_header_size]))
        out[start : start + schema.command_header_size] = schema.command_header.build(
            {"cmd": header.cmd, "len": CORRUPT_LENGTH}
        )
        self._corrupted = True

    def _count(self, record: Record) -> bool:
        """Count postcopy pages; True once the cut is due."""
        limit = self._misbehaviour.cut_after_pages
        if isinstance(record.message, m.PostcopyRun):
            self._postcopy = True
        elif self._postcopy and isinstance(record.message, m.RamPageRun):
            self._pages += record.message.count
        return limit is not None and self._postcopy and self._pages >= limit
