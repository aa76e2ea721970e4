"""``qmig capture`` as a user runs it: a separate process between two real QEMUs."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from processes import ended, qmig, started

from qmig.capture import read_capture
from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import Machine

MachineFactory = Callable[..., Machine]


def test_capture_on_a_busy_port_fails_with_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            qmig("capture", "--listen", f"tcp:127.0.0.1:{port}", "--connect",
                 "tcp:127.0.0.1:1", "--out", str(tmp_path / "out")),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"qmig: error: tcp:127.0.0.1:{port}: address already in use\n"


def test_capture_with_an_unreachable_destination_fails(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    with started(
        "capture", "--listen", "tcp::0", "--connect", f"tcp:127.0.0.1:{dead_port}",
        "--out", str(tmp_path / "out"),
    ) as (process, listening):  # fmt: skip
        port = int(listening.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)):
            _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert stderr == f"qmig: error: tcp:127.0.0.1:{dead_port}: connection refused\n"


@pytest.mark.qemu
def test_capture_cli_records_a_real_migration(machines: MachineFactory, tmp_path: Path) -> None:
    spec = GuestSpec(end=8 * MIB)
    destination = machines("destination", memory_mib=32, guest=spec, incoming="defer")
    destination.migrate_incoming("tcp:127.0.0.1:0")
    out = tmp_path / "capture"
    with started(
        "capture", "--listen", "tcp:127.0.0.1:0",
        "--connect", f"tcp:127.0.0.1:{destination.incoming_port()}",
        "--out", str(out), "--json",
    ) as (relay, first):  # fmt: skip
        listening = first.strip()
        assert listening.startswith("qmig capture: listening on tcp:127.0.0.1:")
        source = machines("source", memory_mib=32, guest=spec)
        source.wait_serial(1)
        source.set_parameters(downtime_limit=2000)  # let precopy of a busy guest converge
        source.migrate(listening.rsplit(" ", 1)[1])
        source_info = source.wait_migration()
        destination.wait_migration()
        stdout, _stderr = ended(relay, timeout=60)
    summary = json.loads(stdout)
    assert summary["clean"] is True
    capture = read_capture(out)
    assert summary["stream"]["bytes"] == len(capture.stream) > source_info["ram"]["transferred"]
    assert summary["return_path"]["bytes"] == len(capture.return_path) == 0  # precopy: no RP
    assert capture.stream.startswith(b"QEVM")
