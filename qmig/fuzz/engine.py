"""The fuzzing loop: run, keep what finds new coverage, minimise and write what fails.

One campaign fuzzes one target. Every input runs under a time limit (an interval timer
interrupts a run that takes too long: a hang) and a memory bound (the address-space limit is
lowered for the campaign, so an allocation sized by a hostile length field fails with
MemoryError instead of taking the machine). A finding is anything but a verdict: an
exception other than :class:`~qmig.errors.QmigError`, an oracle's assertion, a hang or
MemoryError. Each distinct finding (by exception type and the innermost qmig frame) is
minimised by delta debugging and written as a reproducer file plus one summary line.

A verdict can be a finding too, by what it cost (:class:`Budgets`, the resource oracle): an
input that made the process's peak memory grow by more than the memory budget (the
kernel's high-water mark, reset before each run), or whose untraced run took longer than
the time budget, is reported like a crash, as ``memory`` or ``slow``: a stream of a few
bytes must not cost what its claims say. Memory findings are minimised; slow ones are not
(every attempt would take the budget's time).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import random
import resource
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmig.fuzz.coverage import Coverage
from qmig.fuzz.mutate import Mutator
from qmig.fuzz.targets import OracleError, Target, Verdict
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

TIME_LIMIT = 2.0  # seconds per input (the slowest real input runs in milliseconds)
MEMORY_BOUND = 1 << 30  # address space a campaign may add (bytes)
MINIMISE_SECONDS = 20.0
MAX_CORPUS = 4096
MEMORY_BUDGET = 64 << 20  # peak memory one input may add (bytes): ~8x the largest record
TIME_BUDGET = 1.0  # wall seconds one untraced run may take (real inputs: milliseconds)


@dataclass(frozen=True)
class Budgets:
    """What one input may cost before it is a finding; None: not checked."""

    memory: int | None = MEMORY_BUDGET
    seconds: float | None = TIME_BUDGET


NO_BUDGETS = Budgets(None, None)


class Hang(BaseException):
    """Raised by the interval timer inside a run that exceeded its time limit.

    A BaseException, so that no ``except Exception`` in the code under test swallows it."""


@dataclass
class Finding:
    kind: str  # crash | oracle | hang | memory | slow
    signature: str
    summary: str  # one line
    data: bytes = field(repr=False)
    path: Path | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "signature": self.signature,
            "summary": self.summary,
            "size": len(self.data),
            "reproducer": None if self.path is None else str(self.path),
        }


@dataclass
class CampaignReport:
    target: str
    version: str
    seed: int
    runs: int = 0
    seconds: float = 0.0
    seeds: int = 0
    corpus: int = 0
    edges: int = 0
    rejected: int = 0
    accepted: int = 0
    findings: list[Finding] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "qemu_version": self.version,
            "seed": self.seed,
            "runs": self.runs,
            "seconds": round(self.seconds, 2),
            "seeds": self.seeds,
            "corpus": self.corpus,
            "edges": self.edges,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "findings": [finding.as_json() for finding in self.findings],
        }


@dataclass
class Outcome:
    verdict: Verdict | None
    finding: Finding | None
    new_edges: int = 0


# --- running one input, guarded ------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in this (main) thread after ``seconds`` of CPU time; a no-op
    elsewhere. CPU time, not wall time: on a busy machine a slow run is not a hang, and a
    loop that never ends burns CPU time like any other."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise Hang()

    previous = signal.signal(signal.SIGPROF, expire)
    # Repeating: a Hang raised where Python ignores exceptions (a gc callback, a __del__)
    # is raised again 50 ms later, until the run really stops.
    signal.setitimer(signal.ITIMER_PROF, seconds, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


@contextlib.contextmanager
def memory_bound(extra: int) -> Iterator[None]:
    """Lower the address-space limit to what the process uses now plus ``extra`` bytes."""
    try:
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[0]) * resource.getpagesize()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        yield
        return
    wanted = used + extra
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft <= wanted:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# glibc's mallopt(M_MMAP_THRESHOLD): allocations from this size on get fresh pages of their own.
_M_MMAP_THRESHOLD = -3
_FRESH_FROM = 256 << 10


@functools.cache
def _fresh_large_allocations() -> None:
    """Make every large allocation a fresh mapping, returned to the kernel when freed.

    glibc raises its mmap threshold as large blocks are freed, up to 32 MiB, and then serves
    them from heap memory an earlier input already made resident: writing there raises no
    high-water mark, so a long campaign (or a test suite) stops seeing the memory an input
    costs. A fixed threshold keeps each input's large buffers visible to :class:`PeakMemory`.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _FRESH_FROM)


class PeakMemory:
    """How much a block of code raised this process's resident memory at its peak.

    Linux keeps a high-water mark of resident memory (VmHWM) and resets it to the current
    size when ``5`` is written to /proc/self/clear_refs; where that is refused, the growth
    seen is only what went past the process's earlier peak (never more than the truth)."""

    def __enter__(self) -> PeakMemory:
        _fresh_large_allocations()
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            reset = True
        except OSError:
            reset = False
        before = _status_kib("VmRSS")
        self.floor = before if reset else max(before, _status_kib("VmHWM"))
        self.growth = 0  # bytes
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = max(0, _status_kib("VmHWM") - self.floor) * 1024


def _status_kib(field_name: str) -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def signature(error: BaseException) -> str:
    """What makes two failures the same bug: the exception type and the innermost qmig frame."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if "/qmig/" in frame.filename and "/qmig/fuzz/" not in frame.filename
    ]
    where = ""
    if frames:
        last = frames[-1]
        where = f" {Path(last.filename).name}:{last.lineno}"
    if isinstance(error, OracleError):
        # The oracle's message says what went wrong; its first words name the kind.
        return f"OracleError {' '.join(str(error).split()[:4])}"
    return f"{type(error).__name__}{where}"


def execute(
    target: Target,
    data: bytes,
    version: str | None,
    *,
    limit: float = TIME_LIMIT,
    coverage: Coverage | None = None,
    budgets: Budgets = Budgets(),
) -> Outcome:
    """Run one input under the time limit; a finding instead of a verdict if it fails, or
    if it cost more than ``budgets`` allow."""
    try:
        with time_limit(limit), PeakMemory() as memory:
            started = time.monotonic()
            if coverage is None:
                outcome = Outcome(target.check(data, version), None)
            else:
                verdict, new = coverage.run(target.check, data, version)
                outcome = Outcome(verdict, None, new)
            took = time.monotonic() - started
    except Hang:
        if coverage is not None:
            # Tracing slows a run several times over: only an untraced run that also takes
            # too long (with room for a busy machine) is a hang.
            again = execute(target, data, version, limit=3 * limit, budgets=NO_BUDGETS)
            if again.finding is None or again.finding.kind != "hang":
                return again
        return Outcome(
            None, Finding("hang", "hang", f"no verdict within {limit:g} s of CPU time", data)
        )
    except MemoryError:
        return Outcome(None, Finding("memory", "MemoryError", "MemoryError", data))
    except OracleError as error:
        return Outcome(None, Finding("oracle", signature(error), str(error), data))
    except Exception as error:  # the point: anything that is not a QmigError is a bug
        detail = str(error).splitlines()[0] if str(error) else ""
        summary = f"{signature(error)}: {type(error).__name__}: {detail}"
        return Outcome(None, Finding("crash", signature(error), summary, data))
    return _within_budgets(outcome, memory.growth, took, target, data, version, limit, budgets)


def _within_budgets(
    outcome: Outcome,
    growth: int,
    took: float,
    target: Target,
    data: bytes,
    version: str | None,
    limit: float,
    budgets: Budgets,
) -> Outcome:
    """The resource oracle: the verdict, or a finding if the run cost too much."""
    verdict = outcome.verdict
    assert verdict is not None
    how = verdict.what or "accepted"
    if budgets.memory is not None and growth > budgets.memory:
        summary = (
            f"peak memory grew by {growth >> 20} MiB, over the {budgets.memory >> 20} MiB "
            f"budget: {verdict.line()}"
        )
        return Outcome(None, Finding("memory", f"memory {how}", summary, data))
    if budgets.seconds is not None and took > budgets.seconds:
        # Coverage tracing slows a run several times over: time an untraced run.
        again = time.monotonic()
        rerun = execute(target, data, version, limit=limit, budgets=NO_BUDGETS)
        took = time.monotonic() - again
        if rerun.finding is not None:
            return rerun
        if took > budgets.seconds:
            summary = f"took {took:.2f} s, over the {budgets.seconds:g} s budget: {verdict.line()}"
            return Outcome(None, Finding("slow", f"slow {how}", summary, data))
    return outcome


# --- minimising --------------------------------------------------------------------------


def minimise(
    data: bytes, still_fails: Callable[[bytes], bool], seconds: float = MINIMISE_SECONDS
) -> bytes:
    """Delta debugging (ddmin over byte chunks), within ``seconds``."""
    deadline = time.monotonic() + seconds
    parts = 2
    while len(data) >= 2 and time.monotonic() < deadline:
        size = -(-len(data) // parts)
        for start in range(0, len(data), size):
            candidate = data[:start] + data[start + size :]
            if time.monotonic() >= deadline:
                return data
            if still_fails(candidate):
                data = candidate
                parts = max(parts - 1, 2)
                break
        else:
            if size == 1:
                break
            parts = min(len(data), parts * 2)
    # Then simpler bytes: zero what need not be what it is.
    for at in range(len(data)):
        if time.monotonic() >= deadline:
            break
        if data[at]:
            candidate = data[:at] + b"\x00" + data[at + 1 :]
            if still_fails(candidate):
                data = candidate
    return data


# --- reproducers ---------------------------------------------------------------------------


def minimal_stream(version: str | None) -> bytes:
    """The smallest stream ``qmig inspect`` reads cleanly (beside a return-path reproducer)."""
    schema = schema_for(version)
    return schema.build_opening(m.Configuration("pc-i440fx-7.2")) + bytes(schema.eof.build(m.Eof()))


def write_reproducer(out: Path, target: Target, finding: Finding, version: str | None) -> Path:
    """``OUT/TARGET-HASH.bin`` (a stream: ``qmig inspect FILE``), or for the return path a
    capture folder ``OUT/TARGET-HASH/`` (``qmig inspect DIR`` reads both files)."""
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(finding.signature.encode() + finding.data).hexdigest()[:12]
    name = f"{target.name}-{digest}"
    if target.channel == "return_path":
        folder = out / name
        folder.mkdir(exist_ok=True)
        (folder / "stream.bin").write_bytes(minimal_stream(version))
        (folder / "return-path.bin").write_bytes(finding.data)
        path = folder
    else:
        path = out / f"{name}.bin"
        path.write_bytes(finding.data)
    with (out / "failures.txt").open("a") as summary:
        summary.write(f"{path.name}\t{target.name}\t{finding.kind}\t{finding.summary}\n")
    return path


# --- the campaign ------------------------------------------------------------------------


class Campaign:
    def __init__(
        self,
        target: Target,
        seeds: Sequence[bytes],
        *,
        version: str | None,
        seed: int = 0,
        dictionary: Sequence[bytes] = (),
        out: Path | None = None,
        corpus_dir: Path | None = None,
        limit: float = TIME_LIMIT,
        memory: int = MEMORY_BOUND,
        guided: bool = True,
        budgets: Budgets = Budgets(),
        minimise_seconds: float = MINIMISE_SECONDS,
    ) -> None:
        self.target = target
        self.minimise_seconds = minimise_seconds
        self.version = version
        self.rng = random.Random(seed)
        self.mutator = Mutator(self.rng, dictionary, target.channel)
        self.corpus: list[bytes] = [bytes(s) for s in seeds]
        self.recent: list[int] = []
        self.out = out
        self.corpus_dir = corpus_dir
        self.limit = limit
        self.memory = memory
        self.budgets = budgets
        self.coverage = Coverage() if guided else None
        self.report = CampaignReport(target.name, schema_for(version).profile.name, seed)
        self.report.seeds = len(self.corpus)
        self._seen: set[str] = set()

    def run(
        self,
        runs: int | None = None,
        seconds: float | None = None,
        progress: Callable[[CampaignReport], None] | None = None,
    ) -> CampaignReport:
        started = time.monotonic()
        deadline = None if seconds is None else started + seconds
        pending = list(self.corpus)  # seeds run first, as they are
        self.corpus = []
        with memory_bound(self.memory):
            while True:
                if runs is not None and self.report.runs >= runs:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if pending:
                    data = pending.pop(0)
                    keep = True
                else:
                    data = self._next_input()
                    keep = False
                self._one(data, keep)
                self.report.seconds = time.monotonic() - started
                if progress is not None and (self.report.runs % 25 == 0 or not pending):
                    progress(self.report)
        self.report.seconds = time.monotonic() - started
        self.report.corpus = len(self.corpus)
        self.report.edges = 0 if self.coverage is None else len(self.coverage.edges)
        return self.report

    def _next_input(self) -> bytes:
        if not self.corpus:
            return self.rng.randbytes(self.rng.randint(0, 64))
        if self.recent and self.rng.random() < 0.5:
            parent = self.corpus[self.rng.choice(self.recent[-64:])]
        else:
            parent = self.rng.choice(self.corpus)
        return self.mutator.mutate(parent, self.corpus)

    def _one(self, data: bytes, keep: bool) -> None:
        outcome = execute(
            self.target, data, self.version, limit=self.limit, coverage=self.coverage,
            budgets=self.budgets,
        )  # fmt: skip
        self.report.runs += 1
        if self.coverage is not None:
            self.report.edges = len(self.coverage.edges)
        if outcome.finding is not None:
            self._found(outcome.finding)
            return
        assert outcome.verdict is not None
        if outcome.verdict.accepted:
            self.report.accepted += 1
        else:
            self.report.rejected += 1
        if (keep or outcome.new_edges) and len(self.corpus) < MAX_CORPUS:
            self.corpus.append(data)
            if not keep:
                self.recent.append(len(self.corpus) - 1)
                self._save_to_corpus(data)
        self.report.corpus = len(self.corpus)

    def _save_to_corpus(self, data: bytes) -> None:
        if self.corpus_dir is None:
            return
        self.corpus_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(data).hexdigest()[:16]
        (self.corpus_dir / name).write_bytes(data)

    def _found(self, finding: Finding) -> None:
        if finding.signature in self._seen:
            return
        self._seen.add(finding.signature)

        def run(candidate: bytes) -> Outcome:
            return execute(
                self.target, candidate, self.version, limit=self.limit, budgets=self.budgets
            )

        def still_fails(candidate: bytes) -> bool:
            again = run(candidate)
            return again.finding is not None and again.finding.signature == finding.signature

        cheap = finding.kind != "slow"  # each attempt at a slow one takes its budget's time
        small = (
            minimise(finding.data, still_fails, self.minimise_seconds) if cheap else finding.data
        )
        final = (run(small).finding if cheap else None) or finding
        final.data = small
        if self.out is not None:
            final.path = write_reproducer(self.out, self.target, final, self.version)
        self.report.findings.append(final)
