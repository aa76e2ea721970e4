"""``qmig simulate`` without preempt, the source's C answer thread writing requested pages on
the main channel between the loop's pieces of stream: every page verified (each placed once,
right), under a cap, through a pause, and the same runs from the Python loop with
``--no-fast-answer``."""

from __future__ import annotations

from typing import Any

import pytest
import simulating

pytestmark = pytest.mark.uffd
TIMEOUT = 300
ARGS = ("--ram", "64M", "--postcopy-after", "0")


def verified(*args: str) -> dict[str, Any]:
    result = simulating.verified(*ARGS, *args, timeout=TIMEOUT)
    assert result["preempt"] is None
    return result


def answered_by_the_thread(result: dict[str, Any]) -> int:
    pages: int = result["fast_answer"]["pages"]
    # Requested pages that the thread wrote are counted once, with the machine's own.
    assert 0 < pages <= result["postcopy"]["requested_pages"]
    return pages


@pytest.mark.parametrize("cap", [[], ["--bandwidth", "20"]], ids=["uncapped", "capped"])
def test_the_c_thread_answers_on_the_main_channel(cap: list[str]) -> None:
    result = verified(*cap)
    answered_by_the_thread(result)
    assert result["request_served_us"]["p50"] > 0


def test_without_the_thread_the_python_loop_answers() -> None:
    result = verified("--no-fast-answer")
    assert result["fast_answer"] == {}
    assert result["postcopy"]["requested_pages"] > 0


def test_the_thread_answers_again_after_a_pause() -> None:
    """The thread stops at the pause and starts again on the recovered channel; every page
    still arrives right."""
    result = verified("--pause-after", "4000", "--pauses", "1")
    assert result["recoveries"] == 1
    assert result["fast_answer"]["started"] == 2  # at the switchover, and after the recovery
    answered_by_the_thread(result)
