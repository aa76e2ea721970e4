"""``qmig replay`` as a user runs it: a recorded migration, into a fresh real QEMU destination.

The recordings are the real QEMU 7.2 fixtures of qmig's test guest (``fixtures/``), so each
test costs one destination QEMU. Afterwards the destination's guest must go on running (its
serial port keeps printing markers) and the counter oracle must accept its memory.
"""

from __future__ import annotations

import json
import lzma
import subprocess
import time
from pathlib import Path

import pytest
from processes import qmig
from qemu_helpers import (
    FIXTURES,
    POSTCOPY,
    PRECOPY,
    TIMEOUT,
    MachineFactory,
    check_guest_runs_on,
    destination_for,
)

from qmig.qemu.guest import MIB, GuestSpec, known_data
from qmig.qemu.scenario import PostcopyPlan, run_postcopy
from qmig.replay import load_recording
from qmig.wire import messages as m
from qmig.wire.reader import StreamReader


def run_replay(capture: Path, uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # CI's QEMU is 7.2: speak its profile (the default, 10.0, adds a PING to PACKAGED).
        qmig("replay", str(capture), "--to", uri, "--qemu-version", "7.2", *args),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


def test_rebuilt_device_state_is_byte_exact() -> None:
    """The PACKAGED blob a replay sends equals the captured one, byte for byte."""
    from qmig.protocol.source import Source

    capture, _, _ = POSTCOPY
    recording = load_recording(capture, "7.2")
    try:
        assert recording.machine_type == "pc-i440fx-7.2"
        assert recording.switched and recording.passes_before_switch == 1
        stream = lzma.decompress((capture / "stream.bin.xz").read_bytes())
        source = Source(
            recording.source_blocks(),
            version="7.2",
            configuration=recording.configuration,
            devices=recording.devices,
        )
        source.start()
        opening = source.data_to_send(0)
        assert stream.startswith(opening), "header, CONFIGURATION, commands and MEM_SIZE"
        while not source.pass_complete:
            source.data_to_send(1 << 20)
        source.start_postcopy()
        switchover = source.data_to_send(0)
        reader = StreamReader("7.2")
        reader.feed(stream)
        reader.feed_eof()
        packaged = next(r for r in reader if isinstance(r.message, m.Packaged))
        captured = stream[packaged.offset : packaged.offset + 9 + packaged.message.length]
        assert captured in switchover
    finally:
        recording.close()


def test_rebuilt_ram_holds_the_known_data() -> None:
    """The precopy-known fixture: a paused guest whose RAM held known bytes at 1 MiB."""
    recording = load_recording(FIXTURES / "precopy-known", "7.2")
    try:
        assert not recording.switched and recording.ram_mib == 16
        ram = next(block for block in recording.blocks if block.idstr == "pc.ram").memory
        assert ram[MIB : MIB + 65536] == known_data(65536, seed=2026)
        assert ram[MIB + 65536 : 2 * MIB] == bytes(MIB - 65536)
    finally:
        recording.close()


@pytest.mark.qemu
@pytest.mark.parametrize("postcopy_after", [None, 0])
def test_replay_postcopy_capture_into_real_qemu(
    machines: MachineFactory, tmp_path: Path, postcopy_after: int | None
) -> None:
    capture, memory_mib, spec = POSTCOPY
    # Capped, so that the destination's guest outruns the stream and must ask for pages.
    args = ["--json", "--bandwidth", "32"]
    if postcopy_after is not None:
        # Also a raw stream file rather than a capture folder.
        raw = tmp_path / "stream.bin"
        raw.write_bytes(lzma.decompress((capture / "stream.bin.xz").read_bytes()))
        capture = raw
        args += ["--postcopy-after", str(postcopy_after)]
    destination, uri = destination_for(machines, memory_mib, spec)
    result = run_replay(capture, uri, *args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    info = check_guest_runs_on(destination, spec, tmp_path)
    assert summary["mode"] == "postcopy"
    assert summary["passes"] == 1
    if postcopy_after == 0:
        assert summary["precopy_pages"] == 0, "everything went in postcopy"
    assert summary["discarded_pages"] > 0
    assert summary["requests"] > 0, "the destination's guest asked for pages"
    assert summary["request_to_sent_us"]["count"] == summary["requests"]
    assert sorted(summary["pongs"]) == [1, 2, 3, 4]
    assert info["status"] == "completed"
    assert info["postcopy-blocktime"] > 0  # QEMU's own account of its faults


@pytest.mark.qemu
def test_replay_precopy_capture_into_real_qemu(machines: MachineFactory, tmp_path: Path) -> None:
    capture, memory_mib, spec = PRECOPY
    destination, uri = destination_for(machines, memory_mib, spec)
    result = run_replay(capture, uri, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["mode"] == "precopy"
    assert summary["requests"] == summary["postcopy_pages"] == 0
    check_guest_runs_on(destination, spec, tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("memory_mib", "extra", "refusal"),
    [
        (32, (), "Size mismatch: pc.ram: 0x4000000 != 0x2000000"),
        (64, ("-machine", "q35"), "Machine type received is 'pc-i440fx-7.2'"),
    ],
)
def test_replay_into_a_mismatched_destination_fails_with_one_line(
    machines: MachineFactory,
    tmp_path: Path,
    memory_mib: int,
    extra: tuple[str, ...],
    refusal: str,
) -> None:
    capture, _, _ = POSTCOPY
    destination, uri = destination_for(machines, memory_mib, GuestSpec(end=8 * MIB), *extra)
    result = run_replay(capture, uri)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qmig: error: ")
    assert "is the destination running machine type pc-i440fx-7.2 with -m 64M" in lines[0]
    assert " at byte " in lines[0]
    assert destination.process is not None
    destination.process.wait(timeout=TIMEOUT)  # QEMU gives up on the incoming migration
    assert refusal in destination.log_path.read_text()


def test_replay_of_a_missing_capture_fails_with_one_line(tmp_path: Path) -> None:
    result = run_replay(tmp_path / "nothing", "tcp:127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr == f"qmig: error: {tmp_path / 'nothing'}: no such file or folder\n"


def test_replay_to_nobody_fails_with_one_line() -> None:
    capture, _, _ = PRECOPY
    result = run_replay(capture, "tcp:127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr == "qmig: error: tcp:127.0.0.1:1: connection refused\n"


@pytest.mark.qemu
def test_replay_a_fresh_128_mib_capture(machines: MachineFactory, tmp_path: Path) -> None:
    """Record a real QEMU → QEMU postcopy migration through the relay, then replay it."""
    spec = GuestSpec(end=32 * MIB)
    plan = PostcopyPlan(
        memory_mib=128,
        guest=spec,
        max_bandwidth=32 * MIB,
        max_postcopy_bandwidth=16 * MIB,
        precopy_seconds=0.5,
        capture_dir=tmp_path / "capture",
    )
    recorded = run_postcopy(plan, tmp_path / "recorded")
    assert recorded.source_info["ram"]["postcopy-requests"] > 0
    destination, uri = destination_for(machines, 128, spec)
    result = run_replay(tmp_path / "capture", uri, "--json", "--bandwidth", "32")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ram_mib"] == 128 and summary["mode"] == "postcopy"
    assert summary["requests"] > 0
    check_guest_runs_on(destination, spec, tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize(("postcopy_after", "phase"), [(None, "precopy"), (0, "postcopy")])
def test_replay_reports_a_destination_killed_mid_migration(
    machines: MachineFactory, tmp_path: Path, postcopy_after: int | None, phase: str
) -> None:
    capture, memory_mib, spec = POSTCOPY
    destination, uri = destination_for(machines, memory_mib, spec)
    args = ["--bandwidth", "8"]  # slow: the 41 MB of the first pass take 5 s
    if postcopy_after is not None:
        args += ["--postcopy-after", str(postcopy_after)]
    replaying = subprocess.Popen(
        qmig("replay", str(capture), "--to", uri, "--qemu-version", "7.2", *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        destination.wait_migration(until=("active", "postcopy-active"), timeout=TIMEOUT)
        time.sleep(2.5)  # well past the start, where a refusal would mean a mismatch
        status = destination.query_migrate()["status"]
        assert status == ("postcopy-active" if phase == "postcopy" else "active")
        destination.kill()
        started = time.monotonic()
        stdout, stderr = replaying.communicate(timeout=TIMEOUT)
    finally:
        replaying.kill()
        replaying.wait()
    assert time.monotonic() - started < 10
    assert replaying.returncode == 1
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("qmig: error: ") and " at byte " in lines[0], lines[0]
    assert f"during {phase}" in lines[0]
    assert "as captured" not in lines[0]


def test_replay_of_a_truncated_stream_fails_with_one_line(tmp_path: Path) -> None:
    stream = lzma.decompress((FIXTURES / "precopy-known" / "stream.bin.xz").read_bytes())
    cut = tmp_path / "cut.bin"
    cut.write_bytes(stream[:300_000])
    result = run_replay(cut, "tcp:127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("qmig: error: ")
    assert "unexpected end of stream" in result.stderr and " at byte " in result.stderr
    assert len(result.stderr.splitlines()) == 1
