"""The peers of :mod:`qmig.pytest_plugin`: ``qmig receive`` and ``qmig replay`` run in the
background as separate processes, as a user runs them, with their fault knobs.

A peer's stderr is read on a thread as it comes (its stable lines say where it listens and
when it pauses), so that a test can wait for those moments and the pipe never fills.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LISTENING = "qmig receive: listening on "
PAUSED = "qmig receive: postcopy paused; waiting for the resumed source on "


@dataclass
class PeerResult:
    """How a peer process ended: its exit status, its ``--json`` report when it finished,
    and its error line when it failed."""

    returncode: int
    report: dict[str, Any] | None
    stderr: str

    @property
    def error(self) -> str:
        """The last line on stderr: qmig's one-line error when it failed."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


class Peer:
    """One qmig process in the background."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qmig", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._stdout = ""
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.result: PeerResult | None = None

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self._stdout = self.process.stdout.read()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_line(self, start: str, timeout: float = 30.0, after: int = 0) -> tuple[int, str]:
        """The first stderr line, from line ``after`` on, that starts with ``start``: its index
        and its text; raise AssertionError if the process ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(after, len(self._lines)):
                    if self._lines[index].startswith(start):
                        return index, self._lines[index].rstrip("\n")
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self.process.poll() is not None and not self._readers[0].is_alive()
                ):
                    raise AssertionError(
                        f"qmig {self.argv[0]} printed no {start.strip()!r} line: "
                        f"{''.join(self._lines).strip()[-2000:]}"
                    )
                self._changed.wait(min(left, 0.5))

    def wait(self, timeout: float = 120.0) -> PeerResult:
        """Wait for the process to end; its result."""
        if self.result is None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(
                    f"qmig {self.argv[0]} still running after {timeout:g} s: "
                    f"{self.stderr.strip()[-2000:]}"
                ) from None
            for reader in self._readers:
                reader.join(10.0)
            report = None
            if self.process.returncode == 0 and self._stdout.strip().startswith("{"):
                report = json.loads(self._stdout)
            self.result = PeerResult(self.process.returncode, report, self.stderr)
        return self.result

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Kill the process if it still runs (teardown)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@dataclass
class DestinationOptions:
    """``qmig receive``'s options and knobs, as the ``qmig_destination`` fixture takes them."""

    qemu_version: str = "auto"
    recovery: bool = False
    pause_after: int | None = None  # cut the channel after N postcopy pages (then recover)
    pause_during_recovery: bool = False
    ram_page_size: str | None = None
    reject: str | None = None
    stall_after: int | None = None
    stall_after_pages: int | None = None
    stall_for: float | None = None
    delay_requests_ms: int = 0
    shut_status: int | None = None
    workload: str = "random"
    accept_timeout: float = 60.0
    idle_timeout: float = 30.0
    recover_timeout: float = 60.0
    extra: tuple[str, ...] = ()  # any other option of qmig receive, as is

    def argv(self, dump_dir: Path) -> list[str]:
        argv = [
            "receive", "--listen", "tcp:127.0.0.1:0", "--json", "--dump-ram", str(dump_dir),
            "--qemu-version", self.qemu_version, "--workload", self.workload,
            "--accept-timeout", str(self.accept_timeout),
            "--idle-timeout", str(self.idle_timeout),
            "--recover-timeout", str(self.recover_timeout if self.recovery else 0),
        ]  # fmt: skip
        options: dict[str, Any] = {
            "--pause-after": self.pause_after,
            "--ram-page-size": self.ram_page_size,
            "--reject": self.reject,
            "--stall-after": self.stall_after,
            "--stall-after-pages": self.stall_after_pages,
            "--stall-for": self.stall_for,
            "--delay-requests": self.delay_requests_ms or None,
            "--shut-status": self.shut_status,
        }
        for option, value in options.items():
            if value is not None:
                argv += [option, str(value)]
        if self.pause_during_recovery:
            argv.append("--pause-during-recovery")
        return [*argv, *self.extra]


class QmigDestination(Peer):
    """``qmig receive`` on a free 127.0.0.1 port: ``uri`` is where the source migrates to
    (and resumes to, after a pause); ``wait()`` gives the report, ``ram()`` what it received."""

    def __init__(self, options: DestinationOptions, workdir: Path) -> None:
        self.options = options
        self.dump_dir = workdir / "ram"
        super().__init__(options.argv(self.dump_dir))
        _, line = self.wait_line(LISTENING)
        self.uri = line[len(LISTENING) :]
        self._pauses_seen = 0

    def wait_paused(self, timeout: float = 30.0) -> str:
        """Wait until the destination paused (the channel broke in postcopy) and listens for
        the resumed source; the URI to resume to (QEMU: ``migrate`` with ``resume=true``)."""
        index, line = self.wait_line(PAUSED, timeout, after=self._pauses_seen)
        self._pauses_seen = index + 1
        return line[len(PAUSED) :]

    def ram(self, block: str = "pc.ram") -> bytes:
        """The block's contents as received, once the migration completed."""
        result = self.wait()
        if result.returncode != 0:
            raise AssertionError(f"the migration failed, no RAM received: {result.error}")
        return (self.dump_dir / (block.replace("/", "_") + ".bin")).read_bytes()


@dataclass
class SourceOptions:
    """``qmig replay``'s options and knobs, as the ``qmig_source`` fixture takes them."""

    qemu_version: str = "auto"
    postcopy_after: int | None = None
    bandwidth: float | None = None  # MiB/s
    cut_after_pages: int | None = None  # postcopy pages; with resume_to, a recovery follows
    resume_to: str | None = None
    stall_after: int | None = None
    stall_for: float | None = None
    corrupt: str | None = None
    extra: tuple[str, ...] = ()

    def argv(self, capture: Path, uri: str) -> list[str]:
        argv = ["replay", str(capture), "--to", uri, "--json", "--qemu-version", self.qemu_version]
        options: dict[str, Any] = {
            "--postcopy-after": self.postcopy_after,
            "--bandwidth": self.bandwidth,
            # With somewhere to resume to, the cut recovers (replay's --pause-after).
            "--pause-after" if self.resume_to else "--cut-after-pages": self.cut_after_pages,
            "--resume-to": self.resume_to,
            "--stall-after": self.stall_after,
            "--stall-for": self.stall_for,
            "--corrupt": self.corrupt,
        }
        for option, value in options.items():
            if value is not None:
                argv += [option, str(value)]
        return [*argv, *self.extra]


class QmigSource(Peer):
    """``qmig replay`` of a capture into ``uri``; ``wait()`` gives its report; for a
    generated guest, ``expected_ram`` is what the destination must end up with."""

    def __init__(self, capture: Path, uri: str, options: SourceOptions) -> None:
        self.options = options
        self.expected_ram: bytes | None = None  # a generated guest's RAM
        super().__init__(options.argv(capture, uri))
