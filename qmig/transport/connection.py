"""Blocking byte streams for migration: TCP and UNIX sockets, and plain files.

A :class:`Connection` is what the protocol runner reads the stream from and writes the return
path to (both on the same connection, as QEMU does). Every OS failure comes out as a
:class:`~qmig.errors.TransportError` whose WHAT is the URI, e.g.
``tcp:127.0.0.1:4444: connection refused``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import select
import socket
from typing import Any

from qmig.errors import TransportError
from qmig.transport.limits import Limits, Meter
from qmig.transport.uri import Address, FileAddress, TcpAddress, UnixAddress, parse_uri

BEHIND_READ = 1 << 16

_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.EPIPE: "peer closed the connection",
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied",
    errno.EADDRNOTAVAIL: "address not available",
    errno.ETIMEDOUT: "timed out",
}


def describe(error: OSError) -> str:
    """A short lowercase reason for an OS error, without the errno number."""
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host: {error.strerror}"
    if isinstance(error, TimeoutError) and error.errno is None:
        return "timed out"
    if error.errno in _REASONS:
        return _REASONS[error.errno]
    return (error.strerror or str(error) or type(error).__name__).lower()


class Connection:
    """One end of a migration byte stream (a socket, or a file for one-way streams)."""

    def __init__(
        self,
        name: str,
        sock: socket.socket | None = None,
        file: io.BufferedIOBase | None = None,
        *,
        prefix: bytes = b"",
    ):
        """``prefix``: bytes already read from the socket (a listener examined them), which
        reads return first."""
        if (sock is None) == (file is None):
            raise ValueError("a Connection wraps exactly one socket or one file")
        self.name = name
        self.socket = sock
        self._file = file
        self._prefix = prefix
        self.meter: Meter | None = None

    def set_limits(self, limits: Limits) -> Meter:
        """Bound every read and blocked write from now on (see :mod:`qmig.transport.limits`);
        the returned meter's ``start()`` begins a new phase. Files are not bounded."""
        self.meter = Meter(self.name, limits, self.socket)
        return self.meter

    def fileno(self) -> int:
        if self.socket is not None:
            return self.socket.fileno()
        assert self._file is not None
        return self._file.fileno()

    @property
    def unread_prefix(self) -> bytes:
        """Bytes a listener already read from the socket to examine the connection, not yet
        handed out by :meth:`recv_into`: they come before anything still in the socket."""
        return self._prefix

    def recv_into(self, buffer: memoryview | bytearray) -> int:
        """Read up to ``len(buffer)`` bytes; 0 means the peer finished sending."""
        if self._prefix:
            count = min(len(buffer), len(self._prefix))
            buffer[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            if self.meter is not None:
                self.meter.got(count)
            return count
        meter = self.meter
        if meter is not None and self.socket is not None:
            return self._recv_bounded(buffer, meter)
        try:
            if self.socket is not None:
                return self.socket.recv_into(buffer)
            assert self._file is not None
            return self._file.readinto(buffer) or 0
        except OSError as error:
            raise TransportError(self.name, describe(error)) from None

    def received_elsewhere(self, count: int) -> None:
        """``count`` bytes of this connection were read by other code (the destination's C
        receive thread reads the socket itself): the limits count them as if read here."""
        if self.meter is not None and count:
            self.meter.got(count)

    def sent_elsewhere(self, count: int) -> None:
        """``count`` bytes were written to this connection's socket by other code (the
        source's C answer thread writes requested pages there itself): the limits count them
        as if sent here."""
        if self.meter is not None and count:
            self.meter.put(count)

    def _recv_bounded(self, buffer: memoryview | bytearray, meter: Meter) -> int:
        """recv_into, looking at every limit at least every WAIT_SLICE while it waits.

        The socket is polled first and read only once readable: a socket in timeout mode
        (``settimeout``) would otherwise wait inside Python for its own timeout."""
        assert self.socket is not None
        poller = select.poll()
        poller.register(self.socket, select.POLLIN)
        meter.begin_wait()
        try:
            while True:
                meter.check(reading=True)
                if not poller.poll(meter.wait_slice() * 1000):
                    continue
                # While the peer lags behind what it was sent, read in small pieces, so that
                # the limits are looked at again soon (a flood of tiny records takes seconds
                # per MiB to handle).
                size = min(len(buffer), BEHIND_READ) if meter.behind else len(buffer)
                try:
                    count = self.socket.recv_into(buffer, size, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as error:
                    raise TransportError(self.name, describe(error)) from None
                meter.end_wait()
                meter.got(count)
                return count
        finally:
            meter.end_wait()

    def recv_exactly(self, size: int) -> bytes:
        """Read exactly ``size`` bytes or raise TransportError (peer closed the connection)."""
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = self.recv_into(view[got:])
            if count == 0:
                raise TransportError(
                    self.name, f"peer closed the connection ({got} of {size} bytes read)"
                )
            got += count
        return bytes(buffer)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        if self.meter is not None and self.socket is not None:
            self._send_bounded(memoryview(data).cast("B"), self.meter)
            return
        try:
            if self.socket is not None:
                self.socket.sendall(data)
            else:
                assert self._file is not None
                self._file.write(data)
        except OSError as error:
            raise TransportError(self.name, describe(error)) from None

    def _send_bounded(self, data: memoryview, meter: Meter) -> None:
        """sendall, where a peer that takes nothing is noticed within the idle limit."""
        assert self.socket is not None
        poller = select.poll()
        try:
            poller.register(self.socket, select.POLLOUT)
        except ValueError:  # closed meanwhile by another thread (a channel given up)
            raise TransportError(self.name, "the connection was closed") from None
        while data:
            sent = 0
            if poller.poll(0) or poller.poll(meter.wait_slice() * 1000):
                try:
                    sent = self.socket.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                except OSError as error:
                    raise TransportError(self.name, describe(error)) from None
            meter.put(sent)
            data = data[sent:]
            if data:
                meter.check(reading=False)

    def send_some(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes now, without blocking; 0 when its buffer is full.

        A writer that must keep reading (the return path) selects for writability and sends
        with this, instead of blocking in sendall with the peer's requests unread.
        """
        try:
            if self.socket is not None:
                return self.socket.send(data, socket.MSG_DONTWAIT)
            assert self._file is not None
            return self._file.write(data)
        except BlockingIOError:
            return 0
        except OSError as error:
            raise TransportError(self.name, describe(error)) from None

    def limit_buffers(self, send: int | None = None, receive: int | None = None) -> None:
        """Cap the kernel's socket buffers (SO_SNDBUF / SO_RCVBUF); no-op for files.

        Bytes queued in socket buffers are bytes a requested page waits behind: with Linux's
        autotuning a loopback connection queues megabytes. See :func:`limit_buffers`.
        """
        if self.socket is not None:
            limit_buffers(self.socket, send=send, receive=receive)

    def shutdown_write(self) -> None:
        """Tell the peer nothing more will be sent, keep reading (a file is just flushed)."""
        try:
            if self.socket is not None:
                self.socket.shutdown(socket.SHUT_WR)
            else:
                assert self._file is not None
                self._file.flush()
        except OSError as error:
            if error.errno != errno.ENOTCONN:  # the peer is already gone: nothing to tell
                raise TransportError(self.name, describe(error)) from None

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
        elif self._file is not None:
            self._file.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ConnectionProxy:
    """Stands in for a :class:`Connection`, changing some of what it does (counting what
    crosses it for a report, stalling or delaying on purpose) and passing everything else on.
    Subclasses override the calls they change."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def fileno(self) -> int:  # select() asks for it directly
        fd: int = self._connection.fileno()
        return fd

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self._connection.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


class Listener:
    """A bound, listening socket (or, for ``file:``, the file an incoming side reads)."""

    def __init__(self, address: Address, sock: socket.socket | None) -> None:
        if isinstance(address, TcpAddress) and sock is not None:
            # For tcp:HOST:0, remember the port the kernel chose (also after close()).
            address = TcpAddress(address.host, sock.getsockname()[1])
        self.address = address
        self.socket = sock

    @property
    def uri(self) -> str:
        return str(self.address)

    def accept(self, timeout: float | None = None) -> Connection:
        if isinstance(self.address, FileAddress):
            return _open_file(self.address, writing=False)
        assert self.socket is not None
        self.socket.settimeout(timeout)
        try:
            sock, _peer = self.socket.accept()
        except OSError as error:
            raise TransportError(self.uri, describe(error)) from None
        sock.settimeout(None)
        _tune(sock)
        return Connection(self.uri, sock=sock)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            if isinstance(self.address, UnixAddress):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address.path)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def limit_buffers(sock: socket.socket, send: int | None = None, receive: int | None = None) -> None:
    """Set SO_SNDBUF / SO_RCVBUF, which also turns the kernel's autotuning off for them.

    Linux doubles the value for its bookkeeping. A receive buffer must be set before the
    connection is made (on a listening socket: inherited by the accepted one) to bound the
    window scale it advertises.
    """
    try:
        if send is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send)
        if receive is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive)
    except OSError as error:
        raise TransportError("socket buffers", describe(error)) from None


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Return-path messages are small and latency-bound (page requests).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _open_file(address: FileAddress, writing: bool) -> Connection:
    handle: io.BufferedIOBase
    try:
        # Owned by the returned Connection, which closes it.
        handle = open(address.path, "wb") if writing else open(address.path, "rb")  # noqa: SIM115
    except OSError as error:
        raise TransportError(str(address), describe(error)) from None
    return Connection(str(address), file=handle)


def listen(uri: str | Address, backlog: int = 16) -> Listener:
    """Bind and listen on ``uri`` (``tcp:HOST:0`` picks a free port: see ``Listener.address``).

    The backlog leaves room for connections that are not the migration (see
    :mod:`qmig.transport.incoming`): they wait their turn in the kernel, not in front of it."""
    address = parse_uri(uri) if isinstance(uri, str) else uri
    if isinstance(address, FileAddress):
        return Listener(address, None)
    if isinstance(address, TcpAddress):
        try:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except OSError as error:
            raise TransportError(str(address), describe(error)) from None
        family, _type, _proto, _name, sockaddr = infos[0]
        bind_to: str | tuple[object, ...] = sockaddr
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_to = str(address.path)
    try:
        sock.bind(bind_to)
        sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise TransportError(str(address), describe(error)) from None
    return Listener(address, sock)


def connect(uri: str | Address, timeout: float | None = 30.0) -> Connection:
    """Connect to ``uri``; for ``file:PATH``, create the file to write a one-way stream into."""
    address = parse_uri(uri) if isinstance(uri, str) else uri
    if isinstance(address, FileAddress):
        return _open_file(address, writing=True)
    try:
        if isinstance(address, TcpAddress):
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(str(address.path))
            except OSError:
                sock.close()
                raise
    except OSError as error:
        if isinstance(error, TimeoutError) and error.errno is None and timeout is not None:
            raise TransportError(
                str(address), f"connect timeout {timeout:g} s: no answer from the other side"
            ) from None
        raise TransportError(str(address), describe(error)) from None
    sock.settimeout(None)
    _tune(sock)
    return Connection(str(address), sock=sock)
