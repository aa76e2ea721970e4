"""``qmig replay --preempt`` into a real QEMU destination with postcopy-preempt on: QEMU 7.2
(the pre-7.2 variant), QEMU 10.0 on the capture's machine type pc-i440fx-7.2 (pre-7.2, as
hw_compat_7_2 says), and QEMU 10.0 told ``x-preempt-pre-7-2=false`` (the 8.0 variant). The
destination's guest runs on and its counters check, as in the replay interop tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemu_helpers import POSTCOPY, MachineFactory, check_guest_runs_on, need
from qemu_recovery import replay_destination
from test_replay_real import run_replay


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "extra", "args", "variant"),
    [
        (None, (), (), "pre-7.2"),
        ("10.0", (), ("--qemu-version", "10.0"), "pre-7.2"),
        (
            "10.0",
            ("-global", "migration.x-preempt-pre-7-2=false"),
            ("--qemu-version", "10.0", "--preempt-variant", "8.0"),
            "8.0",
        ),
    ],
    ids=["qemu-7.2", "qemu-10.0-machine-7.2", "qemu-10.0-8.0-variant"],
)
def test_replay_preempt_into_real_qemu(
    machines: MachineFactory,
    tmp_path: Path,
    version: str | None,
    extra: tuple[str, ...],
    args: tuple[str, ...],
    variant: str,
) -> None:
    need(version)
    capture, _, spec = POSTCOPY
    destination, uri = replay_destination(
        machines, version, preempt=True, blocktime=True, extra_args=extra
    )
    result = run_replay(capture, uri, "--json", "--bandwidth", "32", "--preempt", *args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    info = check_guest_runs_on(destination, spec, tmp_path)
    assert summary["mode"] == "postcopy" and summary["preempt"] == variant
    assert summary["requests"] > 0
    assert summary["preempt_pages"]["preempt"] == summary["requested_pages"] > 0
    assert info["status"] == "completed"
