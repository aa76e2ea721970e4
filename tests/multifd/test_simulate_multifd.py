"""``qmig simulate --multifd N``: a qmig source and destination over N extra channels, verified
page by page, with each end's count of what each channel carried."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest
from simulating import TIMEOUT, run_simulate
from simulating import verified as simulate

from qmig.protocol.multifd import mark_received

PAGES_64M = 64 * 256


def refused(*args: str) -> str:
    done = run_simulate(*args)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def check_channels(result: dict[str, Any], channels: int, *, cut: bool = False) -> None:
    """Both ends agree on every channel's pages, and every channel carried some. ``cut``:
    the link was cut in postcopy, and main-channel pages in flight then were lost (and sent
    again after the recovery): the destination counts fewer there."""
    pages = result["multifd_pages"]
    names = ["main"] + [f"multifd-{k}" for k in range(channels)]
    assert list(pages["sent"]) == names
    if cut:
        assert pages["received"]["main"] <= pages["sent"]["main"]
        pages = {side: {**counts, "main": 0} for side, counts in pages.items()}
    assert pages["received"] == pages["sent"]
    assert all(pages["sent"][f"multifd-{k}"] > 0 for k in range(channels))
    sent, received = result["multifd"]["sent"], result["multifd"]["received"]
    assert sent["channels"] == received["channels"] == channels
    assert [c["id"] for c in received["per_channel"]] == list(range(channels))
    # Every byte each channel sent (handshake, packets) was read by the other end.
    assert [c["bytes"] for c in received["per_channel"]] == sent["channel_bytes"]
    assert result["multifd_syncs"]["sent"] == result["multifd_syncs"]["received"] > 0
    assert (
        sum(c["packets"] for c in received["per_channel"])
        == sent["packets"] + sent["syncs"] * channels
    )


@pytest.mark.uffd
@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_precopy_over_multifd_channels(version: str, channels: int) -> None:
    result = simulate(
        "--ram", "64M", "--precopy-only", "--multifd", str(channels), "--qemu-version", version
    )
    assert result["mode"] == "precopy"
    assert result["qemu_version"] == version
    check_channels(result, channels)
    # A quiet guest's one pass: every page once, the non-zero ones in packets. Zero pages
    # go as ZERO records on the main channel with 7.2; 10.0's own machine type (which qmig's
    # source names by default) lists them in the packets.
    pages = result["multifd_pages"]["sent"]
    assert sum(pages.values()) >= PAGES_64M
    zero = result["precopy"]["zero_pages"]
    assert zero > 0
    if version == "7.2":
        assert result["multifd"]["sent"]["zero_page_detection"] == "legacy"
        assert pages["main"] >= zero
    else:
        assert result["multifd"]["sent"]["zero_page_detection"] == "multifd"
        assert result["multifd"]["sent"]["zero_pages"] >= zero


@pytest.mark.uffd
@pytest.mark.parametrize(("version", "channels"), [("7.2", 2), ("10.0", 4)])
def test_multifd_precopy_then_postcopy(version: str, channels: int) -> None:
    """Between qmig peers multifd goes with postcopy whatever the version (QEMU: 10.1+):
    packets carry precopy, all placed before LISTEN (the destination refuses a page after),
    and the faults after RUN are served on the main channel."""
    result = simulate(
        "--ram", "64M", "--multifd", str(channels), "--qemu-version", version,
        "--dirty-rate", "20000",
    )  # fmt: skip
    assert result["mode"] == "postcopy"
    check_channels(result, channels)
    assert result["discarded_pages"] > 0
    assert result["postcopy"]["pages"] == result["discarded_pages"]
    assert result["postcopy_requests"] > 0 and result["faults"] > 0
    # Postcopy pages are on the main channel: it carried at least all of them.
    assert result["multifd_pages"]["received"]["main"] >= result["postcopy"]["pages"]


@pytest.mark.uffd
def test_zero_pages_listed_in_packets_or_sent_on_the_main_channel() -> None:
    listed = simulate(
        "--ram", "32M", "--precopy-only", "--multifd", "2", "--zero-page-detection", "multifd",
        "--dirty-rate", "0",
    )  # fmt: skip
    legacy = simulate(
        "--ram", "32M", "--precopy-only", "--multifd", "2", "--zero-page-detection", "legacy",
        "--dirty-rate", "0",
    )  # fmt: skip
    check_channels(listed, 2)
    check_channels(legacy, 2)
    zero = legacy["precopy"]["zero_pages"]
    assert zero > 0
    # 9.0+'s multifd detection: the same zero pages, listed in the packets; the main
    # channel carries no page at all.
    assert listed["multifd"]["sent"]["zero_page_detection"] == "multifd"
    assert listed["multifd"]["sent"]["zero_pages"] == zero
    received = listed["multifd"]["received"]["per_channel"]
    assert sum(c["zero_pages"] for c in received) == zero
    assert listed["multifd_pages"]["received"]["main"] == 0
    # Legacy: zero pages as ZERO records on the main channel, none in a packet.
    assert legacy["multifd"]["sent"]["zero_pages"] == 0
    assert legacy["multifd_pages"]["received"]["main"] == zero
    assert sum(legacy["multifd_pages"]["received"].values()) == 32 * 256


@pytest.mark.uffd
def test_recovery_after_a_multifd_precopy_asks_only_for_what_is_missing() -> None:
    """The received bitmap sent at recovery counts the pages the multifd channels placed:
    after a full pass, only pages discarded at the switchover can be missing."""
    result = simulate("--ram", "64M", "--multifd", "2", "--pause-after", "100")
    check_channels(result, 2, cut=True)
    assert result["recoveries"] == 1 == result["destination_recoveries"]
    assert result["precopy_passes"] == 1
    assert 0 < result["resent_pages"] <= result["discarded_pages"]
    multifd = sum(
        count for name, count in result["multifd_pages"]["received"].items() if name != "main"
    )
    assert result["resent_pages"] < multifd


def test_multifd_with_preempt_is_refused() -> None:
    line = refused("--ram", "16M", "--multifd", "2", "--preempt")
    assert line.startswith("qmig: error: --multifd: not together with --preempt")
    assert "destination refuses" in line


def test_zero_page_detection_needs_multifd_and_a_version_that_has_it() -> None:
    assert refused("--ram", "16M", "--zero-page-detection", "multifd") == (
        "qmig: error: --zero-page-detection: needs --multifd"
    )
    line = refused(
        "--ram", "16M", "--multifd", "2", "--qemu-version", "7.2",
        "--zero-page-detection", "multifd",
    )  # fmt: skip
    assert line.startswith("qmig: error: --zero-page-detection: QEMU 7.2 has no")


def test_marking_pages_placed_by_a_channel() -> None:
    state = bytearray(16)
    mark_received(state, array("Q", [4096 * k for k in (3, 4, 5)]), 4096)
    mark_received(state, array("Q", [4096 * k for k in (9, 7)]), 4096)
    mark_received(state, array("Q", [4096 * 12, 4096 * 12, 4096 * 14]), 4096)
    mark_received(state, array("Q"), 4096)
    assert [k for k, held in enumerate(state) if held] == [3, 4, 5, 7, 9, 12, 14]


@pytest.mark.uffd
def test_the_send_benchmark_compares_simulate_over_multifd_with_one_channel() -> None:
    """bench/multifd_send_bench.py --simulate-only still runs at a small size (its figures
    are not asserted, only that both runs verified and multifd carried the RAM)."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "multifd_send_bench.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--simulate-only", "--ram", "32", "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    multifd, single = result["simulate_multifd"], result["simulate_single"]
    assert multifd["same_ram"] is True and single["same_ram"] is True
    assert multifd["channels"] == 4 and single["channels"] == 0
    assert multifd["multifd_bytes"] > 0 and single["multifd_bytes"] is None
    assert "qemu_to_qemu" not in result


@pytest.mark.uffd
def test_the_summary_shows_each_channel_as_both_ends_counted_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qmig", "simulate", "--ram", "16M", "--multifd", "3"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # the table wraps long rows
    assert "verified" in text
    assert "multifd 3 channels," in text and "zero pages multifd" in text  # 10.0, its own machine
    sent_received = text.split("pages sent/received ", 1)[1]
    for name in ("main", "multifd-0", "multifd-1", "multifd-2"):
        found = re.search(rf"{name} (\d+(?:,\d{{3}})*)/(\d+(?:,\d{{3}})*)", sent_received)
        assert found is not None, name
        assert found[1] == found[2] and int(found[1].replace(",", "")) > 0, name
