"""bench/named_pages_bench.py still runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "named_pages_bench.py"


def test_the_benchmark_reads_both_streams_both_ways() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--records", "300", "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"named", "postcopy"}
    for row in result.values():
        # Both paths read every record (the bench fails otherwise), and the figures exist.
        assert row["records"] == 300 and row["bytes"] > 300 * 8
        assert row["named_path_records_per_s"] > 0 and row["schema_path_records_per_s"] > 0
        assert row["cat_s"] > 0 and row["speedup"] > 0
