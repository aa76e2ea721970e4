"""``receive --report`` and ``replay --report`` against real QEMU 7.2, rendered in Chromium.

receive: a real QEMU source migrates a counting guest into ``qmig receive`` (postcopy, capped
so that qmig's workload must request pages). replay: ``fixtures/postcopy-tcp`` into a real
QEMU destination. Each page must have drawn its data (see report_page.check_drawn), and hold
what the command's --json says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from processes import ended, qmig, started
from qemu_helpers import TIMEOUT, capture_preempt, destination_for, postcopy_migration
from report_page import check_drawn, no_fetches, render

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import QEMU_BINARY, Machine

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which(QEMU_BINARY) is None and not os.environ.get("CI"),
        reason=f"{QEMU_BINARY} is not installed",
    ),
]
FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "postcopy-tcp"


def test_receive_report(machines: Callable[..., Machine], tmp_path: Path, chromium: str) -> None:
    page = tmp_path / "receive.html"
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--accept-timeout", "30",
        "--idle-timeout", "20", "--json", "--report", str(page),
    ) as (process, first):  # fmt: skip
        uri = first.split()[-1]
        source = machines("source", memory_mib=128, guest=GuestSpec(end=32 * MIB))
        postcopy_migration(source, uri)
        stdout, _stderr = ended(process, TIMEOUT)
    summary = json.loads(stdout)
    no_fetches(page)
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    document = drawn.document
    assert summary["requests"] > 0
    assert len(document["requests"]) == summary["request_to_placed_us"]["count"]
    assert document["latency"]["dist"] == summary["postcopy_latency_dist"]
    names = [event["name"] for event in document["events"]]
    assert names.index("LISTEN") < names.index("RUN") < names.index("end")
    received = next(s for s in document["series"] if s["name"] == "stream")
    assert received["bytes"] == summary["bytes"]
    vcpus = document["tables"][1]
    assert [row[4] for row in vcpus["rows"]] == summary["postcopy_vcpu_blocktime_ms"]
    assert [row[3] for row in vcpus["rows"]] == summary["vcpu_run_ms"]


def test_replay_report(machines: Callable[..., Machine], tmp_path: Path, chromium: str) -> None:
    destination, uri = destination_for(machines, 64, GuestSpec(end=40 * MIB))
    page = tmp_path / "replay.html"
    done = subprocess.run(
        qmig("replay", str(FIXTURE), "--to", uri, "--qemu-version", "7.2", "--bandwidth", "32",
             "--json", "--report", str(page)),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    destination.wait_migration(timeout=TIMEOUT)
    no_fetches(page)
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    document = drawn.document
    assert len(document["requests"]) == summary["requests"] > 0
    assert document["latency"]["count"] == summary["request_to_sent_us"]["count"]
    names = [event["name"] for event in document["events"]]
    assert names[:2] == ["pass 1", "stop"] and names[-1] == "end"


def test_inspect_report_of_a_preempt_capture(
    machines: Callable[..., Machine], tmp_path: Path, chromium: str
) -> None:
    """A real postcopy-preempt migration captured by ``qmig capture --preempt``: inspect's
    page draws the preempt channel as a series of its own, with the bytes it carried."""
    out, captured = capture_preempt(machines, tmp_path)
    page = tmp_path / "inspect.html"
    done = subprocess.run(
        qmig("inspect", str(out), "--json", "--report", str(page)),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    series = {s["name"]: s["bytes"] for s in drawn.document["series"]}
    assert series["preempt"] == captured["preempt"]["bytes"] == report["preempt"]["bytes"] > 0
    assert series["stream"] == captured["stream"]["bytes"]
