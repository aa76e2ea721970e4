"""bench/simulate_bench.py still runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmig.qemu.machine import QEMU_BINARY, QemuInstall

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


LEGS = ("request_sent_us", "request_read_us", "request_served_us", "page_delivered_us")


def test_the_benchmark_compares_qmig_before_and_after_with_qemu() -> None:
    done = subprocess.run(
        [
            sys.executable, str(BENCH), "--ram", "64M", "--simulate-buffers", "--qemu-again",
            "--runs", "2", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=1000,  # twice: QEMU twice, qmig three times (C, Python, simulate's buffers)
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # The two qmig runs are what they claim: the C paths, and none of them.
    assert result["qmig"]["fast_path"]["records"] > 0 and result["qmig"]["fast_answer"]
    assert not result["qmig_python"]["fast_path"] and not result["qmig_python"]["fast_answer"]
    for side in ("qmig", "qmig_python"):
        for leg in LEGS:  # the fault latency's split, as simulate --json has it
            assert set(result[side][leg]) == {"count", "p50", "p99"}
        assert result[side]["request_sent_us"]["count"] == result[side]["postcopy_requests"] > 0
    for side in ("qmig", "qmig_python", "qemu"):
        figures = result[side]
        assert figures["verified"] is True
        assert figures["total_s"] > 0
        assert figures["pages_sent"] > 0
        assert set(figures["fault_latency_us"]) == {"p50", "p99", "max"}
    assert result["qemu"]["postcopy_requests"] is not None
    # The faults by what their request found on the source: QEMU's from its trace, with
    # their latencies; qmig's from its source's verdicts, over the requests paired with the
    # destination's (as the legs pair them).
    groups = ("page_already_sent", "page_sent_for_request")
    for side in ("qmig", "qmig_python", "qemu"):
        for group in groups:
            assert set(result[side][group]) == {"count", "p50", "p99"}
    assert 0 < sum(result["qemu"][g]["count"] for g in groups) <= result["qemu"]["faults"]
    for side in ("qmig", "qmig_python"):
        counts = [result[side][g]["count"] for g in groups]
        assert min(counts) >= 0 and sum(counts) == result[side]["request_read_us"]["count"] > 0
        assert result[side]["placed_before_answer"] >= 0
    assert result["ratio"]["total_s"] is not None
    assert result["ratio_python"]["total_s"] is not None
    # The run with simulate's own socket buffers, and every side summed up over both runs.
    assert result["qmig_simulate_buffers"]["verified"] is True
    assert result["qmig_simulate_buffers"]["fast_path"]["records"] > 0
    assert result["runs"] == 2
    medians = result["medians"]
    assert set(medians) == {"qemu", "qmig", "qmig_python", "qmig_simulate_buffers", "qemu_again"}
    for figures in medians.values():
        latency = figures["fault_latency_us.p50"]
        assert len(latency["runs"]) == 2 and min(latency["runs"]) <= latency["median"]
        assert latency["median"] <= max(latency["runs"])
        assert len(figures["total_s"]["runs"]) == 2 and figures["total_s"]["median"] > 0
    # QEMU's second migration (--qemu-again) is one as real as the first.
    again = result["qemu_again"]
    assert again["verified"] is True and again["faults"] > 0
    assert set(again["fault_latency_us"]) == {"p50", "p99", "max"}
    # Each qmig run's p50 against QEMU's of the same run, run by run, and QEMU's second.
    qemu_runs = medians["qemu"]["fault_latency_us.p50"]["runs"]
    assert "paired" not in medians["qemu"]["fault_latency_us.p50"]
    for side in ("qmig", "qmig_python", "qmig_simulate_buffers", "qemu_again"):
        latency = medians[side]["fault_latency_us.p50"]
        assert latency["paired"] == 2
        pairs = zip(latency["runs"], qemu_runs, strict=True)
        assert latency["at_most_qemu"] == sum(ours <= theirs for ours, theirs in pairs)


def test_the_benchmark_runs_both_sides_uncapped() -> None:
    """``--bandwidth 0``: no cap on either side, as default ``qmig simulate`` runs (qmig's
    own checks refuse a cap of 0, so a verified qmig run had none). Uncapped, QEMU can
    complete in precopy before the switch: the bench runs it again until one reaches
    postcopy (at 1 GiB nearly always the first; at 64 MiB never), so the figures compared
    are postcopy's."""
    done = subprocess.run(
        [sys.executable, str(BENCH), "--ram", "1G", "--paths", "c", "--bandwidth", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["plan"]["bandwidth"] == 0
    assert result["qmig"]["verified"] is True and result["qemu"]["verified"] is True
    qemu = result["qemu"]
    assert qemu["downtime_ms"] is not None and qemu["downtime_ms"] > 0  # it went postcopy
    assert qemu["postcopy_bytes"] > 0
    retried = done.stderr.count("completed in precopy, before postcopy; again")
    assert qemu["attempts"] == retried + 1
    refused = subprocess.run(
        [sys.executable, str(BENCH), "--bandwidth", "-1"], capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == "simulate_bench: error: --bandwidth must be 0 (no cap) or more"


def test_the_benchmark_measures_qemu_10_0_where_default_simulate_runs(
    qemu_10_0: QemuInstall,
) -> None:
    """``--qemu-version 10.0 --qemu-order scattered``: QEMU 10.0 on both sides, its guest
    passing over its pages out of address order, uncapped, as default ``qmig simulate``
    runs; qmig speaks 10.0's wire. QEMU 10.0 traces the end of RUN as a downtime
    checkpoint, not as 7.2's event: the downtime is measured all the same."""
    done = subprocess.run(
        [
            sys.executable, str(BENCH), "--qemu-version", "10.0", "--qemu-order", "scattered",
            "--workload", "random", "--dirty-pattern", "random", "--ram", "256M",
            "--guest-mib", "128", "--bandwidth", "0", "--paths", "c", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["plan"]["qemu_version"] == "10.0"
    assert result["plan"]["qemu_order"] == "scattered"
    qemu = result["qemu"]
    # Verified: the destination's counters passed the oracle in the guest's walk order.
    assert qemu["verified"] is True and qemu["postcopy_bytes"] > 0
    assert qemu["downtime_ms"] is not None and qemu["downtime_ms"] > 0
    assert qemu["faults"] > 0 and qemu["fault_latency_us"]["p50"] > 0
    assert result["qmig"]["verified"] is True and result["qmig"]["postcopy_requests"] > 0
