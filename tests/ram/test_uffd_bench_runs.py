"""The benchmark still runs and prints its headline (figures are not asserted: no timing in
tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.uffd

BENCH = Path(__file__).resolve().parents[2] / "bench" / "uffd_bench.py"


def test_the_benchmark_runs_and_prints_faults_per_second() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode and "userfaultfd: not available" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"\d+ faults/s", lines[-1])
    assert sum(line.startswith(("qmig, C", "qmig, Python", "bare C")) for line in lines) == 12
    assert sum("per ioctl" in line for line in lines) == 3
    assert any("records, registered" in line and "memcpy, fresh" in line for line in lines)
