"""Postcopy recovery with ``qmig replay`` as the source and a real QEMU destination: the
replay cuts its channel mid-postcopy, the destination pauses (``postcopy-paused``), is told
``migrate-recover URI``, the replay connects there and resumes; the migration completes and
the replayed guest runs on with the counter oracle accepting its memory."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from qemu_helpers import POSTCOPY, MachineFactory, check_guest_runs_on
from qemu_recovery import recover, replay_destination, replayed, replaying

from qmig.qemu.machine import Machine
from qmig.qemu.qmp import QemuError

VERSIONS = [pytest.param(None, "7.2", id="7.2"), pytest.param("10.0", "10.0", id="10.0")]


@pytest.mark.qemu
@pytest.mark.parametrize(("version", "wire"), VERSIONS)
def test_replay_paused_and_resumed_into_a_real_destination(
    machines: MachineFactory, tmp_path: Path, version: str | None, wire: str
) -> None:
    dest, uri = replay_destination(machines, version)
    with replaying(uri, wire) as (process, resume_to):
        recover(dest, resume_to)
        summary = replayed(process)
    assert summary["recoveries"] == 1 and summary["paused_ms"] > 0
    assert summary["channels"] == 2
    info = check_guest_runs_on(dest, POSTCOPY[2], tmp_path)
    assert info["status"] == "completed"


@pytest.mark.qemu
@pytest.mark.parametrize(("version", "wire"), VERSIONS)
def test_a_cut_after_the_first_postcopy_page_waits_until_the_destination_runs(
    machines: MachineFactory, tmp_path: Path, version: str | None, wire: str
) -> None:
    """QEMU pauses on a broken channel only once it has reached RUN; its listen thread reads
    the stream after the package while the main thread is still loading the package. A cut
    due after one postcopy page waits for the PONG of the package's PING before RUN (without
    that wait the destination failed: "loadvm failed: -5")."""
    dest, uri = replay_destination(machines, version)
    with replaying(uri, wire, "--pause-after", "1") as (process, resume_to):
        recover(dest, resume_to)
        summary = replayed(process)
    assert summary["recoveries"] == 1
    info = check_guest_runs_on(dest, POSTCOPY[2], tmp_path)
    assert info["status"] == "completed"


def keep_recovering(dest: Machine, resume_to: str, process: subprocess.Popen[str]) -> int:
    """Tell the destination ``migrate-recover`` whenever it is paused, until the replay ends;
    how many times it was told."""
    told = 0
    while process.poll() is None:
        status = dest.query_migrate().get("status")
        if status == "postcopy-paused":
            try:
                dest.qmp("migrate-recover", uri=resume_to)
                told += 1
            except QemuError:
                pass  # already listening for this pause
        time.sleep(0.1)
    return told


@pytest.mark.qemu
def test_a_new_channel_cut_during_the_handshake_pauses_again_and_recovers(
    machines: MachineFactory, tmp_path: Path
) -> None:
    """QEMU's double failure (its postcopy/recovery/double-failures/handshake test). Only
    QEMU 8.x on lets a destination in postcopy-recover pause again; 7.2 cannot."""
    dest, uri = replay_destination(machines, "10.0")
    with replaying(uri, "10.0", "--pause-during-recovery") as (process, resume_to):
        told = keep_recovering(dest, resume_to, process)
        summary = replayed(process)
    assert told >= 1
    # One recovery, over a third channel at least: the handshake on the second was cut (and
    # a connection may reach the destination before it listens for the recovery again).
    assert summary["recoveries"] == 1 and summary["channels"] >= 3
    check_guest_runs_on(dest, POSTCOPY[2], tmp_path)
