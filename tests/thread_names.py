"""This process's threads by name, as ps, top and perf show them (/proc/self/task/*/comm)."""

from __future__ import annotations

import time
from pathlib import Path


def names() -> dict[int, str]:
    """This process's threads: thread id → name."""
    tasks = Path("/proc/self/task")
    found = {}
    for task in tasks.iterdir():
        try:
            found[int(task.name)] = (task / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
            continue
    return found


def named(name: str, timeout: float = 10.0, besides: set[int] | None = None) -> set[int]:
    """The ids of the threads called ``name``, but ``besides``, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        found = {tid for tid, comm in names().items() if comm == name} - (besides or set())
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def left(name: str, tids: set[int], timeout: float = 10.0) -> set[int]:
    """Which of ``tids`` are still threads called ``name`` once they had ``timeout`` seconds
    to end (a joined thread's last steps outlast its join a little)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = tids & named(name, timeout=0)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)
