"""Postcopy recovery with ``qmig replay --preempt`` as the source and a real QEMU destination
with postcopy-preempt: the replay cuts its main channel mid-postcopy and closes its preempt
one, the destination pauses and is told ``migrate-recover``; the replay connects there, and
after the bitmaps opens its preempt channel there too; the replayed guest runs on."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemu_helpers import POSTCOPY, MachineFactory, check_guest_runs_on, need
from qemu_recovery import recover, replay_destination, replayed, replaying


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "wire"), [(None, "7.2"), ("10.0", "10.0")], ids=["7.2", "10.0"]
)
def test_replay_preempt_paused_and_resumed_into_a_real_destination(
    machines: MachineFactory, tmp_path: Path, version: str | None, wire: str
) -> None:
    need(version)
    dest, uri = replay_destination(machines, version, preempt=True)
    with replaying(uri, wire, "--preempt") as (process, resume_to):
        recover(dest, resume_to)
        summary = replayed(process)
    assert summary["recoveries"] == 1 and summary["preempt"] == "pre-7.2"
    assert summary["preempt_pages"]["preempt"] > 0
    info = check_guest_runs_on(dest, POSTCOPY[2], tmp_path)
    assert info["status"] == "completed"
