"""A source that disconnects mid-postcopy: the destination reports it and exits in bounded time."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.runner.source_ram import GuestRam
from qmig.wire import messages as m
from qmig.wire.reader import StreamReader

pytestmark = pytest.mark.uffd


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def postcopy_stream() -> tuple[bytes, int]:
    """A whole postcopy stream, and the offset just after its PACKAGED blob."""
    ram = GuestRam.generate([("pc.ram", 8 << 20)], zero_fraction=0.2)
    source = Source(ram.blocks, version="7.2")
    source.start()
    source.start_postcopy()
    stream = source.data_to_send(0)
    while source.state is SourceState.POSTCOPY:
        stream += source.data_to_send(1 << 20)
    reader = StreamReader("7.2")
    reader.feed(stream)
    after_package = next(r.offset for r in reader if isinstance(r.message, m.PackageEnd))
    return stream, after_package


def read_until_closed(sock: socket.socket) -> None:
    """Read the return path, as a source does, so that closing sends FIN, not RST."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 20
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize(
    ("cut", "recover_timeout"),
    [("mid-postcopy", "0"), ("inside-package", "600"), ("mid-postcopy", "1")],
    ids=["mid-postcopy", "inside-package", "mid-postcopy-paused"],
)
def test_the_destination_reports_a_vanished_source_and_exits(
    cut: str, recover_timeout: str
) -> None:
    """Without recovery (timeout 0) or before RUN, the end of the stream is the error; after
    RUN with recovery on, the destination pauses and fails once no new channel comes."""
    stream, after_package = postcopy_stream()
    stop = after_package + 200_000 if cut == "mid-postcopy" else after_package - 20
    port = free_port()
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmig",
            "receive",
            "--listen",
            f"tcp:127.0.0.1:{port}",
            "--qemu-version",
            "7.2",
            "--vcpus",
            "2",
            "--recover-timeout",
            recover_timeout,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with connect(port) as sock:
            drain = threading.Thread(target=read_until_closed, args=(sock,), daemon=True)
            drain.start()
            sock.sendall(stream[:stop])
            time.sleep(0.5)  # the guest runs and faults on pages that will never come
            sock.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            _, stderr = receiver.communicate(timeout=30)
            elapsed = time.monotonic() - started
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert receiver.returncode == 1
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("qmig: error:")]
    assert len(lines) == 1, stderr
    if recover_timeout == "1":
        assert "postcopy paused, and no new channel within 1 s" in lines[0]
        assert "qmig receive: postcopy paused; waiting for the resumed source on" in stderr
        assert elapsed < 20
        return
    if cut == "mid-postcopy":
        assert "unexpected end of stream during RUNNING at byte" in lines[0]
    else:
        assert "PACKAGED: unexpected end of stream during DISCARD at byte" in lines[0]
    assert int(lines[0].rsplit(" ", 1)[1]) <= stop
    assert elapsed < 20
