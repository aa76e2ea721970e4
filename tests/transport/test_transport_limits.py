"""Time limits on a real TCP connection: each fires at its setting, names itself, and does
not fire on a peer that keeps to it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from qmig.transport import Connection, LimitExceeded, Limits, connect, listen

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    """(qmig's end as a Connection, the peer's raw socket), over TCP on 127.0.0.1."""
    with listen("tcp:127.0.0.1:0") as listener:
        peer = connect(listener.uri)
        ours = listener.accept(timeout=5)
    assert peer.socket is not None
    try:
        yield ours, peer.socket
    finally:
        ours.close()
        peer.close()


def read_until_error(connection: Connection) -> tuple[LimitExceeded, float]:
    buffer = bytearray(1 << 20)
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as caught:
        while connection.recv_into(buffer):
            pass
    return caught.value, time.monotonic() - started


def read_while_the_peer_sends(
    ours: Connection, peer: socket.socket, byte: bytes, interval: float
) -> tuple[LimitExceeded, float]:
    """read_until_error while the peer sends ``byte`` every ``interval`` seconds."""
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            try:
                peer.send(byte)
            except OSError:
                return
            time.sleep(interval)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        return read_until_error(ours)
    finally:
        stop.set()
        thread.join()


def test_idle_names_the_limit_the_peer_and_the_offset(pair: tuple[Connection, socket.socket]):
    ours, peer = pair
    ours.set_limits(Limits(idle=0.5, peer="the source"))
    peer.sendall(b"12345")
    error, elapsed = read_until_error(ours)
    assert error.limit == "idle"
    assert error.detail == (
        "idle timeout 0.5 s: no byte from the source for 0.5 s at stream offset 5"
    )
    assert 0.5 <= elapsed < 1.5


def test_time_spent_handling_data_is_not_idle(pair: tuple[Connection, socket.socket]) -> None:
    ours, peer = pair
    ours.set_limits(Limits(idle=0.3))
    peer.sendall(b"a" * 10)
    time.sleep(0.6)  # busy elsewhere: the bytes were there all along
    assert ours.recv_into(bytearray(100)) == 10


def test_a_trickle_ends_at_the_minimum_rate(pair: tuple[Connection, socket.socket]) -> None:
    ours, peer = pair
    ours.set_limits(Limits(idle=5, min_rate=100, rate_window=1.0))
    error, elapsed = read_while_the_peer_sends(ours, peer, b"x", 0.1)  # a trickle
    assert error.limit == "min_rate"
    assert error.detail.startswith("minimum rate 100 B/s: ")
    assert "of waiting for them at stream offset" in error.detail
    assert 1.0 <= elapsed < 3.0


def test_a_steady_sender_keeps_to_the_minimum_rate(pair: tuple[Connection, socket.socket]):
    ours, peer = pair
    ours.set_limits(Limits(idle=5, min_rate=1000, rate_window=0.5))
    deadline = time.monotonic() + 1.5
    buffer = bytearray(1 << 16)
    while time.monotonic() < deadline:
        peer.sendall(b"y" * 500)
        time.sleep(0.05)
        assert ours.recv_into(buffer) > 0


def test_the_deadline_ends_a_phase(pair: tuple[Connection, socket.socket]) -> None:
    ours, peer = pair
    meter = ours.set_limits(Limits(idle=5, deadline=0.8))
    time.sleep(0.5)
    meter.start()  # a new phase: its deadline counts from here
    error, elapsed = read_while_the_peer_sends(ours, peer, b"z", 0.05)  # steady, never idle
    assert error.limit == "deadline"
    assert error.detail.startswith("deadline 0.8 s: the phase did not end in 0.8 s")
    assert 0.7 <= elapsed < 1.5


def test_a_peer_that_never_reads_ends_a_blocked_send(pair: tuple[Connection, socket.socket]):
    ours, _peer = pair
    ours.set_limits(Limits(idle=0.5, peer="the source"))
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as caught:
        for _ in range(1000):
            ours.sendall(bytes(1 << 20))
    assert caught.value.limit == "idle"
    assert "the source took none of the" in caught.value.detail
    assert "is it reading the return path?" in caught.value.detail
    assert time.monotonic() - started < 3


def test_a_peer_that_never_reads_is_noticed_while_reading(
    pair: tuple[Connection, socket.socket],
) -> None:
    """The PING flood: the peer sends on and on, never reading the answers."""
    ours, peer = pair
    ours.set_limits(Limits(idle=0.5))
    stop = threading.Event()

    def flood() -> None:
        peer.settimeout(0.2)
        while not stop.is_set():
            try:
                peer.sendall(b"p" * 4096)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    buffer = bytearray(1 << 16)
    started = time.monotonic()
    try:
        with pytest.raises(LimitExceeded) as caught:
            while True:
                ours.sendall(b"a" * ours.recv_into(buffer))  # an answer per byte
    finally:
        stop.set()
        thread.join()
    assert "took none of the" in caught.value.detail
    assert time.monotonic() - started < 3


def test_a_reading_peer_is_never_idle_on_the_send_side(pair: tuple[Connection, socket.socket]):
    ours, peer = pair
    ours.set_limits(Limits(idle=0.3))
    got = bytearray()

    def drain() -> None:
        while chunk := peer.recv(1 << 16):
            got.extend(chunk)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        ours.sendall(b"r" * 100_000)
        ours.meter.check(reading=False)  # type: ignore[union-attr]
    ours.shutdown_write()
    thread.join()
    assert len(got) >= 100_000


def test_prefix_bytes_come_first() -> None:
    a, b = socket.socketpair()
    with Connection("pair", sock=a, prefix=b"HEAD") as connection:
        b.sendall(b"tail")
        b.close()
        buffer = bytearray(3)
        assert connection.recv_exactly(8) == b"HEADtail"
        assert connection.recv_into(buffer) == 0
