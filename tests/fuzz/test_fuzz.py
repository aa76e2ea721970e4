"""``qmig fuzz``: the engine finds, minimises and writes failures; the targets survive it.

Every file in ``tests/fuzz/regressions/`` is an input that once failed (or disagreed with
QEMU) and is replayed here through every target and through ``qmig inspect``: each must
end in a verdict (accepted, or one qmig error line), never a traceback or a hang. The
``expected`` table pins the destination's verdict where it was the bug.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qmig.errors import MalformedError
from qmig.fuzz import engine, seeds
from qmig.fuzz.mutate import Mutator
from qmig.fuzz.targets import TARGETS, OracleError, Target, Verdict, chunk_size, read_stream

pytestmark = pytest.mark.timeout(300)

REGRESSIONS = Path(__file__).parent / "regressions"
VERSIONS = ["7.2", "10.0"]

# file name -> the destination's verdict under 7.2 (None: accepted), where it was the bug.
EXPECTED = {
    "destination-postcopy-trailing-bytes-after-eof.bin": None,
    "destination-precopy-eof-without-vmdescription.bin": None,
    "destination-precopy-eof-then-garbage.bin": None,
    "destination-discard-range-wraps-64-bits.bin": "POSTCOPY_RAM_DISCARD",
    "destination-discard-name-past-command.bin": "POSTCOPY_RAM_DISCARD",
}


def regression_files() -> list[Path]:
    return sorted(REGRESSIONS.iterdir())


@pytest.mark.parametrize("path", regression_files(), ids=lambda path: path.name)
@pytest.mark.parametrize("version", VERSIONS)
def test_regressions_replay_to_a_verdict(path: Path, version: str) -> None:
    if path.is_dir():  # a return-path reproducer: a capture folder
        cases = [(TARGETS["return-path"], (path / "return-path.bin").read_bytes())]
    else:
        data = path.read_bytes()
        cases = [(TARGETS["stream"], data), (TARGETS["destination"], data)]
    for target, data in cases:
        outcome = engine.execute(target, data, version, limit=10.0)
        assert outcome.finding is None, (target.name, outcome.finding)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_regressions_have_the_destinations_verdict(name: str) -> None:
    verdict = TARGETS["destination"].check((REGRESSIONS / name).read_bytes(), "7.2")
    assert verdict.what == EXPECTED[name], verdict.line()


@pytest.mark.parametrize("path", regression_files()[:3], ids=lambda path: path.name)
def test_regressions_replay_with_qmig_inspect(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", str(path), "--qemu-version", "7.2", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stderr
    if result.returncode:
        assert result.stderr.startswith("qmig: error: ") and result.stderr.count("\n") == 1


# --- the engine ------------------------------------------------------------------------------


def _crashy(data: bytes, version: str | None, chunk: int | None) -> Verdict:
    """A target with a planted bug: any input holding b'BUG' raises a non-qmig error."""
    if b"BUG" in data:
        raise ZeroDivisionError("planted")
    if data.startswith(b"\xff"):
        raise MalformedError("stream", "refused", 0)
    return Verdict(True)


def _slow(data: bytes, version: str | None, chunk: int | None) -> Verdict:
    if b"LOOP" in data:
        while True:
            pass
    return Verdict(True)


def test_a_planted_crash_is_found_minimised_and_written(tmp_path: Path) -> None:
    target = Target("planted", _crashy, "stream", "test")
    seed = b"\x00" * 100 + b"BUG" + b"\x01" * 100
    campaign = engine.Campaign(target, [seed], version="7.2", out=tmp_path, guided=False)
    report = campaign.run(runs=20)
    assert len(report.findings) == 1
    finding = report.findings[0]
    assert finding.kind == "crash" and "ZeroDivisionError" in finding.summary
    assert finding.data == b"BUG"  # delta debugging kept only what matters
    assert finding.path is not None and finding.path.read_bytes() == b"BUG"
    line = (tmp_path / "failures.txt").read_text().strip()
    assert line.startswith(finding.path.name) and "\n" not in line


def test_a_return_path_reproducer_is_a_capture_folder_inspect_reads(tmp_path: Path) -> None:
    target = Target("planted-rp", _crashy, "return_path", "test")
    finding = engine.Finding("crash", "sig", "planted", bytes.fromhex("0002000400000001"))
    path = engine.write_reproducer(tmp_path, target, finding, "7.2")
    assert path.is_dir()
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", str(path), "--qemu-version", "7.2", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["return_path"]["counts"] == {"PONG": 1}


def test_a_hang_is_a_finding_not_a_hang(tmp_path: Path) -> None:
    target = Target("slow", _slow, "stream", "test")
    campaign = engine.Campaign(
        target, [b"xxLOOPxx"], version="7.2", out=tmp_path, limit=0.2, guided=False
    )
    report = campaign.run(runs=1)
    assert [f.kind for f in report.findings] == ["hang"]


def test_a_verdict_that_depends_on_chunking_is_a_finding() -> None:
    def chunk_sensitive(data: bytes, version: str | None, chunk: int | None) -> Verdict:
        return Verdict(chunk is None)

    outcome = engine.execute(Target("c", chunk_sensitive, "stream", "t"), b"abc", "7.2")
    assert outcome.finding is not None and outcome.finding.kind == "oracle"


def test_ddmin_finds_a_small_input() -> None:
    data = bytes(range(256)) * 4
    small = engine.minimise(data, lambda d: b"\x10\x11" in d and b"\xf0" in d, seconds=10)
    assert len(small) <= 4


def test_chunk_sizes_are_fixed_by_the_input() -> None:
    assert chunk_size(b"abc") == chunk_size(b"abc")
    assert 1 <= chunk_size(b"") <= 97


def test_mutations_are_deterministic_for_a_seed() -> None:
    import random

    corpus = [b"\x08\x00\x02\x00\x04\x00\x00\x00\x01" * 3]
    first = [Mutator(random.Random(5), []).mutate(corpus[0], corpus) for _ in range(3)]
    again = [Mutator(random.Random(5), []).mutate(corpus[0], corpus) for _ in range(3)]
    assert first == again


def test_seeds_from_real_captures_are_small_valid_streams() -> None:
    found = seeds.capture_seeds("7.2")
    assert {name for name, _, _ in found} >= {"postcopy-tcp", "postcopy-sparse"}
    for name, stream, _ in found:
        assert len(stream) < 200_000, name
        assert TARGETS["stream"].check(stream, "7.2").accepted, name


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_target_survives_a_short_campaign(target: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "fuzz", target, "--runs", "150", "--seed", "3",
         "--qemu-version", "7.2", "--out", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert report["runs"] == 150 and report["target"] == target
    assert report["findings"] == [], report["findings"]
    assert result.returncode == 0


def test_replay_prints_each_files_verdict() -> None:
    files = [str(path) for path in regression_files() if path.is_file()]
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "fuzz", "destination", "--replay", *files,
         "--qemu-version", "7.2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    verdicts = {Path(item["file"]).name: item["verdict"] for item in json.loads(result.stdout)}
    assert verdicts["destination-postcopy-trailing-bytes-after-eof.bin"] == "accepted"
    assert verdicts["destination-discard-range-wraps-64-bits.bin"].startswith(
        "rejected POSTCOPY_RAM_DISCARD"
    )


def test_oracle_errors_are_assertion_errors() -> None:
    assert issubclass(OracleError, AssertionError)


@pytest.mark.parametrize(
    "path",
    [path for path in regression_files() if path.name.startswith("stream-")],
    ids=lambda path: path.name,
)
@pytest.mark.parametrize("version", VERSIONS)
def test_stream_regressions_have_one_verdict_at_every_chunk_size(path: Path, version: str) -> None:
    # Issue 11's rule: a reader's verdict never depends on how the bytes were chunked. The
    # MEM_SIZE layout guess once read only what had arrived: whole, it reported truncation;
    # fed in pieces, the empty name that comes first.
    data = path.read_bytes()
    whole = read_stream(data, version)
    for size in (1, 2, 7, 41, 100, len(data) - 1):
        assert read_stream(data, version, size) == whole, size
