"""``qmig receive`` as a user runs it: a separate process, the destination of a real QEMU source.

RAM is verified byte for byte: the dumped ``pc.ram`` against ``pmemsave`` of the stopped
source, above 1 MiB (below it firmware and VGA overlays hide ``pc.ram`` from pmemsave).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from processes import qmig, started
from qemu_helpers import postcopy_migration
from qemu_recovery import start_postcopy

from qmig.qemu.guest import MIB, GuestSpec, scattered_walk
from qmig.qemu.machine import Machine
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

MachineFactory = Callable[..., Machine]

MEMORY_MIB = 128
# The counters cover 1..32 MiB of a 128 MiB guest: enough dirty pages that postcopy has
# something to request, few enough that a migration takes a few seconds.
SPEC = GuestSpec(end=32 * MIB)
TIMEOUT = 60.0


@contextmanager
def receiving(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``qmig receive --listen tcp:127.0.0.1:0 ARGS``; yields it and the URI it listens on."""
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--accept-timeout", "30",
        "--idle-timeout", "20", *args,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT prints every thread's stack
    ) as (process, line):  # fmt: skip
        assert line.startswith("qmig receive: listening on tcp:127.0.0.1:"), line
        yield process, line.split()[-1]


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait for ``receive`` to end; one that hangs fails the test with every thread's stack
    (faulthandler, on SIGABRT), so that the hang can be read from the test's output."""
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _stdout, stderr = process.communicate(timeout=30)
        pytest.fail(f"qmig receive still running after {TIMEOUT} s; its stacks:\n{stderr}")
    return process.returncode, stdout, stderr


def compare_pc_ram(dump_dir: Path, source: Machine, tmp_path: Path) -> None:
    dumped = (dump_dir / "pc.ram.bin").read_bytes()
    assert len(dumped) == MEMORY_MIB * MIB
    expected = source.pmemsave(MIB, (MEMORY_MIB - 1) * MIB, tmp_path / "source.ram")
    if dumped[MIB:] != expected:
        bad = [
            MIB + at
            for at in range(0, len(expected), 4096)
            if dumped[MIB + at : MIB + at + 4096] != expected[at : at + 4096]
        ]
        pytest.fail(f"{len(bad)} pages differ, first at {[hex(a) for a in bad[:8]]}")


@pytest.mark.qemu
@pytest.mark.parametrize(
    "spec",
    [SPEC, replace(SPEC, walk=scattered_walk(SPEC.pages))],
    ids=["address-order", "scattered"],
)
def test_receive_postcopy_from_real_qemu_with_page_requests(
    machines: MachineFactory, tmp_path: Path, spec: GuestSpec
) -> None:
    dump_dir = tmp_path / "dump"
    with receiving("--json", "--dump-ram", str(dump_dir)) as (process, uri):
        source = machines("source", memory_mib=MEMORY_MIB, guest=spec)
        info = postcopy_migration(source, uri, postcopy_blocktime=True)
        code, stdout, stderr = finish(process)
    assert code == 0, stderr
    summary: dict[str, Any] = json.loads(stdout)
    assert summary["mode"] == "postcopy" and summary["state"] == "END"
    assert summary["blocks"]["pc.ram"] == MEMORY_MIB * MIB
    assert summary["requests"] > 0, "postcopy must have requested pages"
    # Every request qmig sent reached the real source, and nothing else did.
    assert info["ram"]["postcopy-requests"] == summary["requests"]
    assert summary["request_to_placed_us"]["count"] == summary["requests"]
    assert 0 < summary["fault_to_request_us"]["p50"] <= summary["fault_to_placed_us"]["max"]
    assert summary["pongs"] == 4
    compare_pc_ram(dump_dir, source, tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize("postcopy_ram", [False, True], ids=["plain", "postcopy-ram-on"])
def test_receive_precopy_from_real_qemu(
    machines: MachineFactory, tmp_path: Path, postcopy_ram: bool
) -> None:
    """Precopy to the end; with postcopy-ram on, the source also advises postcopy, opens the
    return path and waits for SHUT, but never switches."""
    dump_dir = tmp_path / "dump"
    with receiving("--json", "--dump-ram", str(dump_dir)) as (process, uri):
        source = machines("source", memory_mib=MEMORY_MIB, guest=SPEC)
        source.wait_serial(1)
        if postcopy_ram:
            source.set_capabilities(postcopy_ram=True)
        source.set_parameters(downtime_limit=2000)  # let precopy of the busy guest converge
        source.migrate(uri)
        info = source.wait_migration(timeout=TIMEOUT)
        code, stdout, stderr = finish(process)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["mode"] == "precopy"
    assert summary["requests"] == 0 and summary["discarded_pages"] == 0
    assert summary["devices"] > 10  # every device section, delimited by VMDESCRIPTION
    assert summary["pongs"] == (1 if postcopy_ram else 0)
    assert info["status"] == "completed"
    compare_pc_ram(dump_dir, source, tmp_path)


@pytest.mark.qemu
def test_receive_reports_a_source_killed_mid_postcopy(
    machines: MachineFactory, tmp_path: Path
) -> None:
    # Without recovery (which would wait for the source to come back), the error at once.
    with receiving("--recover-timeout", "0") as (process, uri):
        source = machines("source", memory_mib=MEMORY_MIB, guest=SPEC)
        start_postcopy(source, uri, settle=0.3)
        source.kill()
        started = time.monotonic()
        code, stdout, stderr = finish(process)
    assert time.monotonic() - started < 20, "no hang: the vCPUs waiting for pages are released"
    assert code == 1
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("qmig: error: ")
    assert "during RUNNING" in lines[0] and "at byte" in lines[0], lines[0]


def test_receive_rejects_page_sizes_it_cannot_host() -> None:
    # A source whose RAM is backed by 2 GiB pages, which no x86 host offers: the stream's
    # opening as QEMU 7.2 sends it, up to the ADVISE that announces them.
    schema = schema_for("7.2")
    opening = (
        schema.build_opening(m.Configuration("pc-i440fx-7.2"), return_path=True)
        + schema.build_command(m.Ping(1))
        + schema.build_command(m.PostcopyAdvise(1 << 31, 4096))
    )
    with receiving() as (process, uri):
        port = int(uri.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(opening)
            sock.settimeout(10)
            return_path = b""
            while chunk := sock.recv(4096):
                return_path += chunk
        code, stdout, stderr = finish(process)
    assert code == 1
    assert stdout == ""
    assert stderr.startswith(
        "qmig: error: POSTCOPY_ADVISE: Postcopy needs matching RAM page sizes "
        f"(s=80000000 d=1000) at byte {len(opening) - 21}"
    )
    assert len(stderr.splitlines()) == 1
    # QEMU's destination answers the opening PING, then says SHUT(1).
    assert return_path.endswith(b"\x00\x01\x00\x04\x00\x00\x00\x01")


def test_receive_on_a_busy_port_fails_with_one_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            qmig("receive", "--listen", f"tcp:127.0.0.1:{port}"),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"qmig: error: tcp:127.0.0.1:{port}: address already in use\n"
