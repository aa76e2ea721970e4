"""bench/simulate_runs_bench.py runs default simulate beside other settings, and sums each up
over its own runs (figures are not asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "simulate_runs_bench.py"

pytestmark = pytest.mark.uffd


def bench(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *arguments], capture_output=True, text=True, timeout=600
    )


def test_each_setting_is_summed_up_over_its_own_runs() -> None:
    done = bench("--runs", "2", "--with=--vcpus 1", "--line", "1e9", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    default, one_vcpu = result["settings"]
    assert (default["name"], one_vcpu["name"]) == ("", "--vcpus 1")
    # Each ran with its own settings: simulate's two vCPUs by default, one when told.
    assert [run["vcpus"] for run in default["runs"]] == [2, 2]
    assert [run["vcpus"] for run in one_vcpu["runs"]] == [1, 1]
    for setting in (default, one_vcpu):
        runs = setting["runs"]
        assert len(runs) == 2
        for name in ("p50_us", "blocktime_ms", "faults", "total_s", "delivered_us"):
            assert setting["median"][name] == round(statistics.median(r[name] for r in runs), 2)
        p50s = [run["p50_us"] for run in runs]
        assert setting["p50_range_us"] == [min(p50s), max(p50s)]
        assert setting["under_line"] == 2  # every p50 is under a line of 10^9 µs
        assert all(run["faults"] > 0 and run["p50_us"] > 0 for run in runs)
    # Progress on stderr, a line per run, in turn.
    progress = [line for line in done.stderr.splitlines() if ": run " in line]
    assert [line.split(": ")[1] for line in progress] == [
        "run 1/2 default", "run 1/2 --vcpus 1", "run 2/2 default", "run 2/2 --vcpus 1",
    ]  # fmt: skip


def test_a_run_that_fails_ends_the_bench_in_one_line() -> None:
    done = bench("--runs", "3", "--with=--vcpus 0")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "simulate_runs_bench: error: qmig simulate --vcpus 0: "
        "qmig: error: --vcpus: must be at least 1, not 0"
    )
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # no table of a bench that did not finish
