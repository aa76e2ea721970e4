"""``qmig inspect`` of a FIFO or character device: read as it comes, never a silent hang.

Real FIFOs (``os.mkfifo``): with no writer, inspect ends within ``--timeout`` with one
error line naming the limit; with a writer it decodes as from a file; a capture folder whose
``stream.bin`` is a FIFO is a capture folder.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmig.capture.recording import capture_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
TIMEOUT = 1.0
SLACK = 10.0  # interpreter start-up and a loaded machine


def fixture(name: str) -> bytes:
    return lzma.decompress((FIXTURES / name).read_bytes())


def qmig(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "qmig", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    return result, time.monotonic() - started


@dataclass
class Writer:
    """A writer thread, its FIFO, and what ends its pause early."""

    thread: threading.Thread
    path: Path
    done: threading.Event


_writers: list[Writer] = []


def write_later(path: Path, data: bytes, *, pause_at: int | None = None, pause: float = 0) -> None:
    """A writer that opens ``path`` (waiting for the reader) and writes ``data``; it ends
    with the test (see ``no_writer_left``)."""
    done = threading.Event()

    def write() -> None:
        # A reader that gave up during the pause (the stalled-writer case) closes the FIFO:
        # the rest then has nowhere to go, which is what that test wants.
        with contextlib.suppress(BrokenPipeError), path.open("wb") as fifo:
            cut = len(data) if pause_at is None else pause_at
            fifo.write(data[:cut])
            fifo.flush()
            if done.wait(pause):
                return  # the test is over
            fifo.write(data[cut:])

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    _writers.append(Writer(thread, path, done))


@pytest.fixture(autouse=True)
def no_writer_left() -> Iterator[None]:
    """After each test, its writers end: a pause is cut short, and a writer still waiting
    for a reader gets one that leaves at once (its writes then fail, and it ends)."""
    yield
    while _writers:
        writer = _writers.pop()
        writer.done.set()
        deadline = time.monotonic() + SLACK
        while writer.thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                os.close(os.open(writer.path, os.O_RDONLY | os.O_NONBLOCK))
            writer.thread.join(0.1)
        assert not writer.thread.is_alive(), f"a writer of {writer.path} did not end"


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "stream.fifo"
    os.mkfifo(path)
    return path


def test_a_fifo_without_a_writer_ends_within_the_timeout(fifo: Path) -> None:
    result, elapsed = qmig("inspect", "--timeout", str(TIMEOUT), str(fifo))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"qmig: error: {fifo}: nothing to read within 1 s: no writer, or it sent nothing "
        "(--timeout 1)\n"
    )
    assert TIMEOUT <= elapsed < TIMEOUT + SLACK


def test_a_fifo_with_a_writer_is_decoded(fifo: Path) -> None:
    data = fixture("precopy-known/stream.bin.xz")
    write_later(fifo, data)
    result, _ = qmig("inspect", "--json", "--timeout", "30", str(fifo))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bytes"] == len(data)
    assert report["qemu_version"] == "7.2"
    assert report["qemu_version_evidence"].startswith("detected: machine type")


def test_a_writer_that_stalls_is_named_with_the_byte_it_stopped_at(fifo: Path) -> None:
    data = fixture("precopy-known/stream.bin.xz")
    write_later(fifo, data, pause_at=100_000, pause=TIMEOUT + SLACK + 5)
    result, elapsed = qmig("inspect", "--json", "--timeout", str(TIMEOUT), str(fifo))
    assert result.returncode == 1
    assert result.stderr == (f"qmig: error: {fifo}: no data for 1 s (--timeout 1) at byte 100000\n")
    assert elapsed < TIMEOUT + SLACK


def test_a_character_device_is_read_as_a_stream() -> None:
    result, elapsed = qmig("inspect", "--json", "/dev/null")
    assert result.returncode == 1 and elapsed < SLACK
    (line,) = result.stderr.splitlines()
    assert line.startswith("qmig: error: ") and "unexpected end of stream" in line


def test_a_version_contradicted_on_a_fifo_is_hinted_from_its_first_bytes(fifo: Path) -> None:
    from test_cli_detect import build_stream

    write_later(fifo, build_stream("10.0", "pc-q35-10.0", switchover=True))
    result, _ = qmig("inspect", "--qemu-version", "7.2", str(fifo))
    (line,) = result.stderr.splitlines()
    assert result.returncode == 1
    assert line.startswith("qmig: error: unknown command: MIG_CMD 0xb")
    assert line.endswith("--qemu-version 10.0 reads this stream past byte 77"), line


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    """The postcopy-tcp capture with ``stream.bin`` a FIFO."""
    folder = tmp_path / "capture"
    folder.mkdir()
    for name in ("return-path.bin", "index.tsv"):
        (folder / name).write_bytes(fixture(f"postcopy-tcp/{name}.xz"))
    os.mkfifo(folder / "stream.bin")
    return folder


def test_a_fifo_stream_bin_is_present(capture: Path) -> None:
    assert capture_file(capture, "stream.bin") == capture / "stream.bin"
    assert capture_file(capture, "no-such.bin") is None


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "listing"])
def test_a_capture_folder_with_a_fifo_stream_is_inspected(capture: Path, json_output: bool) -> None:
    write_later(capture / "stream.bin", fixture("postcopy-tcp/stream.bin.xz"))
    result, _ = qmig("inspect", *(["--json"] if json_output else []), str(capture))
    assert result.returncode == 0, result.stderr
    if json_output:
        assert len(json.loads(result.stdout)["requests"]) == 177
    else:
        # The listing reads the stream twice (requests beside their answers): from a copy.
        assert result.stdout.count("-> answered by the RAM record at stream byte") == 177


def test_a_capture_folder_whose_fifo_has_no_writer_times_out(capture: Path) -> None:
    result, elapsed = qmig("inspect", "--timeout", str(TIMEOUT), str(capture))
    assert result.returncode == 1 and elapsed < TIMEOUT + SLACK
    assert result.stderr.startswith(f"qmig: error: {capture / 'stream.bin'}: nothing to read")
