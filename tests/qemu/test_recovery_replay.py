"""Postcopy recovery with ``qmig replay`` as the source and a real QEMU destination: the
replay cuts its channel mid-postcopy, the destination pauses (``postcopy-paused``), is told
``migrate-recover URI``, the replay connects there and resumes; the migration completes and
the replayed guest runs on with the counter oracle accepting its memory."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from qemu_helpers import free_port
from test_replay_real import POSTCOPY, TIMEOUT, MachineFactory, check_guest_runs_on, qmig

from qmig.qemu.machine import Machine
from qmig.qemu.qmp import QemuError

VERSIONS = [pytest.param(None, "7.2", id="7.2"), pytest.param("10.0", "10.0", id="10.0")]


def destination(
    machines: MachineFactory, version: str | None, *, preempt: bool = False
) -> tuple[Machine, str]:
    _capture, memory_mib, spec = POSTCOPY
    dest = machines(
        "destination",
        memory_mib=memory_mib,
        guest=spec,
        incoming="defer",
        qemu_version=version,
        machine_type="pc-i440fx-7.2",  # the capture's (10.0 reads 7.2's machine type)
    )
    dest.set_capabilities(postcopy_ram=True, postcopy_preempt=preempt)
    dest.migrate_incoming("tcp:127.0.0.1:0")
    return dest, f"tcp:127.0.0.1:{dest.incoming_port()}"


def replay(uri: str, resume_to: str, wire: str, *args: str) -> subprocess.Popen[str]:
    capture, _, _ = POSTCOPY
    return subprocess.Popen(
        qmig("replay", str(capture), "--to", uri, "--qemu-version", wire, "--json",
             "--bandwidth", "16", "--pause-after", "300", "--resume-to", resume_to,
             "--resume-timeout", "30", *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def recover(dest: Machine, resume_to: str, *, first: str | None = None) -> None:
    """Wait for the destination to pause, then tell it where to listen (after a failed
    ``migrate-recover`` to ``first``, when given: QEMU's reconnect failure)."""
    dest.wait_migration(until=("postcopy-paused",), timeout=TIMEOUT)
    if first is not None:
        dest.qmp("migrate-recover", uri=first)
        time.sleep(1.0)  # nothing connects there: the replay keeps trying resume_to
        dest.wait_migration(until=("postcopy-paused", "postcopy-recover"), timeout=TIMEOUT)
    dest.qmp("migrate-recover", uri=resume_to)


@pytest.mark.qemu
@pytest.mark.parametrize(("version", "wire"), VERSIONS)
def test_replay_paused_and_resumed_into_a_real_destination(
    machines: MachineFactory, tmp_path: Path, version: str | None, wire: str
) -> None:
    dest, uri = destination(machines, version)
    resume_to = f"tcp:127.0.0.1:{free_port()}"
    process = replay(uri, resume_to, wire)
    try:
        recover(dest, resume_to)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["recoveries"] == 1 and summary["paused_ms"] > 0
    assert summary["channels"] == 2
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
    dest, uri = destination(machines, "10.0")
    resume_to = f"tcp:127.0.0.1:{free_port()}"
    process = replay(uri, resume_to, "10.0", "--pause-during-recovery")
    try:
        told = keep_recovering(dest, resume_to, process)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    assert told >= 1
    summary = json.loads(stdout)
    # One recovery, over a third channel at least: the handshake on the second was cut (and
    # a connection may reach the destination before it listens for the recovery again).
    assert summary["recoveries"] == 1 and summary["channels"] >= 3
    check_guest_runs_on(dest, POSTCOPY[2], tmp_path)
