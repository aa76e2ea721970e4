"""``qmig receive`` recovering from a broken channel, driven by qmig's own source: the source
cuts its channel mid-postcopy and resumes to ``--recover-listen``; the dumped RAM equals the
source's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from own_source import cut_and_resumed
from processes import ended, started
from qemu_helpers import free_port

from qmig.runner.channels import CutPlan

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]


def test_receive_takes_the_resumed_channel_on_its_recover_listen_uri(tmp_path: Path) -> None:
    recover_uri = f"tcp:127.0.0.1:{free_port()}"
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--recover-listen", recover_uri,
        "--recover-timeout", "30", "--qemu-version", "7.2", "--json",
        "--dump-ram", str(tmp_path / "dump"),
    ) as (process, first):  # fmt: skip
        uri = first.split()[-1]
        ram, report = cut_and_resumed(uri, recover_uri, 3, CutPlan(500), recover_timeout=30)
        stdout, stderr = ended(process, timeout=60)
    assert f"postcopy paused; waiting for the resumed source on {recover_uri}" in stderr
    summary = json.loads(stdout)
    assert summary["recoveries"] == report.recoveries == 1
    assert summary["state"] == "END"
    for block in ram.blocks:
        dumped = (tmp_path / "dump" / f"{block.idstr}.bin").read_bytes()
        assert dumped == bytes(block.ram[: block.used_length]), block.idstr
