"""``qmig capture --preempt`` of a recovered postcopy-preempt migration between two real QEMU
7.2s: paused with ``migrate-pause``, resumed through the relay, which takes the source's new
preempt channel after the new main one; the capture inspects on one timeline and replays."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from test_recovery_capture import MEMORY_MIB, SPEC, TIMEOUT, free_port, qmig
from test_replay_real import check_guest_runs_on

from qmig.qemu.guest import MIB
from qmig.qemu.machine import Machine


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "wire", "ends_with_eos"),
    [(None, "7.2", True), ("10.0", "10.0", False)],
    ids=["7.2", "10.0"],
)
def test_capture_of_a_recovered_preempt_migration_inspects_and_replays(
    machines: object, tmp_path: Path, version: str | None, wire: str, ends_with_eos: bool
) -> None:
    start = machines  # the qemu fixture: start(name, **MachineConfig fields)
    assert callable(start)
    destination: Machine = start(
        "destination", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer", qemu_version=version
    )
    destination.set_capabilities(postcopy_ram=True, postcopy_preempt=True)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    recover_uri = f"tcp:127.0.0.1:{free_port()}"
    out = tmp_path / "capture"
    relay = subprocess.Popen(
        qmig("capture", "--listen", "tcp:127.0.0.1:0",
             "--connect", f"tcp:127.0.0.1:{destination.incoming_port()}",
             "--recover-connect", recover_uri, "--recover-timeout", "60",
             "--out", str(out), "--json", "--preempt"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert relay.stderr is not None
        relay_uri = relay.stderr.readline().split()[-1]
        source: Machine = start("source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=version)
        source.wait_serial(1)
        source.set_capabilities(postcopy_ram=True, postcopy_preempt=True)
        source.set_parameters(max_bandwidth=32 * MIB, max_postcopy_bandwidth=4 * MIB)
        source.migrate(relay_uri)
        time.sleep(0.5)
        source.start_postcopy()
        source.wait_migration(until=("postcopy-active",), timeout=TIMEOUT)
        time.sleep(0.5)
        source.qmp("migrate-pause")
        source.wait_migration(until=("postcopy-paused",), timeout=TIMEOUT)
        destination.wait_migration(until=("postcopy-paused",), timeout=TIMEOUT)
        destination.qmp("migrate-recover", uri=recover_uri)
        source.set_parameters(max_postcopy_bandwidth=0)
        source.qmp("migrate", uri=relay_uri, resume=True)
        source.wait_migration(timeout=TIMEOUT)
        stdout, stderr = relay.communicate(timeout=TIMEOUT)
    finally:
        relay.kill()
        relay.wait()
    assert relay.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["clean"] is True
    assert len(summary["connections"]) == 2
    # The preempt channel was opened again after the recovery, recorded after the first.
    assert 0 < summary["connections"][1]["preempt_offset"] <= summary["preempt"]["bytes"]
    check_guest_runs_on(destination, SPEC, tmp_path)

    # One timeline: both connections read, the second from its top level.
    inspected = subprocess.run(
        qmig("inspect", str(out), "--json"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["counts"]["RECV_BITMAP"] >= 1
    assert report["counts"]["POSTCOPY_RESUME"] == 1
    assert report["return_path"]["counts"]["RESUME_ACK"] == 1
    assert report["preempt"]["pages"] > 0 and report["preempt"]["answered_requests"] > 0
    assert report["preempt"]["ended_with_eos"] is ends_with_eos
    listing = subprocess.run(
        qmig("inspect", str(out)), capture_output=True, text=True, timeout=TIMEOUT
    ).stdout.splitlines()
    boundary = summary["connections"][1]["stream_offset"]
    heading = listing.index(f"resumed connection from stream byte {boundary}")
    assert "RECV_BITMAP" in listing[heading + 1]  # the new connection opens with them

    # And the capture replays into a fresh destination, whose guest runs on.
    fresh: Machine = start(
        "fresh", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer", qemu_version=version
    )
    fresh.set_capabilities(postcopy_ram=True, postcopy_preempt=True)
    fresh.migrate_incoming("tcp:127.0.0.1:0")
    replayed = subprocess.run(
        qmig("replay", str(out), "--to", f"tcp:127.0.0.1:{fresh.incoming_port()}",
             "--qemu-version", wire, "--json", "--preempt"),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    (tmp_path / "fresh").mkdir()
    check_guest_runs_on(fresh, SPEC, tmp_path / "fresh")
