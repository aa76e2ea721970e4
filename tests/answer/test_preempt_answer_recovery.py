"""``qmig simulate --preempt`` paused and recovered, with the source's C answer thread: on the
8.0 variant a new thread answers on each recovery's new preempt channel (the pause stops the
old one), and every requested page goes out once, from the thread or from the Python loop
(the requests the destination sends again after POSTCOPY_RESUME, read with the handshake).
The pre-7.2 variant's urgent pages stay the migration thread's: no thread, recovered or not.
"""

from __future__ import annotations

from typing import Any

import pytest
import simulating

pytestmark = pytest.mark.uffd
TIMEOUT = 240
VCPUS = 2
# Capped and switched over at once, so that the guest outruns the stream and asks for many
# pages on every leg of the migration.
ARGS = ("--ram", "64M", "--postcopy-after", "0", "--bandwidth", "20", "--vcpus", str(VCPUS))


def simulate(*args: str) -> dict[str, Any]:
    result = simulating.verified("--preempt", *ARGS, *args, timeout=TIMEOUT)
    return result


def answered_once(result: dict[str, Any]) -> None:
    """Every requested page went out on the preempt channel once: the source counts each
    page it wrote there, from the thread or from the loop, as one requested page."""
    pages = result["preempt_pages"]
    assert pages["sent"]["preempt"] == result["postcopy"]["requested_pages"] > 0
    if result["recoveries"] == 0:
        assert pages["received"] == pages["sent"]
    else:
        # Pages in flight on a channel that was cut are lost there and asked for again: the
        # destination may count fewer than were sent (that each arrived, verified says).
        assert 0 < pages["received"]["preempt"] <= pages["sent"]["preempt"]


@pytest.mark.parametrize(
    "cut",
    [
        ("--pause-after", "300", "--pauses", "2"),
        ("--pause-after", "4000", "--pauses", "1"),
        ("--pause-after", "1000", "--pauses", "2", "--pause-during-recovery"),
    ],
    ids=["early-twice", "late", "during-recovery"],
)
def test_each_recovery_starts_the_thread_on_the_new_preempt_channel(cut: tuple[str, ...]) -> None:
    result = simulate("--qemu-version", "10.0", *cut)
    assert result["preempt"]["variant"] == "8.0"
    recoveries = result["recoveries"]
    assert recoveries == int(cut[3])
    fast = result["fast_answer"]
    assert fast["started"] == recoveries + 1
    assert fast["declined"] == 0
    answered_once(result)
    # The loop answers only what the machine read before the thread took the new return
    # path over: the requests the destination sent again after the resume, one per waiting
    # vCPU (and one message more if a read ended inside one). The thread answers the rest.
    # A page placed before the pause is not asked for again, though the destination's C
    # threads placed it ahead of its machine (QEMU drops a request as it places the page):
    # asked again, such pages went out from the loop, dozens on a loaded machine.
    loop_pages = result["preempt_pages"]["sent"]["preempt"] - fast["pages"]
    assert 0 <= loop_pages <= (VCPUS + 1) * recoveries
    assert fast["pages"] > loop_pages


def test_without_the_thread_the_loop_answers_every_leg() -> None:
    result = simulate(
        "--qemu-version", "10.0", "--pause-after", "300", "--pauses", "2", "--no-fast-answer"
    )
    assert result["recoveries"] == 2
    assert result["fast_answer"] == {}
    answered_once(result)


@pytest.mark.parametrize(
    "variant",
    [("--qemu-version", "7.2"), ("--qemu-version", "10.0", "--preempt-variant", "pre-7.2")],
    ids=["qemu-7.2", "qemu-10.0-pre-7.2"],
)
def test_the_pre_7_2_variant_has_no_thread_before_or_after_a_recovery(
    variant: tuple[str, ...],
) -> None:
    result = simulate(*variant, "--pause-after", "300", "--pauses", "2")
    assert result["preempt"]["variant"] == "pre-7.2"
    assert result["recoveries"] == 2
    assert result["fast_answer"] == {}
    answered_once(result)
