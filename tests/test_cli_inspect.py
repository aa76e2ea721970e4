"""``qmig inspect DIR`` on a capture directory: both directions on the relay's timeline.

Checked against the real postcopy capture in ``fixtures/postcopy-tcp`` (QEMU 7.2 → 7.2
through qmig's relay): 177 page requests, each matched with the stream's page record that
answered it, and the listing shows each request beside its answer.
"""

from __future__ import annotations

import json
import lzma
import re
from pathlib import Path
from typing import Any

import pytest

from qmig.capture.recording import Direction, read_index
from qmig.cli import main
from qmig.inspect import (
    PageRequest,
    RequestMatcher,
    Timeline,
    count_return_path,
    latency_summary,
    return_path_records,
    stream_records,
)
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PAGE = 4096


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = FIXTURES / "postcopy-tcp"
    meta = json.loads((folder / "meta.json").read_text())
    out = tmp_path_factory.mktemp("postcopy-tcp")
    for name in meta["files"]:
        (out / name).write_bytes(lzma.decompress((folder / f"{name}.xz").read_bytes()))
    (out / "meta.json").write_text(json.dumps(meta["capture_meta"]))
    return out


def run_inspect(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["inspect", "--qemu-version", "7.2", *args]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def report(capture: Path) -> dict[str, Any]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", "--qemu-version", "7.2", "--json", str(capture)]) == 0
    document: dict[str, Any] = json.loads(out.getvalue())
    return document


def test_every_request_is_listed_with_its_block_and_time(
    capture: Path, report: dict[str, Any]
) -> None:
    requests = report["requests"]
    assert len(requests) == 177
    counts = count_return_path((capture / "return-path.bin").read_bytes())
    assert len(requests) == counts["REQ_PAGES"] + counts["REQ_PAGES_ID"]
    assert requests[0]["name"] == "REQ_PAGES_ID"
    assert {r["block"] for r in requests} == {"pc.ram"}
    times = [r["t_ns"] for r in requests]
    assert times == sorted(times) and times[0] > 0
    assert all(r["len"] == PAGE and r["start"] % PAGE == 0 for r in requests)


def test_each_answer_is_a_page_record_of_the_requested_page(
    capture: Path, report: dict[str, Any]
) -> None:
    # Decode, independently of the matcher, the page record at every answered_at_byte.
    stream = (capture / "stream.bin").read_bytes()
    flags = schema_for("7.2").profile.ram_flags
    for request in report["requests"]:
        at = request["answered_at_byte"]
        assert at is not None, request  # every request in this capture was answered
        header = int.from_bytes(stream[at : at + 8], "big")
        assert header & ~(PAGE - 1) == request["start"]
        assert header & (flags["ZERO"] | flags["PAGE"])
        latency = request["latency_us"]
        assert (latency < 0) == request["in_flight"]
        assert latency == round((request["answered_t_ns"] - request["t_ns"]) / 1000, 1)


def test_answers_come_after_the_request_unless_already_in_flight(report: dict[str, Any]) -> None:
    summary = report["request_latency_us"]
    answered = [r for r in report["requests"] if not r["in_flight"]]
    in_flight = [r for r in report["requests"] if r["in_flight"]]
    assert summary["count"] == 177 and summary["unanswered"] == 0
    assert summary["answered"] == len(answered) > 0
    assert summary["in_flight"] == len(in_flight)
    latencies = sorted(r["latency_us"] for r in answered)
    assert summary["max"] == latencies[-1]
    assert latencies[0] >= 0 and summary["p50"] <= summary["p99"] <= summary["max"]


def test_the_listing_interleaves_both_directions_and_pairs_requests(
    capture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = run_inspect(capsys, str(capture)).splitlines()
    timed = [line for line in lines if re.match(r"\s*\d+\.\d{3} ms  ", line)]
    times = [float(line.split()[0]) for line in timed]
    assert times == sorted(times), "one timeline"
    assert {line.split()[2] for line in timed} == {"stream", "return-path"}
    requests = [
        i
        for i, line in enumerate(lines)
        if re.search(r" ms  return-path .* REQ_PAGES(_ID)? ", line)
    ]
    assert len(requests) == 177
    for index in requests:
        assert "-> answered by the RAM record at stream byte" in lines[index + 1]
    assert any("page requests: 177" in line for line in lines)


@pytest.mark.parametrize("direction", [Direction.STREAM, Direction.RETURN_PATH])
def test_a_capture_whose_index_does_not_cover_its_files_is_refused(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], direction: Direction
) -> None:
    for name in ("stream.bin", "return-path.bin", "meta.json"):
        (tmp_path / name).write_bytes((capture / name).read_bytes())
    lines = (capture / "index.tsv").read_text().splitlines(keepends=True)
    last = max(k for k, line in enumerate(lines) if line.startswith(f"{direction.value}\t"))
    (tmp_path / "index.tsv").write_text("".join(lines[:last] + lines[last + 1 :]))
    size = (capture / f"{'stream' if direction is Direction.STREAM else 'return-path'}.bin").stat()
    assert main(["inspect", "--qemu-version", "7.2", "--json", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"qmig: error: index.tsv: {direction.value} chunks sum to ")
    assert error.endswith(f", the file has {size.st_size} bytes") and "\n" not in error


# --- the matcher on made-up timelines -----------------------------------------------------


def run_of(block: str, records: list[tuple[int, int]], continue_flag: int) -> m.RamPageRun:
    """A run of CONTINUE page records: (page offset in block, body offset in the stream)."""
    from array import array

    headers = array("Q", [offset | 0x08 | continue_flag for offset, _ in records])
    bodies = array("Q", [body for _, body in records])
    return m.RamPageRun(
        block,
        len(records),
        0,
        memoryview(headers),
        memoryview(bodies),
        memoryview(b""),
        0,
        PAGE,
        0x08,
    )


def test_a_huge_page_request_is_answered_by_its_last_target_page() -> None:
    cont = schema_for("7.2").profile.ram_flags["CONTINUE"]
    # Stream chunks: bytes [0, 100000) at t=10 µs, [100000, 200000) at t=50 µs.
    timeline = Timeline([(0, 100_000, 10_000), (100_000, 100_000, 50_000)])
    request = PageRequest(0, "REQ_PAGES_ID", "mem", 0x200000, 2 * PAGE, t_ns=20_000)
    matcher = RequestMatcher([request], timeline, PAGE, cont)
    matcher.add(run_of("mem", [(0x200000, 20_000)], cont))  # arrived at 10: before the request
    matcher.add(run_of("mem", [(0x200000, 110_000), (0x201000, 120_000)], cont))
    matcher.finish()
    assert (request.answered_at_byte, request.answered_t_ns) == (120_000 - 8, 50_000)
    assert request.latency_us == 30.0 and not request.in_flight
    assert latency_summary([request])["answered"] == 1


def test_a_page_already_in_flight_answers_with_a_negative_latency() -> None:
    cont = schema_for("7.2").profile.ram_flags["CONTINUE"]
    timeline = Timeline([(0, 100_000, 1_000), (100_000, 100_000, 9_000)])
    early = PageRequest(0, "REQ_PAGES_ID", "pc.ram", 0x5000, PAGE, t_ns=5_000)
    matcher = RequestMatcher([early], timeline, PAGE, cont)
    matcher.add(run_of("pc.ram", [(0x5000, 10_000)], cont))  # precopy: does not count
    matcher.postcopy_started()
    matcher.add(run_of("pc.ram", [(0x5000, 50_000)], cont))  # after the switch, at t=1000
    matcher.finish()
    assert early.in_flight and early.answered_at_byte == 50_000 - 8
    assert early.latency_us == -4.0
    summary = latency_summary([early])
    assert summary["in_flight"] == 1 and summary["answered"] == 0 and summary["p50"] is None


def test_helpers_read_whole_recordings_with_the_wire_readers(capture: Path) -> None:
    records = return_path_records((capture / "return-path.bin").read_bytes(), "7.2")
    assert records[-1].message == m.Shut(0)
    chunks = read_index(capture / "index.tsv")
    assert sum(c.length for c in chunks if c.direction is Direction.RETURN_PATH) == sum(
        r.size for r in records
    )
    first = next(stream_records((capture / "stream.bin").read_bytes(), "7.2"))
    assert first.message == m.StreamHeader(3)


def test_the_shipped_compressed_capture_inspects_as_it_is(report: dict[str, Any]) -> None:
    """The README points at fixtures/postcopy-tcp itself: its .xz files are read as they are,
    with the same result as the unpacked copy."""
    import contextlib
    import io

    out = io.StringIO()
    folder = FIXTURES / "postcopy-tcp"
    with contextlib.redirect_stdout(out):
        assert main(["inspect", "--qemu-version", "7.2", "--json", str(folder)]) == 0
    packed: dict[str, Any] = json.loads(out.getvalue())
    assert packed["bytes"] == report["bytes"] > 0
    assert packed["counts"] == report["counts"]
    assert packed["return_path"]["counts"] == report["return_path"]["counts"]
    assert packed["requests"] == report["requests"]
    assert len(packed["requests"]) == 177


def test_a_folder_without_a_stream_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"qmig: error: {tmp_path}: not a capture folder: no stream.bin"
    )
