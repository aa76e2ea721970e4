"""qmig's test guest: the boot image it builds, and what it does in a real QEMU."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from qemu_helpers import MachineFactory, check_counters_move

from qmig.qemu.guest import (
    MIB,
    GuestSpec,
    boot_sector,
    disk_image,
    highest_safe_end,
    known_data,
    loader_args,
    scattered_walk,
)
from qmig.qemu.oracle import page_counters, verify_counters


def test_boot_sector_is_one_bootable_sector_with_the_range_encoded() -> None:
    spec = GuestSpec(end=24 * MIB, marker=ord("#"))
    sector = boot_sector(spec)
    assert len(sector) == 512
    assert sector.endswith(b"\x55\xaa")
    assert (1 * MIB).to_bytes(4, "little") in sector  # mov ebx, start
    assert b"\x81\xfb" + (24 * MIB).to_bytes(4, "little") in sector  # cmp ebx, end
    assert b"\xb0#" in sector  # mov al, marker
    assert boot_sector(GuestSpec(end=32 * MIB)) != boot_sector(GuestSpec(end=24 * MIB))
    assert len(disk_image(spec)) == 4096


@pytest.mark.parametrize(
    "fields",
    [
        {"start": 0},  # would overwrite the boot code and the BIOS area
        {"end": 1 * MIB},  # empty range
        {"end": 24 * MIB + 1},  # not page aligned
        {"stride": 3000},
        {"end": 24 * MIB, "stride": 5 * 4096},  # 23 MiB is not a multiple of 20 KiB
        {"marker": 256},
        {"end": 8 * MIB, "walk": 0},
        {"end": 8 * MIB, "walk": 7 * 256},  # 1,792 pages: the walk must be below that
        {"end": 8 * MIB, "walk": 14},  # shares 2 and 7 with 1,792: some pages never touched
    ],
)
def test_guest_spec_rejects_impossible_ranges(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        GuestSpec(**fields)


def test_a_walk_touches_every_page_once_a_pass_out_of_address_order() -> None:
    spec = GuestSpec(end=8 * MIB, walk=scattered_walk(GuestSpec(end=8 * MIB).pages))
    order = [spec.touched(index) for index in range(spec.pages)]
    assert sorted(order) == list(range(spec.pages))
    assert order[:3] == [0, spec.walk, 2 * spec.walk % spec.pages]
    # Consecutive touches are far apart: no two in a row on neighbouring pages.
    assert min(abs(b - a) for a, b in itertools.pairwise(order)) > 1
    sector = boot_sector(spec)
    assert b"\x81\xc3" + (spec.walk * 4096).to_bytes(4, "little") in sector  # add ebx, step
    assert b"\x81\xeb" + (7 * MIB).to_bytes(4, "little") in sector  # sub ebx, end - start
    assert boot_sector(GuestSpec(end=8 * MIB, walk=1)) == boot_sector(GuestSpec(end=8 * MIB))


@pytest.mark.parametrize("pages", [1, 2, 3, 256, 1792, 25_344, 262_143])
def test_scattered_walk_is_prime_to_the_page_count(pages: int) -> None:
    walk = scattered_walk(pages)
    if pages < 3:
        assert walk == 1
    else:
        assert 1 < walk < pages and math.gcd(walk, pages) == 1


def test_known_data_is_deterministic_and_seeded() -> None:
    assert known_data(1000, seed=1) == known_data(1000, seed=1)
    assert known_data(1000, seed=1) != known_data(1000, seed=2)
    assert len(known_data(12345)) == 12345


@pytest.mark.qemu
def test_guest_boots_prints_markers_and_keeps_dirtying(machines: MachineFactory) -> None:
    spec = GuestSpec(end=8 * MIB)
    guest = machines("guest", memory_mib=32, guest=spec)
    output = guest.wait_serial(20)
    assert set(output) == {ord("*")}, "only markers on the serial port"
    _first, second = check_counters_move(guest, spec)
    # Only the first byte of each page is ever written.
    assert not any(second[1:4096]) and not any(second[4097:8192])


@pytest.mark.qemu
def test_sparse_stride_writes_only_every_stride(machines: MachineFactory) -> None:
    spec = GuestSpec(end=8 * MIB, stride=64 * 1024)
    guest = machines("sparse", memory_mib=32, guest=spec)
    guest.wait_serial(5)
    guest.stop()
    dump = guest.pmemsave(spec.start, spec.end - spec.start, guest.workdir / "sparse.ram")
    verify_counters(dump, spec.start, spec)
    assert dump[0] != 0
    assert not any(dump[4096 : 64 * 1024]), "pages between strides stay untouched"


@pytest.mark.qemu
def test_scattered_guest_passes_the_oracle_in_its_walks_order(machines: MachineFactory) -> None:
    spec = GuestSpec(end=8 * MIB, walk=scattered_walk(GuestSpec(end=8 * MIB).pages))
    guest = machines("scattered", memory_mib=32, guest=spec)
    guest.wait_serial(5)
    first, _second = check_counters_move(guest, spec)
    picture = verify_counters(first, spec.start, spec)
    counters = page_counters(first, spec.start, spec)
    changes = sum(a != b for a, b in itertools.pairwise(counters))
    # Stopped mid-pass, the pages touched this pass lie all over the range: in address
    # order the counters change value many times, not once as in an address-order pass.
    assert picture.boundary is None or changes > 2


@pytest.mark.qemu
def test_firmware_data_stays_above_the_highest_safe_end(machines: MachineFactory) -> None:
    memory_mib = 64
    guest = machines("firmware", memory_mib=memory_mib, guest=GuestSpec(end=2 * MIB))
    guest.wait_serial(1)
    guest.stop()
    low = 2 * MIB
    dump = guest.pmemsave(low, highest_safe_end(memory_mib) - low, guest.workdir / "fw.ram")
    assert not any(dump), "firmware wrote below highest_safe_end(); the guest range would clash"


@pytest.mark.qemu
def test_paused_guest_holds_loader_data(machines: MachineFactory, tmp_path: Path) -> None:
    data = known_data(3 * 4096 + 100, seed=7)
    data_path = tmp_path / "known.bin"
    data_path.write_bytes(data)
    address = 4 * MIB
    guest = machines(
        "known", memory_mib=32, guest=None, paused=True, extra_args=loader_args(data_path, address)
    )
    assert guest.status() == "prelaunch"
    assert guest.pmemsave(address, len(data), tmp_path / "dump.bin") == data
    assert guest.serial_output() == b""
