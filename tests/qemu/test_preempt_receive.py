"""A real QEMU source with postcopy-preempt into ``qmig receive --preempt``: QEMU 7.2 (its
own variant), QEMU 10.0 with a current machine type (the 8.0 variant) and with
``pc-i440fx-7.2`` (the pre-7.2 variant); RAM checked as in the interop tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import need, postcopy_migration
from test_receive_real import (
    MEMORY_MIB,
    SPEC,
    MachineFactory,
    compare_pc_ram,
    finish,
    receiving,
)


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "machine_type", "variant"),
    [
        (None, "pc", "pre-7.2"),
        ("10.0", "pc", "8.0"),
        ("10.0", "pc-i440fx-7.2", "pre-7.2"),
    ],
    ids=["qemu-7.2", "qemu-10.0", "qemu-10.0-machine-7.2"],
)
def test_receive_preempt_from_real_qemu(
    machines: MachineFactory,
    tmp_path: Path,
    version: str | None,
    machine_type: str,
    variant: str,
) -> None:
    need(version)
    dump_dir = tmp_path / "dump"
    with receiving("--json", "--preempt", "--dump-ram", str(dump_dir)) as (process, uri):
        source = machines(
            "source",
            memory_mib=MEMORY_MIB,
            guest=SPEC,
            qemu_version=version,
            machine_type=machine_type,
        )
        info = postcopy_migration(source, uri, postcopy_preempt=True, postcopy_blocktime=True)
        code, stdout, stderr = finish(process)
    assert code == 0, stderr
    summary: dict[str, Any] = json.loads(stdout)
    assert summary["mode"] == "postcopy" and summary["state"] == "END"
    assert summary["preempt"] == variant
    assert summary["requests"] > 0
    assert info["ram"]["postcopy-requests"] == summary["requests"]
    # Requested pages came on the preempt channel; the background ones on the main channel.
    assert summary["preempt_pages"]["preempt"] > 0
    assert summary["preempt_pages"]["main"] > 0
    compare_pc_ram(dump_dir, source, tmp_path)
