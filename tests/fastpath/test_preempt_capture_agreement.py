"""Real QEMU preempt migrations, recorded by ``qmig capture``, read by the C preempt path and
by the channel's machine alike: the main stream up to RUN, then the preempt channel, then the
rest. QEMU 7.2 (its variant, which ends with EOS), QEMU 10.0 on its current machine type
(8.0) and on ``pc-i440fx-7.2`` (pre-7.2). Both runs place the same pages with the same
contents and counts, and the C thread takes the channel's records itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from preempt_harness import assert_runs_agree, run_preempt, split_at_run
from qemu_helpers import MachineFactory, capture_preempt, need

from qmig.capture import read_capture
from qmig.capture.recording import PREEMPT_NAME
from qmig.protocol.preempt import PreemptVariant

pytestmark = [pytest.mark.qemu, pytest.mark.uffd]


@pytest.mark.parametrize(
    ("version", "machine_type", "variant"),
    [
        (None, "pc", PreemptVariant.PRE_7_2),
        ("10.0", "pc", PreemptVariant.V8_0),
        ("10.0", "pc-i440fx-7.2", PreemptVariant.PRE_7_2),
    ],
    ids=["qemu-7.2", "qemu-10.0", "qemu-10.0-machine-7.2"],
)
def test_a_real_preempt_capture(
    machines: MachineFactory,
    tmp_path: Path,
    version: str | None,
    machine_type: str,
    variant: PreemptVariant,
) -> None:
    need(version)
    out, summary = capture_preempt(machines, tmp_path, version=version, machine_type=machine_type)
    preempt = (out / PREEMPT_NAME).read_bytes()
    assert summary["clean"] is True and preempt
    profile = version or "7.2"
    stream = split_at_run(read_capture(out).stream, profile)
    fast = run_preempt(variant, stream, preempt, fast_path=True, version=profile)
    slow = run_preempt(variant, stream, preempt, fast_path=False, version=profile)
    assert_runs_agree(fast, slow)
    assert fast.error is None
    assert fast.preempt_pages > 0
    assert fast.fast_path["preempt_records"] > 0
    assert fast.fast_path["place_errors"] == 0
