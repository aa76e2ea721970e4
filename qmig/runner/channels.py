"""The connections of one migration, owned in one place.

A migration has a main channel (the stream one way, the return path the other). Postcopy
recovery replaces it: the broken one is closed and a new one is opened (the source connects
again, the destination accepts again). Postcopy-preempt and multifd add channels of their
own; they belong here too, so that a runner asks this object for a channel and never opens
or closes sockets itself.

On the accepting end a channel with no opening bytes of its own (postcopy-preempt's) is known
by its order: the next connection once the main one exists. In a recovery that order alone
can mislead: when a resumed main channel breaks during its handshake, the source's next main
channel may arrive before the destination has noticed the break, while it waits for the
preempt channel. QEMU's paused destination takes a connection as its main one while it has
none; here a connection accepted as another kind while the main channel is already gone
(reset, shut down or closed: the kernel says so before it accepts the source's next
connection, which the source opens only after the break) is set aside as the next main
channel instead (:meth:`Channels.open`), and :meth:`Channels.reopen` takes it first.

It also cuts a channel on purpose, as a broken network would (fault injection for
``qmig simulate --pause-after`` and the replay's ``--pause-after``): the socket is closed
with SO_LINGER 0, so the peer sees a reset and whatever was still queued is lost.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from qmig.errors import TransportError
from qmig.transport import Connection

RETRY_INTERVAL = 0.1  # between connection attempts while the peer is not listening yet


Opener = Callable[[float], Connection]  # opens a channel within a timeout, or TransportError

PREEMPT = "preempt"
# What poll() says of a socket whose peer reset it, shut it down or closed it.
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL | select.POLLRDHUP


class Channels:
    """The main channel of a migration, its other channels by kind, and how to open them."""

    def __init__(
        self,
        main: Connection,
        reopen: Opener | None = None,
        openers: dict[str, Opener] | None = None,
        *,
        adopt: Callable[[Connection], Connection] | None = None,
    ) -> None:
        """``reopen(timeout)`` opens a replacement main channel (connects or accepts) within
        ``timeout`` seconds or raises TransportError; None: the migration cannot recover.
        ``openers``: how to open each further kind of channel (``"preempt"``; multifd's
        would be more of the same), connecting on a source, accepting on a destination.
        ``adopt``: on an accepting end, makes a connection accepted by another kind's opener
        the main channel (the wrapping ``reopen`` gives its own); with it, a connection that
        arrives while the main channel is gone is taken as the next main one."""
        self.main = main
        self.reopen_channel = reopen
        self.openers = dict(openers or {})
        self.adopt = adopt
        self.others: dict[str, Connection] = {}
        self.opened = 1
        self._next_main: deque[Connection] = deque()  # accepted while the main one was gone

    def open(self, kind: str, timeout: float, *, by_order: bool = False) -> Connection:
        """Open the channel of ``kind`` (closing one of that kind still open). On an
        accepting end, a preempt connection that arrives while the main channel is gone is
        set aside as the next main channel, and TransportError says so. (Only preempt: it has
        no opening bytes of its own, while multifd's handshake tells its channels apart, and
        a multifd channel may still arrive after the main stream has ended.) ``by_order``:
        the source opens this channel right after the main one, so the next connection is
        it even when that main channel is gone already (the pre-7.2 preempt variant)."""
        opener = self.openers.get(kind)
        if opener is None:
            raise TransportError(self.main.name, f"no way to open a {kind} channel")
        self.close(kind)
        connection = opener(timeout)
        if kind == PREEMPT and not by_order and self.adopt is not None and self.main_gone():
            self._next_main.append(connection)
            raise TransportError(
                self.main.name,
                f"a connection came while the main channel was down: it is the next main "
                f"channel, not the {kind} one",
            )
        self.others[kind] = connection
        return connection

    def turned_out_main(self, kind: str, connection: Connection) -> None:
        """The channel taken as ``kind`` showed by its first bytes that it is the source's
        next main channel: it is set aside for the reopen, as :meth:`open` sets aside one
        that came while the main channel was gone (``connection``: it, those bytes first)."""
        self.others.pop(kind, None)
        self._next_main.append(connection)

    def main_gone(self) -> bool:
        """Has the main channel been reset, shut down or closed (at either end)?"""
        sock = self.main.socket
        if sock is None:
            return False  # a file: it has no peer to lose
        if sock.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)
        return any(events & _GONE for _fd, events in poller.poll(0))

    def get(self, kind: str) -> Connection | None:
        return self.others.get(kind)

    def close(self, kind: str) -> None:
        connection = self.others.pop(kind, None)
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.close()

    def close_all(self) -> None:
        for kind in list(self.others):
            self.close(kind)
        while self._next_main:
            with contextlib.suppress(OSError):
                self._next_main.popleft().close()
        self.close_main()

    def _take_next_main(self, timeout: float) -> Connection | None:
        """The first connection set aside as the next main channel that is not one the
        source closed without a byte. Set aside by the socket state alone, a connection may
        be a preempt channel the source opened before the break and the destination came to
        accept only after it: the source closes that one at its pause, while its next main
        channel begins with RECV_BITMAP at once; so each waits (within ``timeout``) for a
        first byte or its end."""
        deadline = time.monotonic() + timeout
        while self._next_main:
            candidate = self._next_main.popleft()
            if not _ended_before_a_byte(candidate, max(0.0, deadline - time.monotonic())):
                return candidate
            with contextlib.suppress(OSError):
                candidate.close()
        return None

    @property
    def can_reopen(self) -> bool:
        return self.reopen_channel is not None

    def cut(self) -> None:
        """Break the main channel abruptly, both directions (the peer sees a reset)."""
        sock = self.main.socket
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.main.close()

    def close_main(self) -> None:
        with contextlib.suppress(OSError):
            self.main.close()

    def reopen(self, timeout: float) -> Connection:
        """Close the main channel and open its replacement (TransportError on failure): the
        connection set aside as the next main channel, if one came already."""
        if self.reopen_channel is None:
            raise TransportError(self.main.name, "no way to open a new channel")
        self.close_main()
        deadline = time.monotonic() + timeout
        candidate = self._take_next_main(timeout)
        if candidate is not None and self.adopt is not None:
            self.main = self.adopt(candidate)
        else:
            self.main = self.reopen_channel(max(0.0, deadline - time.monotonic()))
        self.opened += 1
        return self.main


def connect_with_retries(
    connect: Callable[[float], Connection], timeout: float
) -> Callable[[float], Connection]:
    """A ``reopen`` that connects again and again until the peer listens (QEMU's destination
    listens only once it is told ``migrate-recover``), for at most ``timeout`` seconds."""

    def reopen(_timeout: float) -> Connection:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return connect(max(0.1, deadline - time.monotonic()))
            except TransportError as error:
                if time.monotonic() + RETRY_INTERVAL >= deadline:
                    raise TransportError(
                        error.what, f"{error.detail} (no new channel within {timeout:g} s)"
                    ) from None
                time.sleep(RETRY_INTERVAL)

    return reopen


@dataclass
class CutPlan:
    """When to break the channel on purpose: after ``after_pages`` postcopy pages, then
    again every ``after_pages`` more, ``pauses`` times in all; ``during_recovery``: also
    break the first recovery's new channel once, after the bitmaps were asked for (QEMU's
    double failure)."""

    after_pages: int
    pauses: int = 1
    during_recovery: bool = False
    done: int = 0
    recovery_cut: bool = False

    def due(self, postcopy_pages: int) -> bool:
        return self.done < self.pauses and postcopy_pages >= self.after_pages * (self.done + 1)

    def cut_recovery_now(self) -> bool:
        if self.during_recovery and not self.recovery_cut:
            self.recovery_cut = True
            return True
        return False


def _ended_before_a_byte(connection: Connection, timeout: float) -> bool:
    """Did the peer close ``connection`` in order before sending anything? (Nothing yet
    within ``timeout``: no, as bytes may still come.)"""
    sock = connection.socket
    if connection.unread_prefix or sock is None:
        return False
    if not select.select([sock], [], [], timeout)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return False  # reset: the migration's own error path says so
