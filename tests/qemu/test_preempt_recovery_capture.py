"""``qmig capture --preempt`` of a recovered postcopy-preempt migration between two real
QEMUs (7.2, and 10.0): paused with ``migrate-pause``, resumed through the relay, which takes
the source's new preempt channel after the new main one and relays it to the recovery URI;
the capture inspects on one timeline and replays."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemu_helpers import check_guest_runs_on, need
from test_recovery_capture import (
    SPEC,
    capture_a_recovered_migration,
    inspect_the_recovery,
    replay_into_a_fresh_destination,
)


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "wire", "ends_with_eos"),
    [(None, "7.2", True), ("10.0", "10.0", False)],
    ids=["7.2", "10.0"],
)
def test_capture_of_a_recovered_preempt_migration_inspects_and_replays(
    machines: object, tmp_path: Path, version: str | None, wire: str, ends_with_eos: bool
) -> None:
    need(version)
    out = tmp_path / "capture"
    destination, summary = capture_a_recovered_migration(machines, out, version, preempt=True)
    # The preempt channel was opened again after the recovery, recorded after the first.
    assert 0 < summary["connections"][1]["preempt_offset"] <= summary["preempt"]["bytes"]
    check_guest_runs_on(destination, SPEC, tmp_path)

    report = inspect_the_recovery(out, summary)
    assert report["preempt"]["pages"] > 0 and report["preempt"]["answered_requests"] > 0
    assert report["preempt"]["ended_with_eos"] is ends_with_eos
    replay_into_a_fresh_destination(machines, out, tmp_path, version, wire, "--preempt")
