"""``--report FILE.html`` rendered in headless Chromium: each plot drew its own data.

One real capture (fixtures/postcopy-tcp, QEMU 7.2 → 7.2 through the relay) read by
``qmig inspect DIR``, and one ``qmig simulate`` run. From the drawn page: one marker per page
request, one bar per latency bucket with the bucket's height order, one vertex per time
bucket on each channel's line, one line per migration step, the tables' rows, the summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import processes
import pytest
from report_page import check_drawn, no_fetches, render

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "postcopy-tcp"


def qmig(*args: str) -> dict[str, Any]:
    done = processes.run(*args, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_report_of_a_real_capture(tmp_path: Path, chromium: str) -> None:
    page = tmp_path / "capture.html"
    result = qmig("inspect", str(FIXTURE), "--qemu-version", "7.2", "--report", str(page))
    no_fetches(page)
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    document = drawn.document
    # The page holds what inspect found: every request, and the switchover's steps.
    assert len(document["requests"]) == len(result["requests"]) == 177
    names = [event["name"] for event in document["events"]]
    for step in ("ADVISE", "discards", "LISTEN", "RUN"):
        assert step in names
    assert names.index("discards") < names.index("LISTEN") < names.index("RUN")
    answered = [r for r in result["requests"] if not r["in_flight"]]
    assert document["latency"]["count"] == len(answered) == sum(document["latency"]["dist"])
    assert document["latency"]["p50_us"] == result["request_latency_us"]["p50"]
    # Both directions were drawn, with the bytes the capture holds.
    assert [s["name"] for s in document["series"]] == ["stream", "return path"]
    assert document["series"][0]["bytes"] == result["bytes"]
    assert document["series"][1]["bytes"] == result["return_path"]["bytes"]
    blocks = document["tables"][0]
    assert {row[0] for row in blocks["rows"]} == set(result["ram_blocks"])


@pytest.mark.uffd
def test_report_of_a_simulation(tmp_path: Path, chromium: str) -> None:
    page = tmp_path / "simulate.html"
    result = qmig("simulate", "--ram", "32M", "--postcopy-after", "0", "--report", str(page))
    no_fetches(page)
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    document = drawn.document
    assert result["verified"]
    assert len(document["requests"]) == result["postcopy_requests"] > 0
    assert document["latency"]["dist"] == result["postcopy_latency_dist"]
    names = [event["name"] for event in document["events"]]
    assert names.index("stop") < names.index("LISTEN") < names.index("RUN") < names.index("end")
    sent = next(s for s in document["series"] if s["name"] == "stream")
    assert sent["bytes"] >= result["precopy"]["bytes"] + result["postcopy"]["bytes"]
    vcpus = document["tables"][1]
    assert [row[4] for row in vcpus["rows"]] == result["postcopy_vcpu_blocktime_ms"]
    assert [row[3] for row in vcpus["rows"]] == result["vcpu_run_ms"]


@pytest.mark.uffd
def test_report_of_a_precopy_simulation(tmp_path: Path, chromium: str) -> None:
    """No postcopy: no requests and an empty distribution, drawn as such."""
    page = tmp_path / "precopy.html"
    result = qmig("simulate", "--ram", "32M", "--precopy-only", "--report", str(page))
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    document = drawn.document
    assert result["mode"] == "precopy" and document["requests"] == []
    assert document["latency"]["dist"] == result["postcopy_latency_dist"] == [0] * 24
    names = [event["name"] for event in document["events"]]
    assert "pass 1" in names and "stop" in names and "RUN" not in names


@pytest.mark.uffd
def test_report_of_a_simulation_with_pauses_and_preempt(tmp_path: Path, chromium: str) -> None:
    """Two postcopy pauses, each recovered: a mark where each paused and where each resumed,
    the time paused shaded, and the preempt channel as a series of its own."""
    page = tmp_path / "pauses.html"
    result = qmig(
        "simulate",
        "--ram",
        "32M",
        "--postcopy-after",
        "0",
        "--pause-after",
        "300",
        "--pauses",
        "2",
        "--preempt",
        "--report",
        str(page),
    )
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)  # (which counts the drawn pause and recovery marks and the spans)
    document = drawn.document
    assert result["verified"] and result["recoveries"] == 2
    assert len(result["pauses"]) == len(document["pauses"]) == 2
    labels = [node.text for node in drawn.dom.one("div", id="timeline").find("text")]
    assert sum(label.startswith("pause ") for label in labels) == result["recoveries"]
    assert sum(label.startswith("resumed ") for label in labels) == result["recoveries"]
    for summary, drawn_pause in zip(result["pauses"], document["pauses"], strict=True):
        assert summary["paused_ms"] is not None and summary["paused_ms"] > 0
        assert drawn_pause["bytes"] == summary["bytes"] and drawn_pause["pages"] >= 300
        assert drawn_pause["t"] < drawn_pause["resumed_t"]
    assert [pause["pages"] for pause in result["pauses"]] == sorted(
        pause["pages"] for pause in result["pauses"]
    )
    # The destination paused as often, and says so in its own list.
    assert len(result["destination_pauses"]) == 2
    table = next(t for t in document["tables"] if t["title"] == "Pauses and recoveries")
    assert [row[0] for row in table["rows"]] == [1, 2]
    preempt = next(s for s in document["series"] if s["name"] == "preempt")
    assert preempt["bytes"] > 0
    # Each page record is at least its 8-byte header and one byte (a zero page's fill).
    sent = result["preempt_pages"]["sent"]["preempt"]
    assert sent > 0 and preempt["bytes"] >= sent * 9
