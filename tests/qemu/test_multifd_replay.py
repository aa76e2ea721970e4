"""``qmig replay --multifd N`` into real QEMU destinations with multifd on: a capture folder, a
libvirt save image and a QEMU 10.0 mapped-ram file, over 2 or 4 channels, QEMU 7.2 and 10.0,
zero pages on the main channel and in the packets; and a multifd capture folder, rebuilt from
its main channel and every multifd channel in sync order. Each destination's RAM is checked
as the replay interop tests check it (the guest's counters, or equal to the source's)."""

from __future__ import annotations

import json
import lzma
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from multifd_replay_folder import write_multifd_folder
from qemu_helpers import need
from test_qemu_mapped_ram import MEMORY_MIB as MR_MEMORY_MIB
from test_qemu_mapped_ram import SPEC as MR_SPEC
from test_qemu_mapped_ram import ram_after_migration, save
from test_replay_real import PRECOPY, check_guest_runs_on, run_replay

from qmig.qemu.guest import GuestSpec
from qmig.qemu.machine import Machine
from qmig.replay import load_recording

MachineFactory = Callable[..., Machine]
UUID = "6a1f3b1e-5c2d-4e8f-9a0b-1c2d3e4f5a6b"


def multifd_destination(
    machines: MachineFactory,
    version: str,
    memory_mib: int,
    spec: GuestSpec,
    channels: int,
    machine_type: str = "pc",
    extra_args: tuple[str, ...] = (),
) -> tuple[Machine, str]:
    destination = machines(
        "destination", memory_mib=memory_mib, guest=spec, incoming="defer",
        qemu_version=need(version), machine_type=machine_type, extra_args=extra_args,
    )  # fmt: skip
    destination.set_capabilities(multifd=True)
    destination.set_parameters(multifd_channels=channels)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    return destination, f"tcp:127.0.0.1:{destination.incoming_port()}"


def replay_json(source: Path, uri: str, version: str, *args: str) -> dict[str, object]:
    result = run_replay(source, uri, "--json", "--qemu-version", version, *args)
    assert result.returncode == 0, result.stderr
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def check_multifd(summary: dict[str, object], channels: int, zero: str) -> None:
    multifd = summary["multifd"]
    assert isinstance(multifd, dict)
    assert multifd["channels"] == channels and multifd["zero_page_detection"] == zero
    assert all(pages > 0 for pages in multifd["pages_per_channel"]), "every channel carried"
    assert multifd["syncs"] >= 2
    if zero == "multifd":
        assert multifd["zero_pages"] > 0
    else:
        assert multifd["zero_pages"] == 0


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "channels", "form", "zero"),
    [
        ("7.2", 2, "capture", "legacy"),
        ("7.2", 4, "libvirt", "legacy"),
        # QEMU 10.0 running the capture's pc-i440fx-7.2: syncs per section (hw_compat)
        ("10.0", 4, "capture", "multifd"),
    ],
)
def test_replay_precopy_capture_over_multifd(
    machines: MachineFactory, tmp_path: Path, version: str, channels: int, form: str, zero: str
) -> None:
    capture, memory_mib, spec = PRECOPY
    source = capture
    if form == "libvirt":
        sys.path.insert(0, str(Path(__file__).parents[1] / "libvirt"))
        from libvirt_images import build_image  # the libvirt tests' image builder

        source = tmp_path / "guest.save"
        source.write_bytes(build_image(lzma.decompress((capture / "stream.bin.xz").read_bytes())))
    # the capture's machine type, which QEMU 10.0 still has
    machine_type = "pc" if version == "7.2" else "pc-i440fx-7.2"
    # A libvirt guest's QEMU runs with the domain's -uuid: every handshake must carry it.
    uuid = ("-uuid", UUID) if form == "libvirt" else ()
    destination, uri = multifd_destination(
        machines, version, memory_mib, spec, channels, machine_type, uuid
    )
    args = ["--multifd", str(channels), *(("--uuid", UUID) if uuid else ())]
    if version != "7.2":
        args += ["--zero-page-detection", zero]
    summary = replay_json(source, uri, version, *args)
    assert summary["mode"] == "precopy"
    check_multifd(summary, channels, zero)
    if form == "libvirt":
        destination.wait_migration(timeout=60)
        destination.cont()  # libvirt's restore resumes the guest itself
    check_guest_runs_on(destination, spec, tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize(("channels", "zero"), [(2, "multifd"), (4, "legacy")])
def test_replay_mapped_ram_file_over_multifd(
    machines: MachineFactory, tmp_path: Path, channels: int, zero: str
) -> None:
    """A QEMU 10.0 save (pc-i440fx-10.0): syncs per round with MULTIFD_FLUSH."""
    need("10.0")
    path = tmp_path / "saved.mr"
    source_ram = save(machines, path, multifd=False)
    destination, uri = multifd_destination(machines, "10.0", MR_MEMORY_MIB, MR_SPEC, channels)
    args = ["--multifd", str(channels)] + (["--zero-page-detection", zero] if zero else [])
    summary = replay_json(path, uri, "10.0", *args)
    check_multifd(summary, channels, zero)
    multifd = summary["multifd"]
    assert isinstance(multifd, dict) and multifd["sync"] == "per-round"
    assert ram_after_migration(destination, tmp_path) == source_ram


def test_multifd_capture_folder_rebuilds_newest_pages(tmp_path: Path) -> None:
    capture, _, _ = PRECOPY
    folder = tmp_path / "multifd-capture"
    truth = write_multifd_folder(capture, folder, "7.2", 3, range(300, 340))
    assert sorted(p.name for p in folder.glob("multifd-*.bin")) == [
        "multifd-0.bin", "multifd-1.bin", "multifd-2.bin",
    ]  # fmt: skip
    recording = load_recording(folder, "7.2")
    try:
        ram = next(block for block in recording.blocks if block.idstr == "pc.ram")
        assert ram.memory[: ram.used_length] == truth
    finally:
        recording.close()


@pytest.mark.qemu
def test_replay_multifd_capture_folder_over_multifd(
    machines: MachineFactory, tmp_path: Path
) -> None:
    capture, memory_mib, spec = PRECOPY
    folder = tmp_path / "multifd-capture"
    write_multifd_folder(capture, folder, "7.2", 2, range(300, 340))
    destination, uri = multifd_destination(machines, "7.2", memory_mib, spec, 2)
    summary = replay_json(folder, uri, "7.2", "--multifd", "2")
    check_multifd(summary, 2, "legacy")
    check_guest_runs_on(destination, spec, tmp_path)


@pytest.mark.parametrize(
    ("capture", "args", "line"),
    [
        ("postcopy-tcp", ["--multifd", "2"],
         "--multifd: QEMU 7.2 refuses multifd together with postcopy-ram"),
        ("precopy-file", ["--zero-page-detection", "multifd"],
         "--zero-page-detection: needs --multifd"),
        ("precopy-file", ["--multifd", "2", "--zero-page-detection", "multifd"],
         "--zero-page-detection: QEMU 7.2 has no zero-page-detection parameter"),
        ("precopy-file", ["--uuid", UUID], "--uuid: needs --multifd"),
    ],
)  # fmt: skip
def test_multifd_refusals_are_one_line(capture: str, args: list[str], line: str) -> None:
    fixtures = PRECOPY[0].parent
    result = run_replay(fixtures / capture, "tcp:127.0.0.1:1", *args)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"qmig: error: {line}") and result.stderr.count("\n") == 1


@pytest.mark.qemu
def test_replay_refused_for_another_uuid_is_one_line(
    machines: MachineFactory, tmp_path: Path
) -> None:
    """QEMU refuses handshakes with another UUID and drops the channels: one error line (and
    the recording's RAM mappings close cleanly though packets were being sent from them)."""
    capture, memory_mib, spec = PRECOPY
    destination, uri = multifd_destination(
        machines, "7.2", memory_mib, spec, 2, extra_args=("-uuid", UUID)
    )
    result = run_replay(capture, uri, "--multifd", "2")
    assert result.returncode == 1 and result.stdout == ""
    # which channel notices first depends on timing: a multifd one says what to check
    assert result.stderr.startswith("qmig: error: "), result.stderr
    assert "internal error" not in result.stderr and result.stderr.count("\n") == 1
    if result.stderr.startswith("qmig: error: multifd channel "):
        assert "given as --uuid?" in result.stderr
    assert (
        "received uuid '00000000-0000-0000-0000-000000000000'" in destination.log_path.read_text()
    )
