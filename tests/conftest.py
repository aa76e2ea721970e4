"""Shared test configuration.

The ``machines`` fixture starts real QEMU processes that teardown always stops (the tests in
tests/qemu also check that none is left running); ``qemu_10_0`` is QEMU 10.0's install, a
failure under CI when it is missing, a skip elsewhere.

Hypothesis profiles: ``ci`` (loaded when the ``CI`` environment variable is set) keeps the
property tests within a 2-core CI budget; ``thorough`` (``QMIG_HYPOTHESIS=thorough``) runs
many more examples for a local bug hunt. Otherwise hypothesis's defaults apply.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from qmig.qemu.machine import Machine, MachineConfig, QemuInstall, qemu_install
from qmig.qemu.qmp import QemuError

MachineFactory = Callable[..., Machine]

# The helper modules the tests share assert too: pytest explains their failures as it does
# a test's (they are imported by the tests, after this conftest).
pytest.register_assert_rewrite(
    "answering",
    "fastpath_harness",
    "own_source",
    "preempt_harness",
    "processes",
    "qemu_helpers",
    "qemu_recovery",
    "simulating",
)

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,  # shared CI machines stall; hangs are caught by pytest-timeout instead
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

if os.environ.get("CI"):
    settings.load_profile("ci")
elif os.environ.get("QMIG_HYPOTHESIS"):
    settings.load_profile(os.environ["QMIG_HYPOTHESIS"])


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


@pytest.fixture
def qemu_10_0() -> QemuInstall:
    """QEMU 10.0's install: a failure under CI, where scripts/setup unpacks it; a skip
    elsewhere."""
    try:
        return qemu_install("10.0")
    except QemuError as error:
        if os.environ.get("CI"):
            pytest.fail(f"{error} (scripts/setup runs scripts/fetch-qemu-10.0)")
        pytest.skip(str(error))
