"""Small helpers the real-QEMU tests share: the qmig command line, a free port for a recovery
URI, a QEMU version that must be there (a failure under CI, where scripts/setup installs it; a
skip elsewhere), the check that a migrated guest runs on with the right memory, and a real
postcopy-preempt migration between two QEMUs relayed through ``qmig capture``; the recorded
fixtures' guests."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from processes import ended, started

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import Machine, qemu_install
from qmig.qemu.oracle import page_counters, verify_counters
from qmig.qemu.qmp import QemuError

MachineFactory = Callable[..., Machine]

TIMEOUT = 60.0
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# How the fixtures' guests were made (their meta.json): memory and the counters' range.
POSTCOPY = FIXTURES / "postcopy-tcp", 64, GuestSpec(end=40 * MIB)
PRECOPY = FIXTURES / "precopy-file", 32, GuestSpec(end=8 * MIB)
SYSTEM_VERSION = "7.2"  # the system's QEMU, as CI installs it (scripts/setup)
PREEMPT_SPEC = GuestSpec(end=32 * MIB)
PREEMPT_MEMORY_MIB = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(version: str | None) -> str | None:
    """QEMU ``version`` is installed, or the test ends here. None and "7.2" are the system's
    (CI's); the result is what MachineConfig's ``qemu_version`` takes for it."""
    if version is None or version == SYSTEM_VERSION:
        return None
    try:
        qemu_install(version)
    except QemuError as error:
        if os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))
    return version


def destination_for(
    machines: MachineFactory, memory_mib: int, spec: GuestSpec, *extra: str
) -> tuple[Machine, str]:
    """A QEMU destination with postcopy (and its blocktime) on, waiting for an incoming
    migration on a free local port; returns it and its URI."""
    destination = machines(
        "destination", memory_mib=memory_mib, guest=spec, incoming="defer", extra_args=extra
    )
    destination.set_capabilities(postcopy_ram=True, postcopy_blocktime=True)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    return destination, f"tcp:127.0.0.1:{destination.incoming_port()}"


def check_guest_runs_on(destination: Machine, spec: GuestSpec, tmp_path: Path) -> dict[str, Any]:
    """The destination's migration completed, its guest keeps running, and the counter oracle
    accepts its memory; returns the destination's query-migrate."""
    info = destination.wait_migration(timeout=TIMEOUT)
    destination.wait_runstate("running")
    markers = destination.serial_output().count(b"*")
    destination.wait_serial(markers + 2)  # the migrated guest is still dirtying memory
    destination.stop()
    dump = destination.pmemsave(spec.start, spec.end - spec.start, tmp_path / "dest.ram")
    verify_counters(dump, spec.start, spec)
    return info


def check_counters_move(guest: Machine, spec: GuestSpec) -> tuple[bytes, bytes]:
    """The running guest's counters pass the oracle at two looks a few markers apart, and
    moved between them; returns both dumps. Leaves the guest stopped."""
    guest.stop()
    first = guest.pmemsave(spec.start, spec.end - spec.start, guest.workdir / "first.ram")
    verify_counters(first, spec.start, spec)
    guest.cont()
    guest.wait_serial(len(guest.serial_output()) + 3)
    guest.stop()
    second = guest.pmemsave(spec.start, spec.end - spec.start, guest.workdir / "second.ram")
    verify_counters(second, spec.start, spec)
    assert page_counters(first, spec.start, spec) != page_counters(second, spec.start, spec)
    return first, second


def postcopy_migration(
    source: Machine, uri: str, *, postcopy_mib: int = 16, **capabilities: bool
) -> dict[str, Any]:
    """Migrates the running ``source`` to ``uri`` with postcopy (and ``capabilities``) on:
    precopy cannot converge, postcopy is capped at ``postcopy_mib`` MiB/s, slow enough that
    the destination's guest faults on pages not yet sent and must ask for them. The source's
    query-migrate at the end."""
    source.wait_serial(1)
    source.set_capabilities(postcopy_ram=True, **capabilities)
    source.set_parameters(
        max_bandwidth=32 * MIB, max_postcopy_bandwidth=postcopy_mib * MIB, downtime_limit=1
    )
    source.migrate(uri)
    time.sleep(0.5)
    source.start_postcopy()
    return source.wait_migration(timeout=TIMEOUT)


def capture_preempt(
    machines: MachineFactory,
    tmp_path: Path,
    *,
    version: str | None = None,
    machine_type: str = "pc",
    capture_args: Sequence[str] = (),
) -> tuple[Path, dict[str, Any]]:
    """Two QEMUs (``version``, None: the system's 7.2) with postcopy-preempt, the source's
    guest counting in 32 MiB, migrated through ``qmig capture --preempt --json
    capture_args`` into ``tmp_path/capture``: postcopy capped so that the destination must
    request pages, the destination's guest checked afterwards (check_guest_runs_on). Returns
    the capture folder and capture's summary."""
    config: dict[str, Any] = {
        "memory_mib": PREEMPT_MEMORY_MIB,
        "guest": PREEMPT_SPEC,
        "qemu_version": version,
        "machine_type": machine_type,
    }
    destination = machines("destination", incoming="defer", **config)
    destination.set_capabilities(postcopy_ram=True, postcopy_preempt=True, postcopy_blocktime=True)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    out = tmp_path / "capture"
    with started(
        "capture", "--listen", "tcp:127.0.0.1:0", "--preempt",
        "--connect", f"tcp:127.0.0.1:{destination.incoming_port()}",
        "--out", str(out), "--json", *capture_args,
    ) as (relay, listening):  # fmt: skip
        source = machines("source", **config)
        postcopy_migration(
            source, listening.strip().rsplit(" ", 1)[1], postcopy_mib=8, postcopy_preempt=True
        )
        check_guest_runs_on(destination, PREEMPT_SPEC, tmp_path)
        stdout, _stderr = ended(relay, TIMEOUT)
    return out, json.loads(stdout)
