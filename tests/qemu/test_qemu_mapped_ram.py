"""mapped-ram files made by real QEMU 10.0 running qmig's test guest: inspected, their RAM
extracted (equal to the source's pmemsave), and migrated into a real QEMU 10.0 destination by
``qmig replay``, with QEMU's own ``migrate-incoming file:`` of the same file as the control.

Each case saves once (with and without multifd) and starts two destinations."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import processes
import pytest

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import Machine, QemuInstall
from qmig.qemu.oracle import verify_counters

MachineFactory = Callable[..., Machine]
VERSION = "10.0"
MEMORY_MIB = 32
SPEC = GuestSpec(end=8 * MIB)
TIMEOUT = 60.0


def qmig(*args: str) -> subprocess.CompletedProcess[str]:
    return processes.run(*args, timeout=TIMEOUT)


def save(machines: MachineFactory, path: Path, multifd: bool) -> bytes:
    """A running guest, stopped and saved to ``path`` with mapped-ram; its RAM as it was."""
    source = machines("source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=VERSION)
    source.wait_serial(3)
    source.set_capabilities(mapped_ram=True, **({"multifd": True} if multifd else {}))
    source.stop()
    ram = source.pmemsave(0, MEMORY_MIB * MIB, source.workdir / "source.ram")
    source.migrate(f"file:{path}")
    source.wait_migration(timeout=TIMEOUT)
    source.shutdown()
    return ram


def destination(machines: MachineFactory, name: str) -> Machine:
    return machines(name, memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=VERSION, incoming="defer")


def ram_after_migration(machine: Machine, tmp_path: Path) -> bytes:
    """The destination's RAM once loaded (paused, as the source was), then its guest runs."""
    machine.wait_migration(timeout=TIMEOUT)
    ram = machine.pmemsave(0, MEMORY_MIB * MIB, tmp_path / f"{machine.name}.ram")
    machine.cont()
    markers = machine.serial_output().count(b"*")
    machine.wait_serial(markers + 2)
    machine.stop()
    counters = machine.pmemsave(SPEC.start, SPEC.end - SPEC.start, tmp_path / "counters.ram")
    verify_counters(counters, SPEC.start, SPEC)
    return ram


@pytest.mark.qemu
@pytest.mark.parametrize("multifd", [False, True], ids=["mapped-ram", "mapped-ram+multifd"])
def test_mapped_ram_save_inspect_extract_replay(
    qemu_10_0: QemuInstall, machines: MachineFactory, tmp_path: Path, multifd: bool
) -> None:
    path = tmp_path / "saved.mr"
    source_ram = save(machines, path, multifd)

    # inspect: every block with its header and bitmap, the device state as usual
    dump = tmp_path / "dump"
    result = qmig("inspect", str(path), "--json", "--dump-ram", str(dump))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    blocks = {block["block"]: block for block in report["mapped_ram"]["blocks"]}
    main = blocks["pc.ram"]
    assert main["used_length"] == MEMORY_MIB * MIB and main["page_size"] == 4096
    assert main["pages_offset"] % (1 << 20) == 0
    assert main["pages_present"] + main["zero_pages"] == main["pages"]
    # the guest writes every page of [1 MiB, 8 MiB): all of them are in the file
    assert main["pages_present"] >= (SPEC.end - SPEC.start) // 4096
    assert report["counts"]["DEVICE_STATE"] > 10 and report["counts"]["EOF"] == 1
    assert report["stream_part_bytes"] < report["file_bytes"]
    assert (dump / "pc.ram.bin").read_bytes() == source_ram
    assert (dump / "devices.json").is_file()
    assert os.stat(dump / "pc.ram.bin").st_blocks * 512 < MEMORY_MIB * MIB, "sparse"

    # the human listing reads the same file
    listing = qmig("inspect", str(path))
    assert listing.returncode == 0, listing.stderr
    assert "pc.ram" in listing.stdout and "mapped-ram file" in listing.stdout

    # replay: the mapped-ram file as the recording, into a real destination over TCP
    replayed = destination(machines, "replayed")
    replayed.migrate_incoming("tcp:127.0.0.1:0")
    uri = f"tcp:127.0.0.1:{replayed.incoming_port()}"
    result = qmig("replay", str(path), "--to", uri, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["qemu_version"] == VERSION
    assert ram_after_migration(replayed, tmp_path) == source_ram

    # control: QEMU loads the same file itself
    control = destination(machines, "control")
    control.set_capabilities(mapped_ram=True, **({"multifd": True} if multifd else {}))
    control.migrate_incoming(f"file:{path}")
    assert ram_after_migration(control, tmp_path) == source_ram


@pytest.mark.qemu
def test_hostile_mapped_ram_headers_are_one_line(
    qemu_10_0: QemuInstall, machines: MachineFactory, tmp_path: Path
) -> None:
    path = tmp_path / "saved.mr"
    save(machines, path, False)
    report = json.loads(qmig("inspect", str(path), "--json").stdout)
    first = report["mapped_ram"]["blocks"][0]
    at = first["header_offset"]
    data = bytearray(path.read_bytes())

    def refused(field: int, value: int) -> str:
        bad = bytearray(data)
        bad[at + field : at + field + 8] = value.to_bytes(8, "big")
        broken = tmp_path / "broken.mr"
        broken.write_bytes(bad)
        result = qmig("inspect", str(broken))
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr.strip()

    line = refused(12, 1 << 60)
    assert f"bitmap_offset: {1 << 60:#x}" in line and f"at byte {at + 12}" in line
    line = refused(20, len(data))
    assert "pages_offset" in line and f"at byte {at + 20}" in line
    line = refused(4, 65536)
    assert "page_size: 65536" in line and f"at byte {at + 4}" in line
