"""A real QEMU source with postcopy-preempt, paused mid-postcopy (``migrate-pause``) and
resumed into ``qmig receive --preempt``: both channels go with the pause, the source opens
its preempt channel again after the bitmap sync (on the first URI, or on the one
``--recover-listen`` names), and the dumped RAM equals the source's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qemu_helpers import free_port, need
from qemu_recovery import pause_and_resume, start_postcopy
from test_receive_real import MEMORY_MIB, SPEC, MachineFactory, finish, receiving
from test_recovery_receive import check

VARIANTS = pytest.mark.parametrize(
    ("version", "variant"), [(None, "pre-7.2"), ("10.0", "8.0")], ids=["7.2", "10.0"]
)


def recovered(
    machines: MachineFactory,
    tmp_path: Path,
    version: str | None,
    *args: str,
    resume_on: str | None = None,
) -> dict[str, Any]:
    """A QEMU ``version`` source migrated into ``qmig receive --preempt ARGS``, paused and
    resumed on ``resume_on`` (None: the URI receive listens on first), the recovery
    checked (``check``); receive's summary."""
    need(version)
    dump = str(tmp_path / "dump")
    with receiving("--json", "--preempt", "--dump-ram", dump, "--recover-timeout", "30", *args) as (
        process,
        uri,
    ):
        source = machines("source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=version)
        start_postcopy(source, uri, postcopy_preempt=True)
        info = pause_and_resume(source, process, resume_on or uri)
        code, stdout, stderr = finish(process)
    assert code == 0, stderr
    summary: dict[str, Any] = json.loads(stdout)
    check(summary, info, source, tmp_path)
    return summary


@pytest.mark.qemu
@VARIANTS
def test_a_paused_preempt_migration_resumes_into_qmig(
    machines: MachineFactory, tmp_path: Path, version: str | None, variant: str
) -> None:
    summary = recovered(machines, tmp_path, version)
    assert summary["preempt"] == variant
    assert summary["preempt_pages"]["preempt"] > 0


@pytest.mark.qemu
@VARIANTS
def test_a_preempt_migration_resumes_on_the_recover_listen_uri(
    machines: MachineFactory, tmp_path: Path, version: str | None, variant: str
) -> None:
    """QEMU's destination takes the resumed main channel and the new preempt channel on the
    listener ``migrate-recover`` gave it; ``--recover-listen`` is that listener. Nothing is
    taken on the first URI after the pause (the source is resumed elsewhere)."""
    recover_uri = f"tcp:127.0.0.1:{free_port()}"
    args = ("--recover-listen", recover_uri)
    summary = recovered(machines, tmp_path, version, *args, resume_on=recover_uri)
    assert summary["preempt"] == variant
    assert summary["preempt_pages"]["preempt"] > 0
