"""The recording relay between plain sockets: byte-exact forwarding and recording."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from qmig.capture import Relay, read_capture, start_relay
from qmig.errors import TransportError
from qmig.transport import Connection, connect, listen


def drain(conn: Connection, into: bytearray) -> None:
    buffer = bytearray(65536)
    while count := conn.recv_into(buffer):
        into += buffer[:count]


def test_relay_forwards_and_records_both_directions_exactly(tmp_path: Path) -> None:
    downstream = os.urandom(5 << 20)
    upstream = os.urandom(300_000)
    with listen("tcp:127.0.0.1:0") as destination_listener:
        relay = start_relay(destination_listener.uri, tmp_path / "cap")
        source = connect(relay.listen_uri)
        destination = destination_listener.accept(timeout=5)
        got_down, got_up = bytearray(), bytearray()
        readers = [
            threading.Thread(target=drain, args=(destination, got_down)),
            threading.Thread(target=drain, args=(source, got_up)),
        ]
        for reader in readers:
            reader.start()
        # Interleave the directions, as a migration does with its return path.
        for i in range(0, len(upstream), 10_000):
            source.sendall(downstream[i * 17 : (i + 10_000) * 17])
            destination.sendall(upstream[i : i + 10_000])
        source.sendall(downstream[len(upstream) * 17 :])
        source.shutdown_write()
        destination.shutdown_write()
        for reader in readers:
            reader.join(10)
        summary = relay.join(timeout=10)
        source.close()
        destination.close()
    assert bytes(got_down) == downstream
    assert bytes(got_up) == upstream
    assert summary.clean
    capture = read_capture(tmp_path / "cap")
    assert capture.stream == downstream
    assert capture.return_path == upstream
    assert summary.stream.sha256 == hashlib.sha256(downstream).hexdigest()
    assert capture.meta["directions"]["return-path"]["bytes"] == len(upstream)
    assert capture.meta["clean"] is True
    assert sum(c.length for c in capture.chunks) == len(downstream) + len(upstream)


def test_relay_to_a_dead_destination_raises_from_join(tmp_path: Path) -> None:
    with listen("tcp:127.0.0.1:0") as gone:
        dead = gone.uri
    relay = start_relay(dead, tmp_path / "cap")
    with connect(relay.listen_uri), pytest.raises(TransportError, match="connection refused"):
        relay.join(timeout=10)


def test_stop_before_anyone_connects(tmp_path: Path) -> None:
    relay = Relay("tcp:127.0.0.1:1", tmp_path / "cap").start()
    relay.stop()
    with pytest.raises(TransportError, match="stopped before the source connected"):
        relay.join(timeout=5)


def test_relay_on_a_busy_port_fails_at_construction(tmp_path: Path) -> None:
    with listen("tcp:127.0.0.1:0") as busy, pytest.raises(TransportError) as error:
        Relay("tcp:127.0.0.1:1", tmp_path / "cap", listen_uri=busy.uri)
    assert error.value.detail == "address already in use"


def test_stop_in_the_middle_is_not_a_clean_capture(tmp_path: Path) -> None:
    with listen("tcp:127.0.0.1:0") as destination_listener:
        relay = start_relay(destination_listener.uri, tmp_path / "cap")
        with connect(relay.listen_uri) as source, destination_listener.accept(timeout=5) as dest:
            source.sendall(b"QEVM")
            assert dest.recv_exactly(4) == b"QEVM"
            relay.stop()
            summary = relay.join(timeout=5)
    assert not summary.clean
    assert summary.stream.end == "stopped"
    assert read_capture(tmp_path / "cap").stream == b"QEVM"
