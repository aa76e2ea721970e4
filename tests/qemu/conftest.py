"""Fixtures for tests that start real QEMU processes (marked ``qemu``).

Every QEMU started through ``machines`` (tests/conftest.py) is shut down at teardown, and each
test checks that no QEMU it started is left running, whether the test passed or failed.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmig.qemu.machine import QEMU_BINARY, running_qemu_pids

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if shutil.which(QEMU_BINARY) is not None:
        return
    # CI installs QEMU (scripts/setup): a missing binary there is a failure, not a skip.
    if os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason=f"{QEMU_BINARY} is not installed")
    for item in items:
        if "qemu" in item.keywords and item.path.is_relative_to(HERE):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_qemu_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    if "qemu" not in request.keywords:
        yield
        return
    before = set(running_qemu_pids(parent=os.getpid()))
    yield
    left = set(running_qemu_pids(parent=os.getpid())) - before
    for pid in left:  # fail the test, but do not let the leak burn CPU for the rest of the run
        os.kill(pid, signal.SIGKILL)
    assert not left, f"QEMU processes left running: {sorted(left)}"
