"""Running qmig's commands as real subprocesses and measuring what a hostile input cost them.

Peak RSS is the kernel's high-water mark of the child's memory (``VmHWM`` in
/proc/PID/status), read every few milliseconds until it exits: it counts everything the
process ever held, C allocations and mappings included. (``wait4``'s ``ru_maxrss`` cannot be
used: it also counts what the forked test process held before the child's exec.)
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hostile_streams import VERSION

RSS_LIMIT_MB = 200
# WHAT is a record's name, or the URI for transport errors (tcp:HOST:PORT has colons).
LINE = re.compile(
    r"^qmig: error: (?P<what>tcp:[\d.]+:\d+|[^:]+): (?P<detail>.*?)(?: at byte (?P<offset>\d+))?$"
)


@dataclass
class Outcome:
    status: int
    stderr: str
    stdout: str
    peak_rss_mb: float
    wall_s: float

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def check_error(self, what: str, detail: str | None = None) -> re.Match[str]:
        """Exit 1, no traceback, the last stderr line a one-line error about ``what``."""
        assert "Traceback" not in self.stderr, self.stderr
        assert "internal error" not in self.stderr, self.stderr
        assert self.status == 1, (self.status, self.stderr)
        match = LINE.match(self.error_line)
        assert match, self.error_line
        assert re.fullmatch(what, match["what"]), self.error_line
        if detail is not None:
            assert re.search(detail, match["detail"]), self.error_line
        return match

    def check_bounded(self, seconds: float = 5.0) -> None:
        assert self.peak_rss_mb < RSS_LIMIT_MB, f"peak RSS {self.peak_rss_mb:.0f} MB"
        assert self.wall_s < seconds, f"took {self.wall_s:.1f} s"


def _qmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmig", *args]


def _wait(process: subprocess.Popen[str], started: float, timeout: float) -> Outcome:
    """Wait for the child, following its memory's high-water mark; kill it after ``timeout``."""
    deadline = started + timeout
    peak_kib = 0
    while True:
        peak_kib = max(peak_kib, _high_water_kib(process.pid))
        pid, status = os.waitpid(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            pid, status = os.waitpid(process.pid, 0)
            break
        time.sleep(0.005)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = process.stdout.read(), process.stderr.read()
    return Outcome(process.returncode, stderr, stdout, peak_kib / 1024, wall)


def _high_water_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match[1]) if match else 0


def _popen(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def inspect(path: Path, *extra: str, timeout: float = 30.0) -> Outcome:
    started = time.monotonic()
    process = _popen(_qmig("inspect", str(path), "--qemu-version", VERSION, *extra))
    return _wait(process, started, timeout)


def machine(path: Path, timeout: float = 30.0) -> Outcome:
    """The destination machine alone, in a process of its own (see hostile_machine.py)."""
    started = time.monotonic()
    script = Path(__file__).with_name("hostile_machine.py")
    process = _popen([sys.executable, str(script), str(path), VERSION])
    return _wait(process, started, timeout)


Client = Callable[[tuple[str, int]], None]


def receive(client: Client, *extra: str, timeout: float = 30.0) -> Outcome:
    """Start ``qmig receive`` on a free port, run ``client(address)``, wait for the end.

    The stderr pipe is drained only after the end: qmig writes one line on success and
    one on failure, far below a pipe's capacity."""
    started = time.monotonic()
    process = _popen(
        _qmig("receive", "--listen", "tcp:127.0.0.1:0", "--workload", "none",
              "--qemu-version", VERSION, "--accept-timeout", "20", *extra)
    )  # fmt: skip
    assert process.stderr is not None
    first = process.stderr.readline()
    match = re.search(r"listening on tcp:([\d.]+):(\d+)", first)
    if match is None:
        process.kill()
        raise AssertionError(first + process.stderr.read())
    try:
        client((match[1], int(match[2])))
    finally:
        outcome = _wait(process, started, timeout)
    outcome.stderr = first + outcome.stderr
    return outcome


def sender(data: bytes, *, hold: float = 0.0) -> Client:
    """A client that sends ``data``, waits ``hold`` s, closes its side and reads until qmig
    closes (the return path stays drained)."""

    def client(address: tuple[str, int]) -> None:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(data)
            time.sleep(hold)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(30)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass

    return client
