"""``qmig simulate`` after a postcopy recovery: the fault latency's split for the requests
made after the last recovery (``after_last_recovery``), by leg and by what each request
found on the source, beside the whole run's."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
import simulating
from in_child import run_script

pytestmark = pytest.mark.uffd
LEGS = ("request_sent_us", "request_read_us", "request_served_us", "page_delivered_us")
GROUPS = ("page_already_sent", "page_sent_for_request")
# Everything in postcopy, cut once after 2000 pages: most requests come after the recovery.
RECOVERING = ("--ram", "64M", "--postcopy-after", "0", "--pause-after", "2000")

# The same run in-process, to keep both ends' raw reports: what the summary says against the
# requests each end logged, each with its own clock reading.
IN_PROCESS = """
import json
import re
from qmig.report.recorder import Recorder
from qmig.simulate import SimulationConfig, run_simulation

MiB = 1 << 20
recorder = Recorder()
config = SimulationConfig(
    blocks=[("pc.ram", 56 * MiB), ("vga.vram", 8 * MiB)], postcopy_after=0, pause_after=2000
)
summary = run_simulation(config, recorder=recorder)
source, destination = recorder.runs["source"], recorder.runs["destination"]
print(json.dumps({
    "summary": summary,
    "sent_at_ns": destination["request_sent_at_ns"],
    "resumed_at": [pause["resumed_at"] for pause in destination["pauses"]],
    "read_at": [read_at for read_at, _, _ in source.requests],
    "already_sent": source.already_sent,
}))
"""


def in_process() -> dict[str, Any]:
    return run_script(IN_PROCESS, timeout=simulating.TIMEOUT)


def test_the_split_after_the_last_recovery_counts_the_requests_made_after_it() -> None:
    found = in_process()
    summary = found["summary"]
    assert summary["verified"] is True and summary["recoveries"] == 1
    after = summary["after_last_recovery"]
    assert set(after) == {"since_s", "requests", *LEGS, *GROUPS}
    (resumed,) = found["resumed_at"]
    sent_after = [at for at in found["sent_at_ns"] if at >= resumed * 1e9]
    read_after = [at for at in found["read_at"] if at >= resumed]
    # Every request the destination sent from its resume on, and only those, and on the
    # source's side every request it read from then on.
    assert after["requests"] == after["request_sent_us"]["count"] == len(sent_after)
    assert after["request_served_us"]["count"] == len(read_after)
    # Most came after the cut (at 2000 of 16384 pages), the rest before it.
    assert 0 < len(sent_after) <= len(found["sent_at_ns"]) == summary["postcopy_requests"]
    assert 0 < len(read_after) <= summary["source_requests"]
    for leg in (*LEGS, *GROUPS):
        figures, whole = after[leg], summary[leg]
        assert set(figures) == set(whole) == {"count", "p50", "p99"}
        assert figures["count"] <= whole["count"]
        assert figures["p50"] <= figures["p99"]
    assert after["request_sent_us"]["p50"] > 0 and after["request_served_us"]["p50"] > 0
    # Every request paired across both ends is in one group or the other, and only a request
    # the source read from the resume on, with its verdict, is in either.
    already, sent_for = after["page_already_sent"], after["page_sent_for_request"]
    assert already["count"] + sent_for["count"] == after["request_read_us"]["count"] > 0
    read = zip(found["read_at"], found["already_sent"], strict=True)
    verdicts = [verdict for at, verdict in read if at >= resumed]
    assert already["count"] <= verdicts.count(True)
    assert 0 < sent_for["count"] <= verdicts.count(False)
    assert already["count"] + sent_for["count"] < (
        summary["page_already_sent"]["count"] + summary["page_sent_for_request"]["count"]
    )
    assert after["since_s"] == pytest.approx(
        summary["destination_pauses"][0]["resumed_at_s"], abs=1e-5
    )


def test_the_human_summary_has_one_line_for_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qmig", "simulate", *RECOVERING],
        capture_output=True,
        text=True,
        timeout=simulating.TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    rows = [line for line in lines if line.startswith("after recovery")]
    assert len(rows) == 1 and " sent from " in rows[0]
    # Under it, its requests by what each found; the whole run's has a line of its own.
    under = lines[lines.index(rows[0]) + 1 :]
    found = [line for line in under if line.startswith("by page")]
    assert len(found) == 1 and re.match(r"by page +page already sent [\d,]+: p50 ", found[0])
    assert len([line for line in lines if line.startswith("requests by page")]) == 1


def test_absent_without_a_recovery() -> None:
    result = simulating.verified("--ram", "64M", "--postcopy-after", "0")
    assert result["recoveries"] == 0
    assert "after_last_recovery" not in result
    assert result["request_sent_us"]["count"] == result["postcopy_requests"] > 0
