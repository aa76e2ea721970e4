"""qmig as the tests run it in a process of its own: the command line, a run to its end, a
process started (its first stderr line, which says where it listens, read) and killed on the
way out, and its clean end."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def qmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmig", *args]


def run(*args: str, timeout: float, **options: Any) -> subprocess.CompletedProcess[str]:
    """``qmig ARGS`` run to its end (``options``: more of subprocess.run's), its output kept
    as text."""
    return subprocess.run(qmig(*args), capture_output=True, text=True, timeout=timeout, **options)


@contextmanager
def started(*args: str, **popen: Any) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``qmig ARGS`` (``popen``: more of Popen's arguments); yields it and the first line it
    wrote to stderr. However the test ends, the process is killed and reaped."""
    process = subprocess.Popen(
        qmig(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    try:
        assert process.stderr is not None
        yield process, process.stderr.readline()
    finally:
        process.kill()
        process.wait()


def ended(process: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """The process ended within ``timeout`` with 0; its stdout and (the rest of) its
    stderr."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stdout, stderr
