"""``qmig receive --multifd N``: a real QEMU 7.2 or 10.0 source with the multifd capability
migrates into qmig, RAM verified as the other receive tests verify it (the dumped ``pc.ram``
against ``pmemsave`` of the stopped source).

The guest keeps writing while precopy runs, so pages are sent several times, on different
channels, and as ZERO records on the main channel where the version (7.2) or the setting
(``zero-page-detection=legacy``) puts them there: the RAM is right only if every sync is
kept as QEMU keeps it. The cases cover both versions, 2 and 4 channels, the three
zero-page-detection settings of 10.0, zlib and zstd, and a machine type of 8.0 (where 10.0
syncs at each section's EOS instead of at MULTIFD_FLUSH).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemu_helpers import need
from test_receive_real import (
    MEMORY_MIB,
    SPEC,
    TIMEOUT,
    MachineFactory,
    compare_pc_ram,
    finish,
    receiving,
)

CASES = [
    # version, channels, compression, zero-page-detection (10.0), machine type
    pytest.param("7.2", 2, "none", None, "pc", id="7.2-2ch"),
    pytest.param("7.2", 4, "zlib", None, "pc", id="7.2-4ch-zlib"),
    pytest.param("10.0", 2, "none", "multifd", "pc", id="10.0-2ch-zero-multifd"),
    pytest.param("10.0", 4, "zstd", "multifd", "pc", id="10.0-4ch-zstd"),
    pytest.param("10.0", 2, "zlib", "none", "pc", id="10.0-2ch-zlib-zero-none"),
    pytest.param("10.0", 4, "none", "legacy", "pc-i440fx-8.0", id="10.0-4ch-legacy-machine-8.0"),
]


@pytest.mark.qemu
@pytest.mark.parametrize(("version", "channels", "compression", "zero", "machine"), CASES)
def test_receive_multifd_from_real_qemu(
    machines: MachineFactory,
    tmp_path: Path,
    version: str,
    channels: int,
    compression: str,
    zero: str | None,
    machine: str,
) -> None:
    qemu_version = need(version)
    dump_dir = tmp_path / "dump"
    args = ["--json", "--dump-ram", str(dump_dir)]
    if channels == 2 or machine != "pc":  # else the version is told from the stream
        args += ["--qemu-version", version]
    args += ["--multifd", str(channels), "--multifd-compression", compression]
    with receiving(*args) as (process, uri):
        source = machines(
            "source",
            memory_mib=MEMORY_MIB,
            guest=SPEC,
            qemu_version=qemu_version,
            machine_type=machine,
        )
        source.wait_serial(1)
        source.set_capabilities(multifd=True)
        parameters = {"multifd-channels": channels, "multifd-compression": compression}
        if zero is not None:
            parameters["zero-page-detection"] = zero
        # Let precopy of the busy guest converge after a few rounds. Compressed, the guest's
        # counters shrink so much that the wire rate QEMU measures makes the dirty pages
        # look too many for 2 s: it would go on for hundreds of rounds.
        downtime = 2000 if compression == "none" else 30000
        source.set_parameters(downtime_limit=downtime, **parameters)
        source.migrate(uri)
        info = source.wait_migration(timeout=TIMEOUT)
        code, stdout, stderr = finish(process)
    assert code == 0, stderr
    assert info["status"] == "completed"
    summary = json.loads(stdout)
    assert summary["mode"] == "precopy" and summary["qemu_version"] == version
    pages = summary["multifd_pages"]
    assert sorted(pages) == ["main"] + [f"multifd-{k}" for k in range(channels)]
    # Each channel carried part of the 31 MiB the guest wrote (written at least once).
    assert all(pages[f"multifd-{k}"] > 0 for k in range(channels)), pages
    assert sum(pages.values()) >= (SPEC.end - SPEC.start) // 4096
    # Zero pages: on the main channel in 7.2 and with legacy detection, else in packets.
    per_channel = summary["multifd"]["per_channel"]
    zero_in_packets = sum(channel["zero_pages"] for channel in per_channel)
    if version == "7.2" or zero == "legacy":
        assert zero_in_packets == 0 and pages["main"] > 0
    elif zero == "multifd":
        assert zero_in_packets > 0 and pages["main"] == 0
    else:  # "none": every page is a normal page in a packet
        assert zero_in_packets == 0 and pages["main"] == 0
    expected = {"none": ["NOCOMP"], "zlib": ["ZLIB"], "zstd": ["ZSTD"]}[compression]
    assert all(channel["compression"] == expected for channel in per_channel)
    # 7.2, and 10.0 with a machine type of 8.0 or older, sync at each section's EOS.
    per_section = version == "7.2" or machine == "pc-i440fx-8.0"
    assert summary["multifd"]["flush_after_each_section"] is per_section
    # At least setup's sync, one per iteration, and the completion's.
    assert summary["multifd_syncs"] >= 3
    assert all(channel["syncs"] == summary["multifd_syncs"] for channel in per_channel)
    compare_pc_ram(dump_dir, source, tmp_path)


@pytest.mark.qemu
def test_a_10_0_source_read_with_7_2_rules_is_refused(
    machines: MachineFactory, tmp_path: Path
) -> None:
    """Its packets count zero pages where 7.2 reserves the bytes: refused, not misplaced.
    (With a machine type of 8.0 its main stream reads as 7.2's: no MULTIFD_FLUSH.)"""
    need("10.0")
    args = ["--qemu-version", "7.2", "--multifd", "2", "--idle-timeout", "20"]
    with receiving(*args) as (process, uri):
        source = machines(
            "source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version="10.0",
            machine_type="pc-i440fx-8.0",
        )  # fmt: skip
        source.wait_serial(1)
        source.set_capabilities(multifd=True)
        source.set_parameters(multifd_channels=2, zero_page_detection="multifd")
        source.migrate(uri)
        code, _stdout, stderr = finish(process)
    assert code == 1
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert "MULTIFD_PACKET: reserved bytes are not zero (QEMU 7.2 reserves them" in stderr
    assert stderr.startswith("qmig: error: multifd channel "), stderr
