"""Real save images from Debian's libvirt: ``virsh managedsave`` and ``virsh save`` of a TCG
domain running qmig's test guest, raw and xz-compressed (``save_image_format`` in the
session's qemu.conf).

Before saving, the paused guest's RAM is dumped with QEMU's pmemsave (through ``virsh
qemu-monitor-command``); ``qmig inspect --dump-ram`` of the image must give the same bytes.
Then ``qmig replay`` migrates the image into a fresh QEMU with the same machine type and
memory, whose RAM must again equal the dump, and whose guest must run on once continued (a
restored image starts paused, as libvirt's restore does before it resumes the guest); and in
postcopy into another, whose guest runs from the switch on with consistent counters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from libvirt_session import LibvirtSession

from qmig.qemu.guest import MIB, GuestSpec, highest_safe_end, write_disk_image
from qmig.qemu.machine import Machine, MachineConfig, qemu_binary
from qmig.qemu.oracle import verify_counters

pytestmark = pytest.mark.qemu

MEMORY_MIB = 64
SPEC = GuestSpec(end=highest_safe_end(MEMORY_MIB))
NAME = "qmig-saved"
TIMEOUT = 120.0
# Guest-physical 0xa0000..0x100000 is the VGA window and the option/BIOS ROM area: pmemsave
# reads there what the chipset maps, not pc.ram's bytes, so the comparison skips it.
HOLE = (0xA0000, 0x100000)


def domain_xml(disk: Path, serial: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{NAME}</name>
  <memory unit='MiB'>{MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>{qemu_binary()}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/><source file='{disk}'/><target dev='hda' bus='ide'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# (save_image_format, how the image is made): `virsh save` of a transient domain, and
# `virsh managedsave` of a defined one (libvirt keeps that image in its own folder).
CASES = [("raw", "managedsave"), ("xz", "save")]


@pytest.fixture(params=CASES, ids=["-".join(case) for case in CASES])
def session(request: pytest.FixtureRequest) -> Iterator[tuple[LibvirtSession, str]]:
    libvirt = LibvirtSession(request.param[0])
    try:
        yield libvirt.start(), request.param[1]
    finally:
        libvirt.close()


def wait_markers(path: Path, count: int) -> None:
    import time

    deadline = time.monotonic() + TIMEOUT
    while (path.read_bytes() if path.exists() else b"").count(b"*") < count:
        assert time.monotonic() < deadline, f"the guest printed no {count} markers"
        time.sleep(0.1)


def save_guest(libvirt: LibvirtSession, how: str) -> tuple[Path, bytes, str]:
    """Run the guest for a few passes, pause it, dump its RAM, save it: (image, RAM, uuid)."""
    root = libvirt.root
    disk = libvirt.give(write_disk_image(root / "guest.img", SPEC))
    xml = root / "domain.xml"
    xml.write_text(domain_xml(disk, root / "serial.log"))
    managed = how == "managedsave"
    if managed:
        libvirt.virsh("define", str(xml))
        libvirt.virsh("start", NAME)
    else:
        libvirt.virsh("create", str(xml))
    wait_markers(root / "serial.log", 3)  # a few passes over the counters' range
    libvirt.virsh("suspend", NAME)
    dump = root / "ram.dump"
    command = {
        "execute": "pmemsave",
        "arguments": {"val": 0, "size": MEMORY_MIB * MIB, "filename": str(dump)},
    }
    libvirt.virsh("qemu-monitor-command", NAME, json.dumps(command))
    uuid = libvirt.virsh("domuuid", NAME).strip()
    if managed:
        libvirt.virsh("managedsave", NAME)
        image = libvirt.config / "libvirt" / "qemu" / "save" / f"{NAME}.save"
    else:
        image = root / "guest.save"
        libvirt.virsh("save", NAME, str(image))
    return image, dump.read_bytes(), uuid


def qmig(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmig", *args], capture_output=True, text=True, timeout=TIMEOUT
    )


def assert_same_ram(ram: bytes, dump: bytes) -> None:
    assert len(ram) == len(dump) == MEMORY_MIB * MIB
    low, high = HOLE
    assert ram[:low] == dump[:low]
    for start in range(high, len(dump), MIB):  # per MiB, so that a failure says where
        assert ram[start : start + MIB] == dump[start : start + MIB], f"differs in {start:#x}+1M"


def test_virsh_save_image(session: tuple[LibvirtSession, str], tmp_path: Path) -> None:
    libvirt_session, how = session
    image, dump, uuid = save_guest(libvirt_session, how)
    verify_counters(dump[SPEC.start : SPEC.end], SPEC.start, SPEC)  # a consistent guest
    fmt = (libvirt_session.config / "libvirt" / "qemu.conf").read_text().split('"')[1]

    inspected = qmig("inspect", str(image), "--json", "--dump-ram", str(tmp_path / "ram"))
    assert inspected.returncode == 0, inspected.stderr
    report: dict[str, Any] = json.loads(inspected.stdout)
    libvirt = report["libvirt"]
    assert libvirt["complete"] and libvirt["version"] == 2
    assert libvirt["format"] == libvirt["compression"] == fmt
    assert libvirt["was_running"] is False  # paused for the dump before the save
    assert libvirt["cookie_offset"] > 0  # libvirt 9 writes a save cookie (the CPU)
    domain = libvirt["domain"]
    assert domain["name"] == NAME and domain["uuid"] == uuid
    assert domain["domain_type"] == "qemu" and domain["memory_bytes"] == MEMORY_MIB * MIB
    machine_type = domain["machine_type"]
    assert machine_type.startswith("pc-i440fx-")  # libvirt expands 'pc'
    assert report["counts"]["EOF"] == 1
    assert_same_ram((tmp_path / "ram" / "pc.ram.bin").read_bytes(), dump)

    listing = qmig("inspect", str(image))
    assert listing.returncode == 0, listing.stderr
    assert f"machine {machine_type} (x86_64), memory {MEMORY_MIB} MiB" in listing.stdout

    config = MachineConfig(
        "restored", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer",
        machine_type=machine_type,
    )  # fmt: skip
    with Machine(config, tmp_path / "destination").start() as destination:
        destination.migrate_incoming("tcp:127.0.0.1:0")
        uri = f"tcp:127.0.0.1:{destination.incoming_port()}"
        replayed = qmig("replay", str(image), "--connect", uri, "--json")
        assert replayed.returncode == 0, replayed.stderr
        summary = json.loads(replayed.stdout)
        assert summary["machine_type"] == machine_type and summary["ram_mib"] == MEMORY_MIB
        assert summary["libvirt"]["domain"]["uuid"] == uuid and summary["mode"] == "precopy"
        destination.wait_migration(timeout=TIMEOUT)
        destination.wait_runstate("paused")  # the saved guest was paused
        restored = destination.pmemsave(0, MEMORY_MIB * MIB, tmp_path / "restored.ram")
        assert_same_ram(restored, dump)
        destination.cont()
        destination.wait_runstate("running")
        destination.wait_serial(2, timeout=TIMEOUT)  # the restored guest counts on

    # In postcopy every page goes on demand or in the background after the switch; the
    # destination runs the guest from POSTCOPY_RUN on, so its counters are checked instead.
    config = MachineConfig(
        "postcopy", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer",
        machine_type=machine_type,
    )  # fmt: skip
    with Machine(config, tmp_path / "postcopy").start() as destination:
        destination.set_capabilities(postcopy_ram=True)
        destination.migrate_incoming("tcp:127.0.0.1:0")
        uri = f"tcp:127.0.0.1:{destination.incoming_port()}"
        replayed = qmig("replay", str(image), "--connect", uri, "--postcopy-after", "0", "--json")
        assert replayed.returncode == 0, replayed.stderr
        summary = json.loads(replayed.stdout)
        assert summary["mode"] == "postcopy" and summary["postcopy_pages"] > 0
        destination.wait_migration(timeout=TIMEOUT)
        destination.wait_runstate("running")
        destination.wait_serial(2, timeout=TIMEOUT)
        destination.stop()
        verify_counters(
            destination.pmemsave(SPEC.start, SPEC.end - SPEC.start, tmp_path / "postcopy.ram"),
            SPEC.start, SPEC,
        )  # fmt: skip
