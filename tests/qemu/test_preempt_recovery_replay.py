"""Postcopy recovery with ``qmig replay --preempt`` as the source and a real QEMU destination
with postcopy-preempt: the replay cuts its main channel mid-postcopy and closes its preempt
one, the destination pauses and is told ``migrate-recover``; the replay connects there, and
after the bitmaps opens its preempt channel there too; the replayed guest runs on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemu_helpers import free_port, need
from test_recovery_replay import destination, recover, replay
from test_replay_real import POSTCOPY, TIMEOUT, MachineFactory, check_guest_runs_on


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "wire"), [(None, "7.2"), ("10.0", "10.0")], ids=["7.2", "10.0"]
)
def test_replay_preempt_paused_and_resumed_into_a_real_destination(
    machines: MachineFactory, tmp_path: Path, version: str | None, wire: str
) -> None:
    need(version)
    dest, uri = destination(machines, version, preempt=True)
    resume_to = f"tcp:127.0.0.1:{free_port()}"
    process = replay(uri, resume_to, wire, "--preempt")
    try:
        recover(dest, resume_to)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["recoveries"] == 1 and summary["preempt"] == "pre-7.2"
    assert summary["preempt_pages"]["preempt"] > 0
    info = check_guest_runs_on(dest, POSTCOPY[2], tmp_path)
    assert info["status"] == "completed"
