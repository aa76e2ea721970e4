"""``qmig simulate`` with page requests sent from C, through pauses and recoveries.

While paused the C sends nothing (the machine keeps the faults and asks again after
POSTCOPY_RESUME, from its own last block); after the resume the C sends again from the
machine's last block. Any request lost, doubled or sent with the wrong block would leave a
vCPU waiting or a page wrong: every page is verified at the end, and every request the C
sent has been told to the machine and timed.
"""

from __future__ import annotations

from typing import Any

import pytest
import simulating

pytestmark = pytest.mark.uffd
RAM = ("--ram", "64M", "--postcopy-after", "0")


def verified(*args: str) -> dict[str, Any]:
    return simulating.recovered(*RAM, *args)


@pytest.mark.parametrize("preempt", [(), ("--preempt",)], ids=["main", "preempt"])
def test_requests_from_c_through_pauses(preempt: tuple[str, ...]) -> None:
    result = verified("--pause-after", "1500", "--pauses", "2", *preempt)
    assert result["recoveries"] == 2
    assert result["postcopy_requests"] > 0
    assert result["request_sent_us"]["p50"] > 0  # each one timed from its fault


def test_a_cut_during_the_handshake() -> None:
    result = verified("--pause-after", "1500", "--pauses", "2", "--pause-during-recovery")
    assert result["recoveries"] == 2


def test_the_python_path_is_kept_without_the_fast_path() -> None:
    result = verified("--pause-after", "1500", "--no-fast-path")
    assert result["recoveries"] == 1
    assert result["postcopy_requests"] > 0
