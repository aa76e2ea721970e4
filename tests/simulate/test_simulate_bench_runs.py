"""bench/simulate_bench.py still runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmig.qemu.machine import QEMU_BINARY

BENCH = Path(__file__).resolve().parents[2] / "bench" / "simulate_bench.py"

pytestmark = [
    pytest.mark.uffd,
    pytest.mark.qemu,
    # CI installs QEMU: a missing binary there is a failure, not a skip.
    pytest.mark.skipif(
        shutil.which(QEMU_BINARY) is None and not os.environ.get("CI"),
        reason=f"{QEMU_BINARY} is not installed",
    ),
]


def test_the_benchmark_compares_qmig_with_qemu() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--ram", "64M", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for side in ("qmig", "qemu"):
        figures = result[side]
        assert figures["verified"] is True
        assert figures["total_s"] > 0
        assert figures["pages_sent"] > 0
        assert set(figures["fault_latency_us"]) == {"p50", "p99", "max"}
    assert result["qemu"]["postcopy_requests"] is not None
    assert result["ratio"]["total_s"] is not None
