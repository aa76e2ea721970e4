"""No QEMU outlives its Machine: not after an exception, not after a failed start."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import Machine, MachineConfig, running_qemu_pids
from qmig.qemu.qmp import QemuError


def alive(pid: int) -> bool:
    return pid in running_qemu_pids(parent=os.getpid())


@pytest.mark.qemu
def test_exception_inside_with_block_still_stops_qemu(tmp_path: Path) -> None:
    machine = Machine(MachineConfig("doomed", 32, GuestSpec(end=4 * MIB)), tmp_path)
    with pytest.raises(RuntimeError, match="test failure"), machine:
        assert machine.pid is not None and alive(machine.pid)
        raise RuntimeError("test failure")
    assert machine.pid is not None and not alive(machine.pid)


@pytest.mark.qemu
def test_qemu_that_ignores_quit_is_killed(tmp_path: Path) -> None:
    machine = Machine(MachineConfig("stubborn", 32, GuestSpec(end=4 * MIB)), tmp_path).start()
    assert machine.pid is not None
    pid = machine.pid
    os.kill(pid, 19)  # SIGSTOP: it can no longer answer QMP or quit by itself
    machine.shutdown(timeout=0.5)
    assert not alive(pid)


@pytest.mark.qemu
def test_failed_start_reports_qemu_error_and_leaves_nothing(tmp_path: Path) -> None:
    before = set(running_qemu_pids(parent=os.getpid()))
    config = MachineConfig("broken", 32, None, extra_args=["-device", "no-such-device"])
    with pytest.raises(QemuError) as error:
        Machine(config, tmp_path).start()
    assert "no-such-device" in str(error.value)
    assert set(running_qemu_pids(parent=os.getpid())) <= before


@pytest.mark.qemu
def test_qmp_command_refused_by_qemu_is_a_one_line_error(tmp_path: Path) -> None:
    machine = Machine(MachineConfig("refuser", 32, None, paused=True), tmp_path)
    with machine, pytest.raises(QemuError) as error:
        machine.set_capabilities(no_such_capability=True)
    assert str(error.value).startswith("refuser: migrate-set-capabilities: ")
    assert "\n" not in str(error.value)


@pytest.mark.qemu
def test_failed_migration_raises_with_qemus_reason(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Machine(MachineConfig("lonely", 32, None, paused=True), tmp_path) as machine:
        machine.migrate(f"tcp:127.0.0.1:{port}")
        with pytest.raises(QemuError) as error:
            machine.wait_migration(timeout=30)
    assert str(error.value).startswith("lonely: migration: failed: ")


@pytest.mark.qemu
def test_deep_work_folder_still_gets_a_qmp_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with Machine(MachineConfig("deep", 32, None, paused=True), deep) as machine:
        assert machine.status() == "prelaunch"
        socket_path = machine.qmp_socket
    assert not socket_path.exists()
