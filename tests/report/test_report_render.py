"""``--report FILE.html`` rendered in headless Chromium: each plot drew its own data.

One real capture (fixtures/postcopy-tcp, QEMU 7.2 → 7.2 through the relay) read by
``qmig inspect DIR``, and one ``qmig simulate`` run. From the drawn page: one marker per page
request, one bar per latency bucket with the bucket's height order, one vertex per time
bucket on each channel's line, one line per migration step, the tables' rows, the summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from report_page import Rendered, bar_height, line_vertices, render

from qmig.latency import LATENCY_DIST_BUCKETS

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "postcopy-tcp"


def qmig(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "qmig", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def check_drawn(page: Rendered) -> None:
    """What every report must show, checked against its own data document."""
    document, dom = page.document, page.dom
    timeline = dom.one("div", id="timeline")
    for index, series in enumerate(document["series"]):
        trace = timeline.one("g", "trace", "scatter", f"traceseries{index}")
        (line,) = trace.find("path", "js-line")
        assert line_vertices(line.attrs["d"]) == len(series["t"]), series["name"]
    answered = [r for r in document["requests"] if not r["in_flight"]]
    in_flight = [r for r in document["requests"] if r["in_flight"]]
    markers = timeline.one("g", "trace", "scatter", "tracerequests").find("path", "point")
    assert len(markers) == len(answered)
    if in_flight:
        crosses = timeline.one("g", "tracerequestsinflight").find("path", "point")
        assert len(crosses) == len(in_flight)
    # One vertical line per migration step, with its label.
    shapes = timeline.one("g", "layer-above").one("g", "shapelayer").find("path")
    assert len(shapes) == len(document["events"])
    labels = [node.text for node in timeline.find("text", "annotation-text")]
    assert labels == [event["name"] for event in document["events"]]

    latency = dom.one("div", id="latency")
    bars = latency.one("g", "trace", "bars").find("g", "point")
    assert len(bars) == LATENCY_DIST_BUCKETS
    heights = [bar_height(bar.one("path").attrs["d"]) for bar in bars]
    dist = document["latency"]["dist"]
    assert [height > 0 for height in heights] == [count > 0 for count in dist]
    # Heights are in the order of the counts (the tallest bar is the largest bucket).
    assert heights.index(max(heights)) == dist.index(max(dist))
    percentiles = [k for k in ("p50", "p99", "max") if document["latency"].get(f"{k}_us")]
    assert len(latency.one("g", "layer-above").one("g", "shapelayer").find("path")) == len(
        percentiles
    )

    tables = dom.find("table", "qmig-table")
    assert [table.attrs["data-title"] for table in tables] == [
        table["title"] for table in document["tables"]
    ]
    for drawn, table in zip(tables, document["tables"], strict=True):
        assert len(drawn.one("tbody").find("tr")) == max(1, len(table["rows"]))
    summary = dom.find("pre")[-1].text
    assert summary.strip() and summary.strip() == document["summary_text"].strip()


def no_fetches(page: Path) -> None:
    """Everything inlined: no script, stylesheet or image from anywhere else."""
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "<img" not in text


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
