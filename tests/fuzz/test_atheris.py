"""``qmig fuzz TARGET --engine atheris``: the same targets, seeds and oracle on libFuzzer.

Each real target runs a short bounded campaign in libFuzzer's fork mode and must execute
inputs and end clean. Planted bugs (a crash on a magic input, a hang) given as seeds must be
found, written to OUT as libFuzzer artifacts and as qmig reproducers, and replay. atheris is
in the ``dev`` extra: these tests fail rather than skip where it is missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import processes
import pytest

from qmig.fuzz import atheris_campaign, atheris_seeds, engine
from qmig.fuzz.targets import TARGETS

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
PLANTED = textwrap.dedent(
    """
    from qmig.errors import MalformedError
    from qmig.fuzz.targets import Target, Verdict

    def crashy(data, version, chunk):
        if b"BUG" in data:
            raise ZeroDivisionError("planted")
        if data.startswith(b"\\xff"):
            return Verdict.of(MalformedError("stream", "refused", 0))
        return Verdict(True)

    def slow(data, version, chunk):
        if b"LOOP" in data:
            while True:
                pass
        return Verdict(True)

    CRASHY = Target("crashy", crashy, "stream", "a planted crash")
    SLOW = Target("slow", slow, "return_path", "a planted hang")
    """
)


def qmig(*words: str) -> subprocess.CompletedProcess[str]:
    return processes.run(*words, timeout=240)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_each_target_runs_a_bounded_campaign_clean(name: str, tmp_path: Path) -> None:
    result = qmig(
        "fuzz", name, "--engine", "atheris", "--jobs", "1", "--runs", "100", "--seed", "1",
        "--qemu-version", "7.2", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["engine"] == "atheris" and report["target"] == name
    # Fork mode stops between jobs once --runs is reached (a job's count can end one short).
    assert report["runs"] >= 50 and report["execs_per_second"] > 0
    assert report["edges"] > 0  # qmig's modules were instrumented
    # The corpus directory was seeded from qmig's seeds, and grew or kept them.
    corpus = tmp_path / f"corpus-{name}"
    assert report["seeds"] > 0 and report["corpus"] == len(list(corpus.iterdir())) > 0
    assert report["findings"] == [] and report["artifacts"] == []
    assert "Traceback" not in result.stderr


def _planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The workers import the planted targets by name: the module must be on their path.
    (tmp_path / "planted.py").write_text(PLANTED)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_planted_crash_given_as_a_seed_is_found_written_and_replays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _planted(tmp_path, monkeypatch)
    out = tmp_path / "out"
    seed = b"\x00" * 40 + b"BUG" + b"\x01" * 40
    report = atheris_campaign.run(
        "planted:CRASHY",
        [seed, b"harmless", b"\xffrefused"],
        version="7.2",
        version_name="7.2",
        out=out,
        jobs=1,
        # libFuzzer's fork mode takes a moment to start its worker: on a loaded 2-CPU host
        # 2 s could end before the first run.
        seconds=10,
    )
    assert report.runs > 0
    # Each worker that met the bug left its input; one finding per distinct bug.
    assert report.artifacts
    for artifact in report.artifacts:
        assert artifact.name.startswith("crashy-crash-") and b"BUG" in artifact.read_bytes()
    artifact = report.artifacts[0]
    [finding] = report.findings
    assert finding.kind == "crash" and "ZeroDivisionError" in finding.summary
    assert finding.data == b"BUG"  # minimised as the built-in engine minimises
    assert finding.path is not None and finding.path.read_bytes() == b"BUG"
    [line] = (out / "failures.txt").read_text().splitlines()
    assert line.startswith(f"{finding.path.name}\tcrashy\tcrash\t")
    # Replaying the artifact through the same oracle finds the same bug.
    import planted  # type: ignore[import-not-found]

    again = engine.execute(planted.CRASHY, artifact.read_bytes(), "7.2").finding
    assert again is not None and again.signature == finding.signature
    # And 'qmig fuzz TARGET --replay' reads a libFuzzer artifact as it reads a reproducer.
    result = qmig("fuzz", "stream", "--replay", str(artifact), "--qemu-version", "7.2")
    assert result.returncode == 0 and result.stdout.startswith(f"{artifact}: rejected ")


def test_a_planted_hang_is_a_finding_under_atheris_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _planted(tmp_path, monkeypatch)
    out = tmp_path / "out"
    report = atheris_campaign.run(
        "planted:SLOW",
        [b"xxLOOPxx", b"quick"],
        version="7.2",
        version_name="7.2",
        out=out,
        jobs=1,
        seconds=2,
        time_limit=0.3,
    )
    [finding] = report.findings
    assert finding.kind == "hang" and finding.data == b"LOOP"
    # A return-path finding is a capture folder, as the built-in engine writes it.
    assert finding.path is not None and (finding.path / "return-path.bin").read_bytes() == b"LOOP"


def test_a_target_that_fails_to_start_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _planted(tmp_path, monkeypatch)
    with pytest.raises(Exception, match="no attribute 'MISSING'"):
        atheris_campaign.run(
            "planted:MISSING", [], version=None, version_name="10.0", out=tmp_path, seconds=1
        )


def test_differential_has_no_atheris_engine(tmp_path: Path) -> None:
    result = qmig("fuzz", "differential", "--engine", "atheris", "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("qmig: error: --engine atheris: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_clusterfuzzlite_entry_files_run_under_atheris(name: str, tmp_path: Path) -> None:
    """Each ``.clusterfuzzlite/*_fuzzer.py`` (what build.sh packages) fuzzes its target on
    the exported seed corpus and dictionary."""
    exported = atheris_seeds.export(tmp_path / "out", "7.2")
    fuzzer = atheris_seeds.fuzzer_name(name)
    assert tmp_path / "out" / f"{fuzzer}_seed_corpus.zip" in exported
    corpus = tmp_path / "corpus"
    import zipfile

    with zipfile.ZipFile(tmp_path / "out" / f"{fuzzer}_seed_corpus.zip") as archive:
        archive.extractall(corpus)
    assert len(list(corpus.iterdir())) > 0
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / ".clusterfuzzlite" / f"{fuzzer}.py"),
            "-runs=300",
            f"-dict={tmp_path / 'out' / f'{fuzzer}.dict'}",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # libFuzzer may report more runs than -runs asks for (seen: "Done 310 runs"): at least
    # the 300 asked for ran to the end.
    done = re.search(r"^Done (\d+) runs", result.stderr, re.MULTILINE)
    assert done is not None and int(done.group(1)) >= 300, result.stderr[-2000:]


def test_seeding_a_shared_corpus_adds_only_what_it_lacks(tmp_path: Path) -> None:
    """The corpus directory may be the built-in engine's too (its own file names)."""
    (tmp_path / "0123456789abcdef").write_bytes(b"held")
    assert atheris_campaign.seed_corpus(tmp_path, [b"held", b"new", b"new"]) == 3
    assert sorted(path.read_bytes() for path in tmp_path.iterdir()) == [b"held", b"new"]


def test_the_dictionary_is_in_libfuzzers_format(tmp_path: Path) -> None:
    path = atheris_campaign.write_dictionary(tmp_path / "d.dict", [b"\x00A", b"", b'"'])
    assert path.read_text().splitlines() == ['"\\x00\\x41"', '"\\x22"']
