"""Reports of multifd migrations, rendered in headless Chromium: one line per multifd channel
(``multifd-<K>``), as many as the run's ``--json`` counts channels, each with the bytes that
channel carried, and a row per channel in the channels' table.

``qmig simulate --multifd 2``, then one migration seen from every side: ``fixtures/
precopy-file`` replayed over two channels (``replay --report``) through ``qmig capture
--multifd 2`` into ``qmig receive --multifd 2`` (``receive --report``), and the capture folder
read back (``inspect DIR --report``), whose sync points are drawn too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from processes import ended, qmig, started
from report_page import Rendered, check_drawn, multifd_drawn, render

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(600)]

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "precopy-file"
TIMEOUT = 300


def multifd_table(document: dict[str, Any]) -> dict[str, Any]:
    (table,) = [t for t in document["tables"] if t["title"].startswith("Multifd channels")]
    return table


def check_channels(drawn: Rendered, channel_bytes: list[int], *, in_order: bool = True) -> None:
    """One drawn line per channel, each with points, carrying that channel's bytes (in the
    channels' order, or ``in_order=False``: in some order)."""
    lines = multifd_drawn(drawn)
    assert list(lines) == [f"multifd-{k}" for k in range(len(channel_bytes))]
    assert all(vertices > 0 for vertices in lines.values()), lines
    series = [s for s in drawn.document["series"] if s["name"].startswith("multifd-")]
    drawn_bytes = [s["bytes"] for s in series]
    if not in_order:
        drawn_bytes, channel_bytes = sorted(drawn_bytes), sorted(channel_bytes)
    assert drawn_bytes == channel_bytes, drawn.document["command"]
    assert len(multifd_table(drawn.document)["rows"]) == len(channel_bytes)


def test_report_of_a_multifd_simulation(tmp_path: Path, chromium: str) -> None:
    page = tmp_path / "simulate.html"
    done = subprocess.run(
        qmig("simulate", "--ram", "32M", "--multifd", "2", "--report", str(page), "--json"),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["verified"] and result["multifd"]["sent"]["channels"] == 2
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    # The timeline counts what the source sent on each channel; the table, what the
    # destination read on each.
    check_channels(drawn, result["multifd"]["sent"]["channel_bytes"])
    received = result["multifd"]["received"]["per_channel"]
    rows = multifd_table(drawn.document)["rows"]
    assert [row[4] for row in rows] == [channel["pages"] for channel in received]
    assert sum(row[4] for row in rows) == result["multifd"]["sent"]["normal_pages"] > 0


def test_reports_of_one_multifd_migration_from_every_side(tmp_path: Path, chromium: str) -> None:
    pages = {name: tmp_path / f"{name}.html" for name in ("replay", "receive", "inspect")}
    folder = tmp_path / "capture"
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--multifd", "2", "--qemu-version", "7.2",
        "--json", "--report", str(pages["receive"]),
    ) as (receive, first):  # fmt: skip
        destination = first.split()[-1]
        with started(
            "capture", "--listen", "tcp:127.0.0.1:0", "--connect", destination,
            "--out", str(folder), "--multifd", "2", "--json",
        ) as (capture, first):  # fmt: skip
            relay = first.split()[-1]
            replay = subprocess.run(
                qmig("replay", str(FIXTURE), "--connect", relay, "--multifd", "2",
                     "--qemu-version", "7.2", "--json", "--report", str(pages["replay"])),
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert replay.returncode == 0, replay.stderr
            received, _ = ended(receive, TIMEOUT)
            ended(capture, TIMEOUT)
    inspected = subprocess.run(
        qmig("inspect", str(folder), "--json", "--report", str(pages["inspect"])),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert inspected.returncode == 0, inspected.stderr
    sent = json.loads(replay.stdout)["multifd"]
    read = json.loads(received)["multifd"]
    held = json.loads(inspected.stdout)["multifd"]
    assert sent["channels"] == read["channels"] == len(held["channels"]) == 2
    channel_bytes = {
        "replay": sent["channel_bytes"],
        "receive": [channel["bytes"] for channel in read["per_channel"]],
        "inspect": [channel["bytes"] for channel in held["channels"]],
    }
    for name, page in pages.items():
        drawn = render(chromium, page, tmp_path / f"profile-{name}")
        check_drawn(drawn)  # (which counts the drawn sync marks against the page's data)
        # receive numbers its series in the order it took the connections, its --json by
        # their handshake ids.
        check_channels(drawn, channel_bytes[name], in_order=name != "receive")
        if name == "inspect":
            syncs = drawn.document["syncs"]
            assert len(syncs) == len(held["sync_points"]) > 0
            rows = multifd_table(drawn.document)["rows"]
            assert [row[3:] for row in rows] == [
                [c["packets"], c["pages"], c["zero_pages"], c["syncs"]] for c in held["channels"]
            ]
    # Every side counted the same bytes on each channel.
    assert channel_bytes["replay"] == channel_bytes["receive"] == channel_bytes["inspect"]
