"""``qmig receive`` recovering from a broken channel, driven by qmig's own source: the source
cuts its channel mid-postcopy and resumes to ``--recover-listen``; the dumped RAM equals the
source's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qmig.protocol.source import Source
from qmig.runner.channels import Channels, CutPlan, connect_with_retries
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.runner.source_ram import GuestRam
from qmig.simulate import default_devices
from qmig.transport import connect

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_receive_takes_the_resumed_channel_on_its_recover_listen_uri(tmp_path: Path) -> None:
    recover_uri = f"tcp:127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "qmig", "receive", "--listen", "tcp:127.0.0.1:0",
         "--recover-listen", recover_uri, "--recover-timeout", "30", "--qemu-version", "7.2",
         "--json", "--dump-ram", str(tmp_path / "dump")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        uri = process.stderr.readline().split()[-1]
        ram = GuestRam.generate([("pc.ram", 16 << 20), ("vga.vram", 1 << 20)], seed=3)
        source = Source(ram.blocks, version="7.2", devices=default_devices(3))
        plan = SourcePlan(
            postcopy_after=0, bandwidth=64 << 20, cuts=CutPlan(500), recover_timeout=30
        )
        reopen = connect_with_retries(lambda timeout: connect(recover_uri, timeout), 30)
        channels = Channels(connect(uri), reopen)
        try:
            report = SourceRunner(channels, source, plan).run()
        finally:
            channels.close_main()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    assert f"postcopy paused; waiting for the resumed source on {recover_uri}" in stderr
    summary = json.loads(stdout)
    assert summary["recoveries"] == report.recoveries == 1
    assert summary["state"] == "END"
    for block in ram.blocks:
        dumped = (tmp_path / "dump" / f"{block.idstr}.bin").read_bytes()
        assert dumped == bytes(block.ram[: block.used_length]), block.idstr
