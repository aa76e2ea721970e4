"""``qmig receive`` recovering from a broken channel, driven by qmig's own source: the source
cuts its channel mid-postcopy and resumes to ``--recover-listen``; the dumped RAM equals the
source's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from own_source import cut_and_resumed, resumed_source
from processes import ended, started
from qemu_helpers import free_port

from qmig.ram.uffd import TARGET_PAGE_SIZE
from qmig.runner.channels import CutPlan

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]


def test_receive_takes_the_resumed_channel_on_its_recover_listen_uri(tmp_path: Path) -> None:
    recover_uri = f"tcp:127.0.0.1:{free_port()}"
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--recover-listen", recover_uri,
        "--recover-timeout", "30", "--qemu-version", "7.2", "--json",
        "--dump-ram", str(tmp_path / "dump"),
    ) as (process, first):  # fmt: skip
        uri = first.split()[-1]
        ram, report = cut_and_resumed(uri, recover_uri, 3, CutPlan(500), recover_timeout=30)
        stdout, stderr = ended(process, timeout=60)
    assert f"postcopy paused; waiting for the resumed source on {recover_uri}" in stderr
    summary = json.loads(stdout)
    assert summary["recoveries"] == report.recoveries == 1
    assert summary["state"] == "END"
    assert 0 <= summary["late_faults"] <= summary["faults"]  # as simulate --json counts them
    for block in ram.blocks:
        dumped = (tmp_path / "dump" / f"{block.idstr}.bin").read_bytes()
        assert dumped == bytes(block.ram[: block.used_length]), block.idstr


def test_pages_placed_before_a_pause_are_not_sent_again(tmp_path: Path) -> None:
    """``--pause-after`` cuts the channel at the destination, after a read of its main loop:
    its C receive thread may have read further, and placed those pages as they came, where
    the protocol machine never reads them (the cut drops them). The RECV_BITMAP counts every
    page in place received, as QEMU's receivedmap (set at placement): the source sends
    again exactly the pages not in place, none that was. How far the C thread is ahead is
    timing: runs are repeated until one had pages placed ahead (most do)."""
    ahead = []
    for run in range(RUNS_FOR_PAGES_AHEAD):
        pause, resent, pages = paused_by_the_destination(tmp_path / str(run))
        # The bitmaps' complement, which the source sends again, is what was not in place.
        assert resent == pages - pause["received_pages"]
        assert pause["received_pages"] >= pause["pages"] + pause["placed_ahead"]
        ahead.append(pause["placed_ahead"])
        if pause["placed_ahead"]:
            break
    assert ahead[-1] > 0, ahead


RUNS_FOR_PAGES_AHEAD = 6


def paused_by_the_destination(dump: Path) -> tuple[dict[str, Any], int, int]:
    """A migration from qmig's source into ``qmig receive --pause-after 500``, its RAM
    checked: the destination's pause, the target pages the source sent again after the
    recovery (as the received bitmaps said), and the guest's target pages."""
    recover_uri = f"tcp:127.0.0.1:{free_port()}"
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--recover-listen", recover_uri,
        "--recover-timeout", "30", "--qemu-version", "7.2", "--json", "--pause-after", "500",
        "--dump-ram", str(dump),
    ) as (process, first):  # fmt: skip
        uri = first.split()[-1]
        ram, report, source = resumed_source(uri, recover_uri, 4, None, recover_timeout=30)
        stdout, _stderr = ended(process, timeout=60)
    summary = json.loads(stdout)
    assert summary["recoveries"] == report.recoveries == 1
    for block in ram.blocks:
        dumped = (dump / f"{block.idstr}.bin").read_bytes()
        assert dumped == bytes(block.ram[: block.used_length]), block.idstr
    [pause] = summary["pauses"]
    pages = sum(block.used_length for block in ram.blocks) // TARGET_PAGE_SIZE
    return pause, source.stats.resent_pages, pages
