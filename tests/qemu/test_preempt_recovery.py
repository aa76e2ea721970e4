"""A real QEMU source with postcopy-preempt, paused mid-postcopy (``migrate-pause``) and
resumed into ``qmig receive --preempt``: both channels go with the pause, the source opens
its preempt channel again after the bitmap sync, and the dumped RAM equals the source's."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import need
from test_receive_real import MEMORY_MIB, SPEC, TIMEOUT, MachineFactory, finish, receiving
from test_recovery_receive import check, resume, wait_paused_line

from qmig.qemu.guest import MIB


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "variant"), [(None, "pre-7.2"), ("10.0", "8.0")], ids=["7.2", "10.0"]
)
def test_a_paused_preempt_migration_resumes_into_qmig(
    machines: MachineFactory, tmp_path: Path, version: str | None, variant: str
) -> None:
    need(version)
    dump = str(tmp_path / "dump")
    with receiving("--json", "--preempt", "--dump-ram", dump, "--recover-timeout", "30") as (
        process,
        uri,
    ):
        source = machines("source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=version)
        source.wait_serial(1)
        source.set_capabilities(postcopy_ram=True, postcopy_preempt=True)
        source.set_parameters(max_bandwidth=32 * MIB, max_postcopy_bandwidth=4 * MIB)
        source.migrate(uri)
        time.sleep(0.5)
        source.start_postcopy()
        source.wait_migration(until=("postcopy-active",), timeout=TIMEOUT)
        time.sleep(0.5)
        source.qmp("migrate-pause")
        assert wait_paused_line(process) == uri
        info = resume(source, uri)
        code, stdout, stderr = finish(process)
    assert code == 0, stderr
    summary: dict[str, Any] = json.loads(stdout)
    assert summary["preempt"] == variant
    assert summary["preempt_pages"]["preempt"] > 0
    check(summary, info, source, tmp_path)
