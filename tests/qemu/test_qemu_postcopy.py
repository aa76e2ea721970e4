"""A real QEMU → QEMU postcopy migration through the recording relay, checked end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from qmig.capture import read_capture
from qmig.errors import VerificationError
from qmig.inspect import find_discard_commands, return_path_records
from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.oracle import verify_counters
from qmig.qemu.scenario import PostcopyPlan, PostcopyResult, run_postcopy

PLAN = PostcopyPlan(
    memory_mib=64,
    guest=GuestSpec(end=40 * MIB),
    max_bandwidth=16 * MIB,
    max_postcopy_bandwidth=8 * MIB,
    precopy_seconds=1.0,
)


@pytest.fixture(scope="module")
def migration(tmp_path_factory: pytest.TempPathFactory) -> tuple[PostcopyResult, Path]:
    workdir = tmp_path_factory.mktemp("postcopy")
    capture_dir = workdir / "capture"
    return run_postcopy(replace(PLAN, capture_dir=capture_dir), workdir), capture_dir


@pytest.mark.qemu
def test_postcopy_completes_and_destination_guest_runs_on(
    migration: tuple[PostcopyResult, Path],
) -> None:
    result, _ = migration
    assert result.source_info["status"] == "completed"
    assert result.destination_info["status"] == "completed"
    assert result.source_info["ram"]["postcopy-bytes"] > 0, "it really was postcopy"
    assert result.destination_serial_after >= 2


@pytest.mark.qemu
def test_destination_pages_request_what_the_source_served(
    migration: tuple[PostcopyResult, Path],
) -> None:
    result, capture_dir = migration
    messages = return_path_records(read_capture(capture_dir).return_path)
    requests = [m for m in messages if m.name in ("REQ_PAGES", "REQ_PAGES_ID")]
    assert any(m.name == "REQ_PAGES" for m in requests)
    # The first request of a block names it; later ones for the same block are short.
    first_request = requests[0]
    assert first_request.name == "REQ_PAGES_ID"
    # The source counts every request it received: all of them went through the relay.
    assert result.source_info["ram"]["postcopy-requests"] == len(requests)
    pongs = sorted(m.message.value for m in messages if m.name == "PONG")
    assert pongs == [1, 2, 3, 4]
    assert messages[-1].name == "SHUT" and messages[-1].message.status == 0


@pytest.mark.qemu
def test_capture_records_exactly_what_was_forwarded(
    migration: tuple[PostcopyResult, Path],
) -> None:
    result, capture_dir = migration
    assert result.capture is not None and result.capture.clean
    capture = read_capture(capture_dir)  # raises unless the index tiles both files exactly
    assert result.capture.stream.bytes == len(capture.stream)
    assert result.capture.return_path.bytes == len(capture.return_path)
    assert capture.meta["directions"]["stream"]["sha256"] == result.capture.stream.sha256
    assert capture.stream.startswith(b"QEVM\x00\x00\x00\x03")
    assert capture.stream.endswith(b"\x00"), "a completed stream ends with EOF"
    # What the source says it sent of RAM is inside the stream, with framing on top.
    assert result.source_info["ram"]["transferred"] <= len(capture.stream)
    discards = find_discard_commands(capture.stream)
    assert any(d.block == "pc.ram" for d in discards)
    times = [chunk.t_ns for chunk in capture.chunks]
    assert times == sorted(times)


@pytest.mark.qemu
def test_oracle_rejects_a_corrupted_destination_dump(
    migration: tuple[PostcopyResult, Path],
) -> None:
    result, _ = migration
    spec = PLAN.guest
    dump = bytearray(result.dump_path.read_bytes())
    verify_counters(bytes(dump), spec.start, spec)
    page = 1234
    dump[page * 4096] = (dump[page * 4096] + 100) % 256
    with pytest.raises(VerificationError, match=f"{spec.start + page * 4096:#x}="):
        verify_counters(bytes(dump), spec.start, spec)
