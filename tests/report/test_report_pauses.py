"""``receive --report`` of a migration that paused twice, driven by qmig's own source (it
cuts its channel mid-postcopy and resumes): the drawn page marks each pause and recovery as
many times as ``--json`` lists them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from report_page import check_drawn, render

from qmig.protocol.source import Source
from qmig.runner.channels import Channels, CutPlan, connect_with_retries
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.runner.source_ram import GuestRam
from qmig.simulate import default_devices
from qmig.transport import connect

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(300)]


def test_receive_report_marks_each_pause(tmp_path: Path, chromium: str) -> None:
    page = tmp_path / "receive.html"
    process = subprocess.Popen(
        [sys.executable, "-m", "qmig", "receive", "--listen", "tcp:127.0.0.1:0",
         "--recover-timeout", "60", "--qemu-version", "7.2", "--json", "--report", str(page)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        uri = process.stderr.readline().split()[-1]
        ram = GuestRam.generate([("pc.ram", 16 << 20), ("vga.vram", 1 << 20)], seed=5)
        source = Source(ram.blocks, version="7.2", devices=default_devices(5))
        plan = SourcePlan(
            postcopy_after=0, bandwidth=64 << 20, cuts=CutPlan(400, pauses=2), recover_timeout=60
        )
        # The resumed source connects where it first did: receive listens there again.
        reopen = connect_with_retries(lambda timeout: connect(uri, timeout), 60)
        channels = Channels(connect(uri), reopen)
        try:
            report = SourceRunner(channels, source, plan).run()
        finally:
            channels.close_main()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
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
