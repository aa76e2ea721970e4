"""listen/connect over real sockets and files, and the errors users see."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from qmig.errors import TransportError
from qmig.transport import Connection, connect, listen


def echo_once(conn: Connection) -> None:
    with conn:
        data = conn.recv_exactly(5)
        conn.sendall(data.upper())
        conn.shutdown_write()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_round_trip_and_end_of_stream(kind: str, tmp_path: Path) -> None:
    uri = "tcp:127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 'mig.sock'}"
    with listen(uri) as listener:
        client = connect(listener.uri)
        server = threading.Thread(target=echo_once, args=(listener.accept(timeout=5),))
        server.start()
        with client:
            client.sendall(b"hello")
            assert client.recv_exactly(5) == b"HELLO"
            assert client.recv_into(bytearray(10)) == 0  # the server shut its side
        server.join()


def test_ephemeral_port_is_reported() -> None:
    with listen("tcp::0") as listener:
        assert listener.uri.startswith("tcp:127.0.0.1:")
        assert int(listener.uri.rsplit(":", 1)[1]) > 0


def test_busy_port() -> None:
    with listen("tcp:127.0.0.1:0") as first, pytest.raises(TransportError) as error:
        listen(first.uri)
    assert str(error.value) == f"{first.uri}: address already in use"
    assert first.uri.rsplit(":", 1)[1] != "0"


def test_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransportError) as error:
        connect(f"tcp:127.0.0.1:{port}")
    assert str(error.value) == f"tcp:127.0.0.1:{port}: connection refused"


def test_missing_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="no such file or directory"):
        connect(f"unix:{tmp_path / 'nobody'}")


def test_peer_closing_mid_message_is_reported_with_the_count(tmp_path: Path) -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        client = connect(listener.uri)
        with listener.accept(timeout=5) as server:
            server.sendall(b"abc")
        with client, pytest.raises(TransportError) as error:
            client.recv_exactly(8)
    assert "peer closed the connection (3 of 8 bytes read)" in str(error.value)


def test_sending_to_a_closed_peer_fails_cleanly() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        client = connect(listener.uri)
        listener.accept(timeout=5).close()
        with client, pytest.raises(TransportError) as error:
            for _ in range(1000):  # the first writes may still be buffered
                client.sendall(bytes(65536))
    assert error.value.detail in ("peer closed the connection", "connection reset by peer")


def test_file_uri_writes_then_reads_a_one_way_stream(tmp_path: Path) -> None:
    uri = f"file:{tmp_path / 'stream.bin'}"
    with connect(uri) as writer:
        writer.sendall(b"QEVM\x00\x00\x00\x03")
        writer.shutdown_write()
    with listen(uri) as listener, listener.accept() as reader:
        assert reader.recv_exactly(8) == b"QEVM\x00\x00\x00\x03"
        assert reader.recv_into(bytearray(4)) == 0


def test_reading_a_missing_file(tmp_path: Path) -> None:
    with listen(f"file:{tmp_path / 'missing'}") as listener, pytest.raises(TransportError):
        listener.accept()
