"""QEMU 10.0 as a second real peer, beside the system's 7.2: picked by version, it runs with its
own firmware and modules and boots qmig's test guest.

scripts/fetch-qemu-10.0 (run by scripts/setup) unpacks it; where it is missing the test fails
under CI and is skipped elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qemu_helpers import MachineFactory, check_counters_move

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import QemuInstall, qemu_install, qemu_version
from qmig.qemu.qmp import QemuError

VERSION = "10.0"


@pytest.mark.qemu
def test_qemu_10_0_boots_the_test_guest(qemu_10_0: QemuInstall, machines: MachineFactory) -> None:
    assert qemu_version(VERSION).startswith("QEMU emulator version 10.0.")
    spec = GuestSpec(end=8 * MIB)
    guest = machines("q10", memory_mib=32, guest=spec, qemu_version=VERSION)
    assert guest.pid is not None
    assert Path(os.readlink(f"/proc/{guest.pid}/exe")) == Path(qemu_10_0.binary).resolve()
    reported = guest.qmp("query-version")["qemu"]
    assert (reported["major"], reported["minor"]) == (10, 0)
    # The guest runs: markers on the serial port, page counters that move between two looks.
    guest.wait_serial(10)
    check_counters_move(guest, spec)


def test_a_version_that_is_nowhere_is_one_clear_error() -> None:
    with pytest.raises(QemuError) as caught:
        qemu_install("1.0")
    assert "scripts/fetch-qemu-1.0" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_explicit_binary_is_taken_as_it_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wrapper = tmp_path / "qemu-10"
    wrapper.write_text('#!/bin/sh\nexec qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("QMIG_QEMU_10_0", str(wrapper))
    assert qemu_install(VERSION) == QemuInstall(str(wrapper))
    monkeypatch.setenv("QMIG_QEMU_10_0", str(tmp_path / "none"))
    with pytest.raises(QemuError, match=r"QMIG_QEMU_10_0: .* is not an executable QEMU"):
        qemu_install(VERSION)
