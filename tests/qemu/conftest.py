"""Fixtures for tests that start real QEMU processes (marked ``qemu``).

Every QEMU started through ``machines`` is shut down at teardown, and each test checks that no
QEMU it started is left running, whether the test passed or failed.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmig.qemu.machine import QEMU_BINARY, Machine, MachineConfig, running_qemu_pids

MachineFactory = Callable[..., Machine]


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


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[MachineFactory]:
    """``machines(name, **MachineConfig fields)`` starts a QEMU that teardown always stops."""
    started: list[Machine] = []

    def start(name: str, **config: object) -> Machine:
        machine = Machine(MachineConfig(name, **config), tmp_path)  # type: ignore[arg-type]
        started.append(machine)
        return machine.start()

    yield start
    for machine in started:
        machine.shutdown()
