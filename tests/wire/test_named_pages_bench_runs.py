"""bench/named_pages_bench.py still runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "named_pages_bench.py"


def test_the_benchmark_reads_every_stream_every_way() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--records", "300", "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"named", "postcopy", "one-block"}
    for row in result.values():
        # Every path reads every record (the bench fails otherwise), and the figures exist.
        assert row["records"] == 300 and row["bytes"] > 300 * 8
        assert row["cat_s"] > 0
        for path in ("joined", "unjoined", "schema"):
            assert row[f"{path}_records_per_s"] > 0 and row[f"{path}_s"] > 0
        # Without joining, the named path gives the schema's runs; joining gives no more.
        assert row["unjoined_runs"] == row["schema_runs"] >= row["joined_runs"]
    # Every named record of one block joins the run before it.
    one_block = result["one-block"]
    assert one_block["joined_runs"] < one_block["unjoined_runs"] / 2
