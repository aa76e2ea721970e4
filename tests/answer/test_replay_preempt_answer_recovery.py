"""``qmig replay --preempt`` with the 8.0 variant into a real QEMU 10.0 destination (told
``x-preempt-pre-7-2=false``), paused mid-postcopy and recovered: the source's C answer thread
stops with the pause and a new one answers on the preempt channel that the replay opens again
after the bitmap sync. The destination's guest runs on and its counters check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "qemu"))
from qemu_helpers import free_port, need
from test_recovery_replay import recover, replay
from test_replay_real import POSTCOPY, TIMEOUT, MachineFactory, check_guest_runs_on


@pytest.mark.qemu
def test_the_thread_answers_again_after_a_recovery_into_real_qemu(
    machines: MachineFactory, tmp_path: Path
) -> None:
    need("10.0")
    _capture, memory_mib, spec = POSTCOPY
    dest = machines(
        "destination",
        memory_mib=memory_mib,
        guest=spec,
        incoming="defer",
        qemu_version="10.0",
        machine_type="pc-i440fx-7.2",  # the capture's
        extra_args=("-global", "migration.x-preempt-pre-7-2=false"),
    )
    dest.set_capabilities(postcopy_ram=True, postcopy_preempt=True)
    dest.migrate_incoming("tcp:127.0.0.1:0")
    uri = f"tcp:127.0.0.1:{dest.incoming_port()}"
    resume_to = f"tcp:127.0.0.1:{free_port()}"
    process = replay(uri, resume_to, "10.0", "--preempt", "--preempt-variant", "8.0")
    try:
        recover(dest, resume_to)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["recoveries"] == 1 and summary["preempt"] == "8.0"
    assert summary["fast_answer"]["started"] == 2  # at the switchover, and after the resume
    # Each requested page once on the preempt channel, from the thread or the loop.
    assert summary["preempt_pages"]["preempt"] == summary["requested_pages"] > 0
    assert 0 < summary["fast_answer"]["pages"] <= summary["requested_pages"]
    info = check_guest_runs_on(dest, spec, tmp_path)
    assert info["status"] == "completed"
