"""``qmig simulate --pause-after``: the link cut mid-postcopy (abruptly, both directions),
both ends paused and recovered on a new connection, every page verified at the end."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import simulating
from simulating import run_simulate

pytestmark = pytest.mark.uffd
RAM = ("--ram", "64M")


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return run_simulate(*RAM, *args)


def verified(*args: str) -> dict[str, Any]:
    return simulating.recovered(*RAM, *args)


def test_one_cut_mid_postcopy_recovers_once_and_loses_nothing() -> None:
    # Everything in postcopy, so the cut lands with most pages still to come.
    result = verified("--postcopy-after", "0", "--pause-after", "2000", "--qemu-version", "7.2")
    assert result["recoveries"] == 1
    assert result["paused_ms"] > 0
    # The destination kept what it had received before the cut; the rest went again.
    assert 0 < result["resent_pages"] < 64 * 256
    # Exactly what it did not have: its received bitmap counted every page in place.
    [pause] = result["destination_pauses"]
    assert result["resent_pages"] == result["pages_total"] - pause["received_pages"]
    assert result["postcopy"]["pages"] >= 64 * 256


def test_several_cuts_and_a_cut_during_the_handshake() -> None:
    result = verified(
        "--postcopy-after", "0", "--pause-after", "1500", "--pauses", "3",
        "--pause-during-recovery",
    )  # fmt: skip
    assert result["recoveries"] == 3
    assert result["channels"] == 5  # the first, one per recovery, and the cut handshake's


def test_after_a_precopy_pass_with_a_dirtying_guest() -> None:
    result = verified("--dirty-rate", "20000", "--pause-after", "100")
    assert result["recoveries"] == 1


def test_recovery_options_are_checked_in_one_line() -> None:
    done = simulate("--precopy-only", "--pause-after", "10")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "qmig: error: --pause-after: postcopy recovery needs postcopy (not precopy only)"
    ]
    done = simulate("--pause-during-recovery")
    assert done.stderr.strip() == "qmig: error: --pause-during-recovery: needs --pause-after"
