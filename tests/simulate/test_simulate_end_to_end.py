"""``qmig simulate`` end to end: two processes, TCP, userfaultfd RAM, verified page by page."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from simulating import assert_split_by_what_requests_found, run_simulate, verified

pytestmark = pytest.mark.uffd


def simulate(*args: str) -> dict[str, Any]:
    result = verified(*args)
    # What the issue asks --json for, in every run.
    for key in ("total_s", "downtime_ms", "postcopy_requests", "faults"):
        assert key in result
    assert set(result["fault_latency_us"]) >= {"p50", "p99", "max"}
    # Faults read after their page was placed are counted, and left out of the latency.
    assert 0 <= result["late_faults"] <= result["faults"]
    assert sum(result["postcopy_latency_dist"]) <= result["faults"] - result["late_faults"]
    assert result["total_s"] > 0
    # Each vCPU's run holds its blocked time (its faults come one at a time, inside its run),
    # but for the end of a fault: the placing thread reads the clock after the ioctl that
    # woke the vCPU, which may have run on meanwhile (up to a preemption later: 5 ms).
    runs, blocked = result["vcpu_run_ms"], result["postcopy_vcpu_blocktime_ms"]
    assert len(runs) == len(blocked) == result["workload"]["vcpus"]
    assert all(run > 0 and block <= run + 5 for run, block in zip(runs, blocked, strict=True))
    assert set(result["placement_mib_s"]) == {"precopy", "postcopy"}
    assert set(result["switchover_ms"]) == {
        "stop_to_first_discard",
        "discards_to_listen",
        "listen_to_run",
        "first_discard_to_run",
    }
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


def test_placement_rate_and_switchover_times_are_reported() -> None:
    result = simulate("--ram", "64M", "--dirty-rate", "20000")
    rates = result["placement_mib_s"]
    # Tens of MiB placed each way: rates a real machine gives (bounds far from any timing).
    assert 1 < rates["precopy"] < 1_000_000
    assert 1 < rates["postcopy"] < 1_000_000
    times = result["switchover_ms"]
    assert all(value is not None and value >= 0 for value in times.values()), times
    # The parts add up (each is rounded to 0.01 ms), and lie within the downtime.
    assert times["first_discard_to_run"] == pytest.approx(
        times["discards_to_listen"] + times["listen_to_run"], abs=0.05
    )
    assert times["stop_to_first_discard"] + times["first_discard_to_run"] == pytest.approx(
        result["downtime_ms"], abs=0.1
    )
    assert times["first_discard_to_run"] <= result["downtime_ms"]

    precopy = simulate("--ram", "16M", "--precopy-only")
    assert precopy["placement_mib_s"]["precopy"] > 1
    assert precopy["placement_mib_s"]["postcopy"] is None
    assert all(value is None for value in precopy["switchover_ms"].values())


def test_immediate_switchover_serves_the_workload_by_requests() -> None:
    result = simulate("--ram", "32M", "--postcopy-after", "0", "--bandwidth", "64")
    assert result["precopy"]["pages"] == 0
    assert result["postcopy"]["pages"] == 32 * 256
    assert result["postcopy_requests"] > 0
    assert result["faults"] >= result["postcopy_requests"]
    assert result["postcopy"]["requested_pages"] > 0
    latency = result["fault_latency_us"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    # Every part of a request's round trip is measured, the two that span both ends too.
    for part in ("request_sent_us", "request_read_us", "request_served_us", "page_delivered_us"):
        assert 0 < result[part]["p50"] <= result[part]["p99"], part
    assert_split_by_what_requests_found(result)


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


def test_bandwidth_cap_is_kept_in_precopy_and_postcopy() -> None:
    cap_mib = 16
    result = simulate("--ram", "16M", "--bandwidth", str(cap_mib), "--dirty-rate", "5000")
    sent = result["precopy"]["bytes"] + result["postcopy"]["bytes"]
    # The cap is a floor on the time the stream took (not a timing measurement: a slow
    # machine only makes the run longer).
    assert result["total_s"] >= 0.9 * sent / (cap_mib << 20)


def test_workloads_and_a_source_that_dirties_nothing() -> None:
    quiet = simulate(
        "--ram", "16M", "--workload", "sequential", "--vcpus", "1", "--dirty-rate", "0"
    )
    assert quiet["discarded_pages"] == 0
    assert quiet["postcopy"]["pages"] == 0  # one pass sent everything; nothing changed since
    hot = simulate(
        "--ram", "16M", "--workload", "hotset", "--working-set", "1M", "--dirty-rate", "50000"
    )
    assert hot["workload"]["pattern"] == "hotset"
    assert 0 < hot["discarded_pages"] <= 256  # only the first 1 MiB was dirtied


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vcpus", "0"], "qmig: error: --vcpus: must be at least 1, not 0"),
        (["--bandwidth", "0"], "qmig: error: --bandwidth: must be positive, not 0"),
        (["--postcopy-after", "-1"], "qmig: error: --postcopy-after: must be 0 or more, not -1"),
        (["--blocks", "a:4M,a:4M"], "qmig: error: --blocks: block 'a' is given twice"),
        (["--blocks", "a:1000"], "qmig: error: --blocks: a: size 1000 is not a positive"),
        (["--qemu-version", "3.0"], "qmig: error: --qemu-version: unknown QEMU version"),
    ],
)
def test_bad_options_fail_in_one_line_before_anything_starts(args: list[str], message: str) -> None:
    done = run_simulate("--ram", "16M", *args, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(message)
    assert len(done.stderr.splitlines()) == 1


def test_precopy_only_and_postcopy_after_exclude_each_other() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qmig", "simulate", "--precopy-only", "--postcopy-after", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "not allowed with" in done.stderr
