"""``qmig capture --multifd 2`` between two real QEMUs (10.0, two channels): the relay takes the
main connection and both multifd channels, the destination's RAM equals the source's, and
``qmig inspect DIR`` reads every byte of the folder, the channels on one timeline with the
stream's sync points, pages per channel adding up to what each file carried."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_multifd_receive import need_qemu
from test_receive_real import MachineFactory

from qmig.capture import read_capture
from qmig.capture.recording import Direction, read_index
from qmig.qemu.guest import MIB, GuestSpec

VERSION = "10.0"
MEMORY_MIB = 32
SPEC = GuestSpec(end=8 * MIB)


def qmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmig", *args]


@pytest.mark.qemu
def test_capture_and_inspect_a_real_multifd_migration(
    machines: MachineFactory, tmp_path: Path
) -> None:
    need_qemu(VERSION)
    destination = machines(
        "destination", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer", paused=True,
        qemu_version=VERSION,
    )  # fmt: skip
    destination.set_capabilities(multifd=True)
    destination.set_parameters(multifd_channels=2)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    out = tmp_path / "capture"
    relay = subprocess.Popen(
        qmig("capture", "--listen", "tcp:127.0.0.1:0", "--multifd", "2",
             "--connect", f"tcp:127.0.0.1:{destination.incoming_port()}",
             "--out", str(out), "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert relay.stderr is not None
        listening = relay.stderr.readline().strip()
        source = machines("source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=VERSION)
        source.wait_serial(1)
        source.set_capabilities(multifd=True)
        source.set_parameters(multifd_channels=2, downtime_limit=2000)
        source.migrate(listening.rsplit(" ", 1)[1])
        source.wait_migration(timeout=60)
        destination.wait_migration(timeout=60)
        stdout, stderr = relay.communicate(timeout=60)
    finally:
        relay.kill()
        relay.wait()
    assert relay.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["clean"] is True
    assert [channel["end"] for channel in summary["multifd"]] == ["eof", "eof"]
    # The destination (kept paused) holds what the stopped source holds.
    expected = source.pmemsave(MIB, (MEMORY_MIB - 1) * MIB, tmp_path / "source.ram")
    assert destination.pmemsave(MIB, (MEMORY_MIB - 1) * MIB, tmp_path / "dest.ram") == expected

    # The folder: both multifd files beside the stream, in the index and meta.json.
    files = [out / "multifd-0.bin", out / "multifd-1.bin"]
    sizes = [path.stat().st_size for path in files]
    assert all(size > 0 for size in sizes)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["multifd"]["files"] == ["multifd-0.bin", "multifd-1.bin"]
    assert [meta["directions"][f"multifd-{k}"]["bytes"] for k in range(2)] == sizes
    directions = {chunk.direction for chunk in read_index(out / "index.tsv")}
    assert {Direction("multifd-0"), Direction("multifd-1"), Direction.STREAM} <= directions
    capture = read_capture(out)

    result = subprocess.run(
        qmig("inspect", str(out), "--json"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bytes"] == len(capture.stream)
    multifd = report["multifd"]
    assert [channel["bytes"] for channel in multifd["channels"]] == sizes  # every byte
    assert sorted(channel["id"] for channel in multifd["channels"]) == [0, 1]
    assert multifd["syncs_match"] and len(multifd["sync_points"]) >= 3
    assert multifd["flush_after_each_section"] is False  # pc = pc-i440fx-10.0: MULTIFD_FLUSH
    assert {point["name"] for point in multifd["sync_points"]} == {"MULTIFD_FLUSH"}
    # Pages: normal pages in packets fill each file with their data; zero pages are listed.
    page = 4096
    for channel, size in zip(multifd["channels"], sizes, strict=True):
        packets = channel["packets"]
        assert size == 64 + packets * (320 + 8 * 128) + channel["pages"] * page
    pages = multifd["pages"]
    total = sum(pages.values())
    # Every page of guest RAM went once at least; the main channel carries none (10.0 lists
    # zero pages in packets).
    assert pages["main"] == 0 and total >= MEMORY_MIB * MIB // page

    text = subprocess.run(qmig("inspect", str(out)), capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "multifd-1" in text.stdout and "MULTIFD_PACKET SYNC" in text.stdout
    assert "MULTIFD_FLUSH" in text.stdout
