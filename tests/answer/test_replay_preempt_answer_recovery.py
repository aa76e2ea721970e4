"""``qmig replay --preempt`` with the 8.0 variant into a real QEMU 10.0 destination (told
``x-preempt-pre-7-2=false``), paused mid-postcopy and recovered: the source's C answer thread
stops with the pause and a new one answers on the preempt channel that the replay opens again
after the bitmap sync. The destination's guest runs on and its counters check."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemu_helpers import POSTCOPY, MachineFactory, check_guest_runs_on, need
from qemu_recovery import recover, replay_destination, replayed, replaying


@pytest.mark.qemu
def test_the_thread_answers_again_after_a_recovery_into_real_qemu(
    machines: MachineFactory, tmp_path: Path
) -> None:
    need("10.0")
    dest, uri = replay_destination(
        machines, "10.0", preempt=True, extra_args=("-global", "migration.x-preempt-pre-7-2=false")
    )
    with replaying(uri, "10.0", "--preempt", "--preempt-variant", "8.0") as (process, resume_to):
        recover(dest, resume_to)
        summary = replayed(process)
    assert summary["recoveries"] == 1 and summary["preempt"] == "8.0"
    assert summary["fast_answer"]["started"] == 2  # at the switchover, and after the resume
    # Each requested page once on the preempt channel, from the thread or the loop.
    assert summary["preempt_pages"]["preempt"] == summary["requested_pages"] > 0
    assert 0 < summary["fast_answer"]["pages"] <= summary["requested_pages"]
    info = check_guest_runs_on(dest, POSTCOPY[2], tmp_path)
    assert info["status"] == "completed"
