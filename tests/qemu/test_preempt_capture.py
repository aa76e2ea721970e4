"""``qmig capture --preempt`` between two real QEMUs with postcopy-preempt: every connection
is relayed and recorded (main stream, return path, preempt channel, one index), the
destination's guest runs on with its counters checked, and the capture inspects and replays."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from processes import qmig
from qemu_helpers import (
    PREEMPT_MEMORY_MIB,
    PREEMPT_SPEC,
    TIMEOUT,
    MachineFactory,
    capture_preempt,
    check_guest_runs_on,
    need,
)

from qmig.capture import read_capture
from qmig.capture.recording import PREEMPT_NAME, Direction, read_index


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "machine_type"),
    [(None, "pc"), ("10.0", "pc"), ("10.0", "pc-i440fx-7.2")],
    ids=["qemu-7.2", "qemu-10.0", "qemu-10.0-machine-7.2"],
)
def test_capture_relays_and_records_the_preempt_channel(
    machines: MachineFactory, tmp_path: Path, version: str | None, machine_type: str
) -> None:
    need(version)
    out, summary = capture_preempt(machines, tmp_path, version=version, machine_type=machine_type)
    assert summary["clean"] is True
    preempt = summary["preempt"]
    assert isinstance(preempt, dict) and preempt["bytes"] > 0
    assert (out / PREEMPT_NAME).stat().st_size == preempt["bytes"]
    chunks = read_index(out / "index.tsv")
    assert {chunk.direction for chunk in chunks} == set(Direction)
    times = [chunk.t_ns for chunk in chunks]
    assert times == sorted(times)  # one timeline for every connection
    capture = read_capture(out)
    assert capture.stream.startswith(b"QEVM")
    assert not (out / PREEMPT_NAME).read_bytes().startswith(b"QEVM")  # no header of its own


@pytest.mark.qemu
def test_a_preempt_capture_inspects_on_one_timeline_and_replays(
    machines: MachineFactory, tmp_path: Path
) -> None:
    out, _summary = capture_preempt(machines, tmp_path)
    inspected = subprocess.run(
        qmig("inspect", str(out), "--json"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    preempt = report["preempt"]
    assert preempt["pages"] > 0 and preempt["ended_with_eos"] is True  # QEMU 7.2's variant
    on_preempt = [r for r in report["requests"] if r["answered_on"] == "preempt"]
    assert on_preempt and preempt["answered_requests"] == len(on_preempt)
    assert all(r["latency_us"] is not None and r["latency_us"] >= 0 for r in on_preempt)
    listing = subprocess.run(
        qmig("inspect", str(out)), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert listing.returncode == 0, listing.stderr
    assert " preempt " in listing.stdout and "at preempt byte" in listing.stdout
    # Replayed into a fresh QEMU, with the pages the preempt channel carried.
    destination = machines(
        "replayed", memory_mib=PREEMPT_MEMORY_MIB, guest=PREEMPT_SPEC, incoming="defer"
    )
    destination.set_capabilities(postcopy_ram=True, postcopy_preempt=True)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    uri = f"tcp:127.0.0.1:{destination.incoming_port()}"
    replayed = subprocess.run(
        qmig("replay", str(out), "--to", uri, "--preempt", "--json", "--bandwidth", "32"),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["preempt"] == "pre-7.2"
    (tmp_path / "replayed").mkdir()
    check_guest_runs_on(destination, PREEMPT_SPEC, tmp_path / "replayed")
