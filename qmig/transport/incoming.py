"""Which incoming connection is the migration: the one that says so first.

A listening destination may be reached by anything: a port scanner, a client that connects
and sends nothing, garbage, and the real source, in any order. As QEMU's incoming side does,
qmig looks at each connection's first bytes to know what it is: a migration's main channel
starts with the stream header (magic and version, from the profile). A postcopy-preempt
channel opens with no bytes of its own: it is the next connection once the main one exists
(:meth:`Acceptor.take_next`), as QEMU takes it. Multifd channels open with a handshake of
their own (its magic and version, :func:`accept_multifd`), and may come before the main one.

:class:`Acceptor` accepts every pending connection at once (up to ``max_pending``; past
that, the one waiting longest is dropped), reads their opening bytes concurrently with one
poll loop, closes a connection as soon as its bytes cannot start any channel (garbage) or it
has said nothing valid within ``handshake_timeout`` (silent), and hands over the first that
matches. The bytes it read are not lost: the returned connection reads them first.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from qmig.errors import TransportError
from qmig.transport.connection import Connection, Listener, _tune, describe

HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING = 16


@dataclass(frozen=True)
class ChannelRule:
    """A kind of channel and the bytes it opens with."""

    kind: str  # "main", "multifd"
    opening: bytes


@dataclass
class _Pending:
    sock: socket.socket
    since: float
    got: bytearray = field(default_factory=bytearray)


@dataclass
class Refusals:
    """What the acceptor closed while it waited: for the message when nothing matched."""

    silent: int = 0
    garbage: int = 0
    closed: int = 0  # hung up before saying anything valid
    evicted: int = 0  # dropped to make room for a newer connection

    def __str__(self) -> str:
        parts = [
            f"{count} {label}"
            for count, label in (
                (self.silent, "no header in time"),
                (self.garbage, "not a migration stream"),
                (self.closed, "closed early"),
                (self.evicted, "dropped for newer ones"),
            )
            if count
        ]
        return ", ".join(parts) if parts else "none"


class Acceptor:
    """Accepts connections on a listening socket and sorts them by their opening bytes."""

    def __init__(
        self,
        uri: str,
        sock: socket.socket,
        rules: list[ChannelRule],
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.uri = uri
        self._listening = sock
        self.rules = rules
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.refusals = Refusals()
        self._pending: dict[int, _Pending] = {}
        self._matched: dict[str, list[Connection]] = {}
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._longest = max(len(rule.opening) for rule in rules)

    def wait(self, kind: str, timeout: float | None) -> Connection:
        """The first connection of ``kind``; TransportError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._listening.setblocking(False)
        while not self._matched.get(kind):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TransportError(
                    self.uri,
                    f"accept timeout {timeout:g} s: no connection opened a migration stream "
                    f"(closed: {self.refusals})",
                )
            self._expire(now)
            waits = [0.5]
            if deadline is not None:
                waits.append(deadline - now)
            if self._pending:
                oldest = min(pending.since for pending in self._pending.values())
                waits.append(oldest + self.handshake_timeout - now)
            for fd, _events in self._poller.poll(max(0.0, min(waits)) * 1000):
                if fd == self._listening.fileno():
                    self._accept_all()
                elif fd in self._pending:
                    self._read_opening(fd)
        return self._matched[kind].pop(0)

    def take_next(self, timeout: float | None) -> Connection:
        """The next connection after those handed over, whatever it opens with: a channel
        with no opening of its own (postcopy-preempt's) is known by its order alone, as
        QEMU's destination knows it. One already accepted and waiting comes first (the
        earliest); TransportError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._listening.setblocking(False)
        while not self._pending:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TransportError(self.uri, f"no further connection within {timeout:g} s")
            wait = 0.5 if deadline is None else min(0.5, deadline - now)
            ready = select.select([self._listening], [], [], max(0.0, wait))[0]
            if ready:
                self._accept_all()
        fd = min(self._pending, key=lambda fd: self._pending[fd].since)
        pending = self._pending.pop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(fd)
        pending.sock.setblocking(True)
        _tune(pending.sock)
        return Connection(self.uri, sock=pending.sock, prefix=bytes(pending.got))

    def close(self) -> None:
        """Close every connection not handed over."""
        for fd in list(self._pending):
            self._drop(fd)
        for connections in self._matched.values():
            for connection in connections:
                connection.close()
        self._matched.clear()

    # --- inside -------------------------------------------------------------------------

    def _accept_all(self) -> None:
        while True:
            try:
                sock, _peer = self._listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                raise TransportError(self.uri, describe(error)) from None
            if len(self._pending) >= self.max_pending:
                oldest = min(self._pending, key=lambda fd: self._pending[fd].since)
                self._drop(oldest)
                self.refusals.evicted += 1
            sock.setblocking(False)
            self._pending[sock.fileno()] = _Pending(sock, time.monotonic())
            self._poller.register(sock, select.POLLIN)

    def _read_opening(self, fd: int) -> None:
        pending = self._pending[fd]
        try:
            data = pending.sock.recv(self._longest - len(pending.got))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            self.refusals.closed += 1
            return
        pending.got += data
        possible = [rule for rule in self.rules if rule.opening.startswith(bytes(pending.got))]
        done = [rule for rule in self.rules if pending.got.startswith(rule.opening)]
        if done:
            self._hand_over(fd, done[0])
        elif not possible:
            self._drop(fd)
            self.refusals.garbage += 1

    def _hand_over(self, fd: int, rule: ChannelRule) -> None:
        pending = self._pending.pop(fd)
        self._poller.unregister(fd)
        sock = pending.sock
        sock.setblocking(True)
        _tune(sock)
        connection = Connection(self.uri, sock=sock, prefix=bytes(pending.got))
        self._matched.setdefault(rule.kind, []).append(connection)

    def _expire(self, now: float) -> None:
        for fd, pending in list(self._pending.items()):
            if now - pending.since >= self.handshake_timeout:
                self._drop(fd)
                self.refusals.silent += 1

    def _drop(self, fd: int) -> None:
        pending = self._pending.pop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(fd)
        pending.sock.close()


def _main_and_acceptor(
    listener: Listener,
    rules: list[ChannelRule],
    timeout: float | None,
    handshake_timeout: float,
    max_pending: int,
) -> tuple[Connection, Acceptor]:
    """The main channel, and the acceptor (on ``listener``'s socket, with ``rules``) that
    took it; the acceptor is closed if no main channel comes."""
    assert listener.socket is not None
    acceptor = Acceptor(
        listener.uri,
        listener.socket,
        rules,
        handshake_timeout=handshake_timeout,
        max_pending=max_pending,
    )
    try:
        return acceptor.wait("main", timeout), acceptor
    except BaseException:
        acceptor.close()
        raise


def _main_rules(openings: Sequence[bytes]) -> list[ChannelRule]:
    return [ChannelRule("main", opening) for opening in dict.fromkeys(openings)]


def accept_channels(
    listener: Listener,
    openings: Sequence[bytes],
    timeout: float | None,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_pending: int = MAX_PENDING,
) -> tuple[Connection, Acceptor]:
    """As :func:`accept_migration`, for a migration of several channels: the main one, and
    the acceptor that goes on taking the next ones (``take_next``) on the same listening
    socket. The caller closes the acceptor (a socket listener only)."""
    return _main_and_acceptor(
        listener, _main_rules(openings), timeout, handshake_timeout, max_pending
    )


def accept_multifd(
    listener: Listener,
    openings: Sequence[bytes],
    multifd_openings: Sequence[bytes],
    timeout: float | None,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_pending: int = MAX_PENDING,
) -> tuple[Connection, Acceptor]:
    """As :func:`accept_channels`, for a multifd migration: the main channel (a stream
    header) and the acceptor whose ``wait("multifd", timeout)`` hands over each connection
    that opened with a multifd handshake's magic and version, in the order they came (QEMU
    peeks at the same bytes). The caller closes the acceptor (a socket listener only)."""
    if listener.socket is None:
        raise TransportError(listener.uri, "multifd needs a socket: it opens several channels")
    rules = _main_rules(openings)
    rules += [ChannelRule("multifd", opening) for opening in dict.fromkeys(multifd_openings)]
    return _main_and_acceptor(listener, rules, timeout, handshake_timeout, max_pending)


def accept_migration(
    listener: Listener,
    openings: Sequence[bytes],
    timeout: float | None,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_pending: int = MAX_PENDING,
) -> Connection:
    """The first connection to ``listener`` that opens with one of ``openings`` (a migration
    stream's header: one per profile qmig may read it with); every other connection accepted
    meanwhile is closed. A ``file:`` listener just opens its file."""
    if listener.socket is None:
        return listener.accept(timeout)
    connection, acceptor = _main_and_acceptor(
        listener, _main_rules(openings), timeout, handshake_timeout, max_pending
    )
    acceptor.close()
    return connection
