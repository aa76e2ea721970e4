"""``qmig capture`` of a recovered postcopy migration between two real QEMUs: the source is
paused with ``migrate-pause`` mid-postcopy, the destination is told ``migrate-recover``, the
source resumes through the relay; every connection lands in one capture folder, in order.
``qmig inspect`` reads it on one timeline and ``qmig replay`` of it runs a guest.

The steps are shared with the preempt variant (test_preempt_recovery_capture.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from processes import ended, qmig, started
from qemu_helpers import check_guest_runs_on, free_port
from qemu_recovery import start_postcopy

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import Machine

MEMORY_MIB = 64
SPEC = GuestSpec(end=24 * MIB)
TIMEOUT = 90.0


def capture_a_recovered_migration(
    start: Any, out: Path, version: str | None = None, *, preempt: bool = False
) -> tuple[Machine, dict[str, Any]]:
    """Two QEMUs through ``qmig capture`` into ``out``, paused mid-postcopy and resumed; the
    destination (its migration completed) and the relay's summary."""
    destination: Machine = start(
        "destination", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer", qemu_version=version
    )
    destination.set_capabilities(postcopy_ram=True, postcopy_preempt=preempt)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    recover_uri = f"tcp:127.0.0.1:{free_port()}"
    with started(
        "capture", "--listen", "tcp:127.0.0.1:0",
        "--connect", f"tcp:127.0.0.1:{destination.incoming_port()}",
        "--recover-connect", recover_uri, "--recover-timeout", "60",
        "--out", str(out), "--json", *(["--preempt"] if preempt else []),
    ) as (relay, listening):  # fmt: skip
        relay_uri = listening.split()[-1]
        source: Machine = start("source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=version)
        start_postcopy(source, relay_uri, timeout=TIMEOUT, postcopy_preempt=preempt)
        source.qmp("migrate-pause")
        source.wait_migration(until=("postcopy-paused",), timeout=TIMEOUT)
        destination.wait_migration(until=("postcopy-paused",), timeout=TIMEOUT)
        destination.qmp("migrate-recover", uri=recover_uri)
        source.set_parameters(max_postcopy_bandwidth=0)
        source.qmp("migrate", uri=relay_uri, resume=True)
        source.wait_migration(timeout=TIMEOUT)
        stdout, _stderr = ended(relay, TIMEOUT)
    summary: dict[str, Any] = json.loads(stdout)
    assert summary["clean"] is True
    assert len(summary["connections"]) == 2
    return destination, summary


def inspect_the_recovery(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """``qmig inspect`` reads both connections on one timeline, the second from its top
    level (it opens with RECV_BITMAP); its JSON report."""
    inspected = subprocess.run(
        qmig("inspect", str(out), "--json"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert inspected.returncode == 0, inspected.stderr
    report: dict[str, Any] = json.loads(inspected.stdout)
    assert report["counts"]["RECV_BITMAP"] >= 1
    assert report["counts"]["POSTCOPY_RESUME"] == 1
    assert report["return_path"]["counts"]["RESUME_ACK"] == 1
    listing = subprocess.run(
        qmig("inspect", str(out)), capture_output=True, text=True, timeout=TIMEOUT
    ).stdout.splitlines()
    boundary = summary["connections"][1]["stream_offset"]
    heading = listing.index(f"resumed connection from stream byte {boundary}")
    assert "RECV_BITMAP" in listing[heading + 1]  # the new connection opens with them
    return report


def replay_into_a_fresh_destination(
    start: Any, out: Path, tmp_path: Path, version: str | None, wire: str, *args: str
) -> None:
    """The capture replays into a fresh destination, whose guest runs on."""
    fresh: Machine = start(
        "fresh", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer", qemu_version=version
    )
    fresh.set_capabilities(postcopy_ram=True, postcopy_preempt="--preempt" in args)
    fresh.migrate_incoming("tcp:127.0.0.1:0")
    replayed = subprocess.run(
        qmig("replay", str(out), "--to", f"tcp:127.0.0.1:{fresh.incoming_port()}",
             "--qemu-version", wire, "--json", *args),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    (tmp_path / "fresh").mkdir()
    check_guest_runs_on(fresh, SPEC, tmp_path / "fresh")


@pytest.mark.qemu
def test_capture_of_a_recovered_migration_inspects_and_replays(
    machines: object, tmp_path: Path
) -> None:
    out = tmp_path / "capture"
    destination, summary = capture_a_recovered_migration(machines, out)
    check_guest_runs_on(destination, SPEC, tmp_path)
    inspect_the_recovery(out, summary)
    replay_into_a_fresh_destination(machines, out, tmp_path, None, "7.2")
