"""``qmig simulate --json`` as the simulate tests run it: the process, a run that must verify
every page, and one that must also recover as often at both ends."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

TIMEOUT = 180  # generous: the simulate tests share a loaded 2-core CI machine


def run_simulate(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmig", "simulate", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def verified(*args: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """A run that exits 0 without a traceback, every page verified; its summary."""
    done = run_simulate(*args, timeout=timeout)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["verified"] is True
    assert result["mismatched_pages"] == 0
    return result


def recovered(*args: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """A verified run (``verified``) whose source and destination count the same
    recoveries."""
    result = verified(*args, timeout=timeout)
    assert result["recoveries"] == result["destination_recoveries"]
    return result


def assert_split_by_what_requests_found(result: dict[str, Any]) -> None:
    """The requests paired across both ends, by what each found on the source: every paired
    request in one group or the other. With 4 KiB host pages a request asks for one target
    page, so once every request the source read is paired, those sent for are exactly the
    pages the source sent on request."""
    already, sent_for = result["page_already_sent"], result["page_sent_for_request"]
    assert set(already) == set(sent_for) == {"count", "p50", "p99"}
    paired = result["request_read_us"]["count"]
    assert already["count"] + sent_for["count"] == paired > 0
    assert 0 < sent_for["count"] <= result["postcopy"]["requested_pages"]
    if paired == result["source_requests"]:
        assert sent_for["count"] == result["postcopy"]["requested_pages"]
    assert 0 < sent_for["p50"] <= sent_for["p99"]
