"""Time and connections a peer cannot make ``qmig receive`` spend: each case ends at the
limit it was given, with a line naming that limit."""

from __future__ import annotations

import socket
import time

import pytest
from hostile_run import receive, sender
from hostile_streams import S, small_opening

from qmig.wire import messages as m

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]

URI = r"tcp:127\.0\.0\.1:\d+"
OPENING = small_opening()
HEADER = OPENING[:8]


def trickle(data: bytes, interval: float):  # type: ignore[no-untyped-def]
    """The header at once, then one byte per ``interval`` until qmig hangs up."""

    def client(address: tuple[str, int]) -> None:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(data[:8])
            try:
                for byte in data[8:]:
                    sock.sendall(bytes((byte,)))
                    time.sleep(interval)
            except OSError:
                return

    return client


def test_a_trickle_ends_at_the_minimum_rate() -> None:
    outcome = receive(
        trickle(OPENING * 10, 0.5), "--idle-timeout", "5", "--min-rate", "100",
        "--rate-window", "2",
    )  # fmt: skip
    match = outcome.check_error(URI, r"^minimum rate 100 B/s: \d+ bytes from the source in 2")
    assert "during precopy" in match["detail"]
    outcome.check_bounded()


def test_the_deadline_ends_a_slow_migration() -> None:
    outcome = receive(trickle(OPENING * 10, 0.2), "--deadline", "2", "--min-rate", "0")
    outcome.check_error(URI, r"^deadline 2 s: the phase did not end in 2 s at stream offset \d+")
    assert 2 <= outcome.wall_s < 5
    outcome.check_bounded()


def test_a_source_that_stops_names_the_idle_timeout_and_the_offset() -> None:
    outcome = receive(sender(OPENING, hold=4), "--idle-timeout", "1.5")
    match = outcome.check_error(
        URI, rf"^idle timeout 1.5 s: no byte from the source for 1.5 s at stream offset "
        rf"{len(OPENING)} during precopy"
    )  # fmt: skip
    assert int(match["offset"]) == len(OPENING)


def ping_flood(address: tuple[str, int]) -> None:
    """Sends PINGs on and on and never reads the PONGs."""
    chunk = S.build_command(m.Ping(1)) * 10000
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(OPENING)
        sock.settimeout(0.5)
        started = time.monotonic()
        while time.monotonic() - started < 60:
            try:
                sock.sendall(chunk)
            except TimeoutError:
                continue
            except OSError:
                return


def test_a_ping_flood_with_an_unread_return_path_ends_at_the_idle_timeout() -> None:
    outcome = receive(ping_flood, "--idle-timeout", "3")
    outcome.check_error(
        URI, r"^idle timeout 3 s: the source took none of the \d+ bytes waiting for it for 3 s"
    )
    # The limit, plus answering the PINGs whose PONGs fill the (capped) socket buffers before
    # a send blocks: ~7 s on an idle 2-CPU host, more when loaded. What matters is that it
    # ends, named, instead of blocking forever.
    outcome.check_bounded(seconds=20)


def silent_then(data: bytes, first: bytes = b""):  # type: ignore[no-untyped-def]
    """A client that connects first and says nothing (or ``first``), then the real source."""

    def client(address: tuple[str, int]) -> None:
        with socket.create_connection(address, timeout=10) as squatter:
            if first:
                squatter.sendall(first)
            time.sleep(0.3)
            sender(data)(address)

    return client


@pytest.mark.parametrize(
    "first", [b"", b"GET / HTTP/1.1\r\n\r\n", HEADER[:5]], ids=["silent", "garbage", "partial"]
)
def test_the_real_source_wins_over_a_connection_that_came_first(first: bytes) -> None:
    outcome = receive(silent_then(OPENING, first))
    match = outcome.check_error("stream", "unexpected end of stream during precopy")
    assert int(match["offset"]) == len(OPENING)  # the real source's stream was read whole
    outcome.check_bounded()


def test_many_silent_connections_do_not_shut_out_the_source() -> None:
    def client(address: tuple[str, int]) -> None:
        squatters = [socket.create_connection(address, timeout=10) for _ in range(50)]
        try:
            sender(OPENING)(address)
        finally:
            for sock in squatters:
                sock.close()

    outcome = receive(client, "--handshake-timeout", "20")
    outcome.check_error("stream", "unexpected end of stream during precopy")
    outcome.check_bounded()


def test_nothing_but_silent_connections_ends_at_the_accept_timeout() -> None:
    held: list[socket.socket] = []

    def client(address: tuple[str, int]) -> None:
        held.append(socket.create_connection(address, timeout=10))  # and says nothing

    outcome = receive(client, "--accept-timeout", "2", "--handshake-timeout", "0.5")
    held[0].close()
    outcome.check_error(
        URI, r"^accept timeout 2 s: no connection opened a migration stream "
        r"\(closed: 1 no header in time\)$"
    )  # fmt: skip
    outcome.check_bounded()
