"""A campaign on libFuzzer, through atheris: many worker processes sharing one corpus.

libFuzzer's fork mode (``-fork=N``) runs N workers at once, each for a short job on a
sample of the corpus, and merges what each found into the one corpus directory, so a
campaign uses every core and can resume from (or be shared through) that directory. Crashes,
timeouts and OOMs do not stop it (``-ignore_*``): each leaves a ``crash-*``, ``timeout-*``
or ``oom-*`` file in OUT, which ``qmig fuzz TARGET --replay FILE`` runs again.

The inputs are judged by the built-in engine's oracle (see :mod:`qmig.fuzz.atheris_entry`).
After the run each new artifact is replayed in this process: it becomes a
:class:`~qmig.fuzz.engine.Finding`, minimised and written as the built-in engine writes its
own (a ``qmig inspect`` reproducer and a line in ``OUT/failures.txt``), once per signature.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from qmig.errors import HostSupportError
from qmig.fuzz import atheris_entry as entry
from qmig.fuzz.engine import Finding, execute, minimise, write_reproducer
from qmig.fuzz.targets import Target

RSS_LIMIT_MB = 2048  # libFuzzer's own default; the worker also has the engine's memory bound
ARTIFACT_KINDS = {"crash": "crash", "timeout": "hang", "oom": "memory", "leak": "memory"}
# The fork-mode parent's status line: "#RUNS: cov: C ft: F corp: N exec/s E
# oom/timeout/crash: O/T/C time: Ss job: J dft_time: D".
STATUS = re.compile(
    r"^#(?P<runs>\d+): cov: (?P<cov>\d+) ft: \d+ corp: (?P<corpus>\d+) exec/s:? (?P<rate>\d+) "
    r"oom/timeout/crash: (?P<oom>\d+)/(?P<timeout>\d+)/(?P<crash>\d+)"
)


@dataclass
class AtherisReport:
    target: str
    version: str
    jobs: int
    runs: int = 0
    seconds: float = 0.0
    seeds: int = 0
    corpus: int = 0
    edges: int = 0  # libFuzzer's "cov": instrumented edges reached
    artifacts: list[Path] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    log: Path | None = None

    @property
    def rate(self) -> float:
        return self.runs / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "engine": "atheris",
            "target": self.target,
            "qemu_version": self.version,
            "jobs": self.jobs,
            "runs": self.runs,
            "seconds": round(self.seconds, 2),
            "execs_per_second": round(self.rate, 1),
            "execs_per_second_per_job": round(self.rate / self.jobs, 1),
            "seeds": self.seeds,
            "corpus": self.corpus,
            "edges": self.edges,
            "artifacts": [str(path) for path in self.artifacts],
            "findings": [finding.as_json() for finding in self.findings],
            "log": None if self.log is None else str(self.log),
        }


def available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def seed_corpus(corpus: Path, inputs: Sequence[bytes]) -> int:
    """Write each input that ``corpus`` does not hold yet, named by its SHA-1 as libFuzzer
    names what it adds (a directory shared with the built-in engine names files otherwise)."""
    corpus.mkdir(parents=True, exist_ok=True)
    held = {hashlib.sha1(path.read_bytes()).digest() for path in corpus.iterdir() if path.is_file()}
    for data in inputs:
        digest = hashlib.sha1(data)
        if digest.digest() not in held:
            held.add(digest.digest())
            (corpus / digest.hexdigest()).write_bytes(data)
    return len(inputs)


def write_dictionary(path: Path, words: Sequence[bytes]) -> Path:
    """libFuzzer's ``-dict`` format: one quoted string per line, every byte as ``\\xNN``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ['"' + "".join(f"\\x{byte:02x}" for byte in word) + '"' for word in words if word]
    path.write_text("\n".join(lines) + "\n")
    return path


def command(
    corpus: Path,
    out: Path,
    name: str,
    *,
    jobs: int,
    seconds: float | None,
    runs: int | None,
    time_limit: float,
    seed: int = 0,
    dictionary: Path | None = None,
) -> list[str]:
    """The libFuzzer command line of a campaign."""
    argv = [
        sys.executable,
        "-m",
        entry.__name__,
        f"-fork={jobs}",
        "-ignore_crashes=1",
        "-ignore_timeouts=1",
        "-ignore_ooms=1",
        f"-artifact_prefix={out}/{name}-",
        # The oracle's own CPU-time limit reports a hang first; this wall-clock limit is
        # libFuzzer's backstop for a worker stuck where Python cannot interrupt it.
        f"-timeout={math.ceil(3 * time_limit) + 1}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        "-print_final_stats=1",
    ]
    if seconds is not None:
        argv.append(f"-max_total_time={max(1, math.ceil(seconds))}")
    if runs is not None:
        argv.append(f"-runs={runs}")
    if seed:
        argv.append(f"-seed={seed}")  # 0 is libFuzzer's "pick one"
    if dictionary is not None:
        argv.append(f"-dict={dictionary}")
    argv.append(str(corpus))
    return argv


def run(
    target: Target | str,
    inputs: Sequence[bytes],
    *,
    version: str | None,
    version_name: str,
    out: Path,
    corpus: Path | None = None,
    jobs: int = 1,
    seconds: float | None = None,
    runs: int | None = None,
    time_limit: float = 2.0,
    seed: int = 0,
    dictionary: Sequence[bytes] = (),
    progress: Callable[[AtherisReport], None] | None = None,
) -> AtherisReport:
    """Seed ``corpus``, run libFuzzer on it with ``jobs`` workers, collect the findings.

    ``target`` is a :class:`Target` of :data:`~qmig.fuzz.targets.TARGETS` or a
    ``module:attribute`` reference (which the worker processes import)."""
    if not available():
        raise HostSupportError("atheris", "not installed (pip install 'qmig[fuzz]')")
    name = target if isinstance(target, str) else target.name
    resolved = entry.resolve(name)
    assert isinstance(resolved, Target)
    label = resolved.name
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus if corpus is not None else out / f"corpus-{label}"
    report = AtherisReport(label, version_name, jobs)
    report.seeds = seed_corpus(corpus, inputs)
    words = write_dictionary(out / f"{label}.dict", dictionary) if dictionary else None
    before = set(_artifacts(out, label))
    env = dict(os.environ)
    env[entry.TARGET_ENV] = name
    env[entry.VERSION_ENV] = version or ""
    env[entry.TIME_LIMIT_ENV] = repr(time_limit)
    argv = command(
        corpus,
        out,
        label,
        jobs=jobs,
        seconds=seconds,
        runs=runs,
        time_limit=time_limit,
        seed=seed,
        dictionary=words,
    )
    report.log = out / f"{label}-atheris.log"
    started = time.monotonic()
    with report.log.open("w") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.PIPE, text=True, errors="replace"
        )
        status = _follow(process, log, report, started, progress)
    report.seconds = time.monotonic() - started
    report.artifacts = sorted(set(_artifacts(out, label)) - before)
    # Fork mode ends with -error_exitcode when a worker crashed; without an artifact, the
    # fuzzer itself failed (a target that does not import, a bad flag).
    if status != 0 and not report.artifacts:
        raise HostSupportError(
            "atheris", f"libFuzzer exited with status {status}: {_last(report.log)}"
        )
    report.corpus = sum(1 for path in corpus.iterdir() if path.is_file())
    report.findings = _findings(resolved, report.artifacts, version, out, time_limit)
    return report


def _follow(
    process: subprocess.Popen[str],
    log: IO[str],
    report: AtherisReport,
    started: float,
    progress: Callable[[AtherisReport], None] | None,
) -> int:
    """Copy libFuzzer's output into the log, keeping its latest figures in ``report``."""
    assert process.stderr is not None
    for line in process.stderr:
        log.write(line)
        match = STATUS.match(line)
        if match is None:
            continue
        report.runs = int(match["runs"])
        report.corpus = int(match["corpus"])
        report.edges = max(report.edges, int(match["cov"]))
        report.seconds = time.monotonic() - started
        if progress is not None:
            progress(report)
    log.flush()
    return process.wait()


def _last(log: Path) -> str:
    """The last line libFuzzer or the worker printed (the exception, for a broken target)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return f"{lines[-1] if lines else 'no output'} (log: {log})"


def _artifacts(out: Path, label: str) -> list[Path]:
    return [
        path for kind in ARTIFACT_KINDS for path in out.glob(f"{label}-{kind}-*") if path.is_file()
    ]


def _findings(
    target: Target, artifacts: Sequence[Path], version: str | None, out: Path, limit: float
) -> list[Finding]:
    """Each artifact replayed here; one minimised reproducer per distinct signature."""
    seen: set[str] = set()
    findings: list[Finding] = []
    for path in artifacts:
        data = path.read_bytes()
        found = execute(target, data, version, limit=limit).finding
        if found is None:
            # Not reproduced in one process (a worker's timeout or RSS on a busy machine):
            # still reported, from the file's kind, unminimised.
            kind = ARTIFACT_KINDS[path.name[len(target.name) + 1 :].split("-")[0]]
            found = Finding(kind, f"libFuzzer {kind}", f"{path.name}: not reproduced", data)
            found.path = path
            findings.append(found)
            continue
        if found.signature in seen:
            continue
        seen.add(found.signature)
        signature = found.signature

        def still_fails(candidate: bytes, signature: str = signature) -> bool:
            again = execute(target, candidate, version, limit=limit).finding
            return again is not None and again.signature == signature

        small = minimise(data, still_fails)
        final = execute(target, small, version, limit=limit).finding or found
        final.data = small
        final.path = write_reproducer(out, target, final, version)
        findings.append(final)
    return findings
