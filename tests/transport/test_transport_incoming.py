"""Several connections at once: the one that opens with the stream header is the migration,
whatever came first; silent and garbage connections are closed and do not hold it up."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmig.errors import TransportError
from qmig.transport import Acceptor, ChannelRule, Connection, Listener, accept_migration, listen

pytestmark = pytest.mark.timeout(60)

HEADER = b"QEVM\x00\x00\x00\x03"


@pytest.fixture
def listener() -> Iterator[Listener]:
    with listen("tcp:127.0.0.1:0") as bound:
        yield bound


def address(listener: Listener) -> tuple[str, int]:
    host, port = listener.uri.removeprefix("tcp:").rsplit(":", 1)
    return host, int(port)


def closed_by_qmig(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_silent_connection_first_does_not_win(listener: Listener) -> None:
    silent = socket.create_connection(address(listener))
    time.sleep(0.2)
    real = socket.create_connection(address(listener))
    real.sendall(HEADER + b"rest of the stream")
    started = time.monotonic()
    with accept_migration(listener, [HEADER], 5, handshake_timeout=3) as connection:
        assert time.monotonic() - started < 1
        assert connection.recv_exactly(len(HEADER) + 4) == HEADER + b"rest"
    assert closed_by_qmig(silent, 1)
    real.close()


def test_garbage_is_closed_at_once_and_a_partial_header_waits(listener: Listener) -> None:
    garbage = socket.create_connection(address(listener))
    garbage.sendall(b"GET / HTTP/1.1\r\n")
    partial = socket.create_connection(address(listener))
    partial.sendall(HEADER[:3])
    acceptor = Acceptor(listener.uri, listener.socket, [ChannelRule("main", HEADER)])  # type: ignore[arg-type]
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(acceptor.wait("main", 5)))
    thread.start()
    assert closed_by_qmig(garbage, 1)
    time.sleep(0.2)
    partial.sendall(HEADER[3:] + b"!")
    thread.join()
    (connection,) = result
    assert connection.recv_exactly(9) == HEADER + b"!"  # type: ignore[attr-defined]
    assert acceptor.refusals.garbage == 1
    connection.close()  # type: ignore[attr-defined]
    acceptor.close()
    partial.close()


def test_silent_connections_are_closed_after_the_handshake_window(listener: Listener) -> None:
    silent = socket.create_connection(address(listener))
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        accept_migration(listener, [HEADER], 1.0, handshake_timeout=0.3)
    assert closed_by_qmig(silent, 0.1)
    assert time.monotonic() - started < 2
    assert caught.value.detail == (
        "accept timeout 1 s: no connection opened a migration stream (closed: 1 no header in time)"
    )


def test_a_flood_of_silent_connections_does_not_shut_out_the_source(listener: Listener) -> None:
    result: list[Connection] = []

    def accept() -> None:
        result.append(accept_migration(listener, [HEADER], 10, handshake_timeout=8, max_pending=8))

    thread = threading.Thread(target=accept)
    thread.start()
    silent = [socket.create_connection(address(listener), timeout=5) for _ in range(40)]
    real = socket.create_connection(address(listener), timeout=5)
    started = time.monotonic()
    real.sendall(HEADER)
    thread.join()
    assert time.monotonic() - started < 2
    with result[0] as connection:
        assert connection.recv_exactly(len(HEADER)) == HEADER
    assert sum(closed_by_qmig(sock, 0.5) for sock in silent) >= 32  # evicted, then closed
    for sock in silent:
        sock.close()
    real.close()


def test_other_channel_kinds_are_kept_for_later(listener: Listener) -> None:
    """Where multifd or postcopy-preempt channels will be matched: by their own opening."""
    other = socket.create_connection(address(listener))
    other.sendall(b"\x11\x22\x33\x44")
    main = socket.create_connection(address(listener))
    main.sendall(HEADER)
    rules = [ChannelRule("main", HEADER), ChannelRule("other", b"\x11\x22\x33\x44")]
    acceptor = Acceptor(listener.uri, listener.socket, rules)  # type: ignore[arg-type]
    try:
        first = acceptor.wait("main", 5)
        second = acceptor.wait("other", 5)
        assert second.recv_exactly(4) == b"\x11\x22\x33\x44"
        first.close()
        second.close()
    finally:
        acceptor.close()
        other.close()
        main.close()


def test_unix_sockets_are_sorted_the_same_way(tmp_path: Path) -> None:
    with listen(f"unix:{tmp_path / 'mig.sock'}") as bound:
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(str(tmp_path / "mig.sock"))
        real = socket.socket(socket.AF_UNIX)
        real.connect(str(tmp_path / "mig.sock"))
        real.sendall(HEADER + b"x")
        with accept_migration(bound, [HEADER], 5, handshake_timeout=3) as connection:
            assert connection.recv_exactly(len(HEADER) + 1) == HEADER + b"x"
        assert closed_by_qmig(silent, 1)
        silent.close()
        real.close()
