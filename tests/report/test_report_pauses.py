"""``receive --report`` of a migration that paused twice, driven by qmig's own source (it
cuts its channel mid-postcopy and resumes): the drawn page marks each pause and recovery as
many times as ``--json`` lists them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from own_source import cut_and_resumed
from processes import ended, qmig, started
from report_page import check_drawn, render

from qmig.runner.channels import CutPlan

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(300)]


def test_receive_report_marks_each_pause(tmp_path: Path, chromium: str) -> None:
    page = tmp_path / "receive.html"
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--recover-timeout", "60",
        "--qemu-version", "7.2", "--json", "--report", str(page),
    ) as (process, first):  # fmt: skip
        uri = first.split()[-1]
        # The resumed source connects where it first did: receive listens there again.
        _ram, report = cut_and_resumed(uri, uri, 5, CutPlan(400, pauses=2), recover_timeout=60)
        stdout, _stderr = ended(process, timeout=120)
    summary = json.loads(stdout)
    assert summary["recoveries"] == report.recoveries == len(report.pauses) == 2
    assert len(summary["pauses"]) == 2
    for pause in summary["pauses"]:
        assert pause["paused_ms"] > 0 and pause["channels"] >= 1
        assert pause["bytes"] > 0 and pause["cause"]
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    labels = [node.text for node in drawn.dom.one("div", id="timeline").find("text")]
    assert sum(label.startswith("pause ") for label in labels) == len(summary["pauses"])
    assert sum(label.startswith("resumed ") for label in labels) == summary["recoveries"]
    drawn_pauses = drawn.document["pauses"]
    assert [p["bytes"] for p in drawn_pauses] == [p["bytes"] for p in summary["pauses"]]
    assert [p["pages"] for p in drawn_pauses] == [p["pages"] for p in summary["pauses"]]


FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "postcopy-tcp"


def test_replay_and_receive_reports_mark_the_pause(tmp_path: Path, chromium: str) -> None:
    """``fixtures/postcopy-tcp`` replayed into ``qmig receive``, the replay cutting its channel
    once and resuming: each end's page marks the pause its ``--json`` lists."""
    pages = {"replay": tmp_path / "replay.html", "receive": tmp_path / "receive.html"}
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--recover-timeout", "60",
        "--qemu-version", "7.2", "--json", "--report", str(pages["receive"]),
    ) as (receive, first):  # fmt: skip
        uri = first.split()[-1]
        replay = subprocess.run(
            qmig("replay", str(FIXTURE), "--connect", uri, "--qemu-version", "7.2",
                 "--bandwidth", "64", "--pause-after", "300", "--resume-to", uri, "--json",
                 "--report", str(pages["replay"])),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert replay.returncode == 0, replay.stderr
        stdout, _stderr = ended(receive, timeout=120)
    summaries = {"replay": json.loads(replay.stdout), "receive": json.loads(stdout)}
    for name, summary in summaries.items():
        assert summary["recoveries"] == len(summary["pauses"]) == 1, name
        drawn = render(chromium, pages[name], tmp_path / f"profile-{name}")
        check_drawn(drawn)
        labels = [node.text for node in drawn.dom.one("div", id="timeline").find("text")]
        assert sum(label.startswith("pause ") for label in labels) == len(summary["pauses"])
        assert sum(label.startswith("resumed ") for label in labels) == summary["recoveries"]
        assert [p["pages"] for p in drawn.document["pauses"]] == [
            p["pages"] for p in summary["pauses"]
        ]
    # The replay cut after 300 postcopy pages sent; the destination had placed no more.
    assert summaries["replay"]["pauses"][0]["pages"] >= 300
    assert summaries["receive"]["pauses"][0]["pages"] <= summaries["replay"]["pauses"][0]["pages"]
