"""``qmig simulate`` end to end: two processes, TCP, userfaultfd RAM, verified page by page."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.uffd
TIMEOUT = 120


def simulate(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "qmig", "simulate", "--json", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["verified"] is True
    assert result["mismatched_pages"] == 0
    return result


def test_postcopy_after_one_pass_discards_what_was_dirtied() -> None:
    result = simulate("--ram", "64M", "--dirty-rate", "20000")
    assert result["mode"] == "postcopy"
    assert result["precopy_passes"] == 1
    assert result["precopy"]["pages"] == 64 * 256
    assert result["discarded_pages"] > 0
    # Every discarded page comes again in postcopy; nothing else does.
    assert result["postcopy"]["pages"] == result["discarded_pages"]
    assert result["downtime_ms"] is not None and result["downtime_ms"] >= 0
    # QEMU 10.x (the default profile) adds PING(0x42) inside the package.
    assert sorted(result["pongs"]) == [1, 2, 3, 4, 0x42]


def test_immediate_switchover_serves_the_workload_by_requests() -> None:
    result = simulate("--ram", "32M", "--postcopy-after", "0", "--bandwidth", "64")
    assert result["precopy"]["pages"] == 0
    assert result["postcopy"]["pages"] == 32 * 256
    assert result["postcopy_requests"] > 0
    assert result["faults"] >= result["postcopy_requests"]
    assert result["postcopy"]["requested_pages"] > 0
    latency = result["fault_latency_us"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]


def test_precopy_only_completes_without_postcopy() -> None:
    result = simulate("--ram", "32M", "--precopy-only")
    assert result["mode"] == "precopy"
    assert result["discard_commands"] == 0
    assert result["postcopy"]["pages"] == 0
    assert result["precopy_passes"] >= 1


def test_several_blocks_and_several_passes() -> None:
    result = simulate(
        "--blocks",
        "pc.ram:16M,vga.vram:4M,pc.bios:256K",
        "--postcopy-after",
        "2",
        "--qemu-version",
        "7.2",
    )
    assert result["qemu_version"] == "7.2"
    assert result["precopy_passes"] == 2
    assert set(result["blocks"]) == {"pc.ram", "vga.vram", "pc.bios"}
