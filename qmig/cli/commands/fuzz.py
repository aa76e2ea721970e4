"""``qmig fuzz TARGET``: fuzz a parser or machine, or diff qmig against a real QEMU."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmig.cli import add_json, add_qemu_version
from qmig.cli.options import integer, positive_count, seconds
from qmig.cli.text import plural

if TYPE_CHECKING:
    from rich.console import Console

    from qmig.fuzz.targets import Target

TARGET_NAMES = ("stream", "return-path", "destination", "differential")
ENGINES = ("builtin", "atheris")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "fuzz",
        help="fuzz qmig's parsers and destination, or diff its verdicts with a real QEMU's",
        description="Coverage-guided mutation fuzzing seeded from the real captures in "
        "fixtures/ and from qmig.strategies. Each failure (an exception that is not one of "
        "qmig's errors, a verdict that depends on how the bytes were chunked, a hang, "
        "MemoryError) is minimised and written to OUT as a reproducer file for "
        "'qmig inspect', with one line in OUT/failures.txt. 'differential' sends generated "
        "command sequences to fresh qemu-system-x86_64 -incoming processes and compares "
        "their verdicts with qmig's.",
    )
    parser.add_argument(
        "target", choices=TARGET_NAMES, metavar="TARGET", help=", ".join(TARGET_NAMES)
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--runs",
        type=positive_count,
        metavar="N",
        help="inputs to try (default: 1000 unless --seconds is given)",
    )
    budget.add_argument(
        "--seconds", type=seconds, metavar="SECONDS", help="how long to fuzz (default: --runs)"
    )
    parser.add_argument("--seed", type=integer, default=0, metavar="N", help="random seed")
    parser.add_argument(
        "--corpus",
        type=Path,
        nargs="*",
        default=[],
        metavar="DIR/FILES",
        help="more seed inputs: files, or directories of files (a directory also receives "
        "the inputs that found new coverage) (default: none)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("fuzz-out"),
        metavar="DIR",
        help="where reproducers and failures.txt are written",
    )
    parser.add_argument(
        "--time-limit",
        type=seconds,
        default=2.0,
        metavar="SECONDS",
        help="an input running longer than this is a hang (a finding)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="builtin",
        help="builtin: qmig's own loop, guided by a line tracer; atheris: libFuzzer through "
        "atheris (the 'fuzz' extra), in fork mode with --jobs workers sharing one corpus "
        "directory (the first --corpus DIR, else OUT/corpus-TARGET); each crash-*, timeout-* "
        "or oom-* file it leaves in OUT replays with --replay",
    )
    parser.add_argument(
        "--jobs",
        type=positive_count,
        default=2,
        metavar="N",
        help="differential: how many QEMUs run at once; --engine atheris: how many "
        "libFuzzer workers",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="run these inputs (reproducers) once each through TARGET and print the verdict "
        "(default: fuzz)",
    )
    add_qemu_version(parser, auto=None)
    add_json(parser)
    parser.set_defaults(func=run)


def replay(args: argparse.Namespace) -> int:
    """Each file through the target once: its verdict, or the finding it still triggers."""
    from qmig.fuzz.engine import execute
    from qmig.fuzz.targets import TARGETS

    target = TARGETS[args.target]
    results = []
    for path in args.replay:
        data = (path / "return-path.bin").read_bytes() if path.is_dir() else path.read_bytes()
        outcome = execute(target, data, args.qemu_version, limit=args.time_limit)
        line = (
            f"{outcome.finding.kind}: {outcome.finding.summary}"
            if outcome.finding is not None
            else outcome.verdict.line()
            if outcome.verdict is not None
            else "no verdict"
        )
        results.append({"file": str(path), "finding": outcome.finding is not None, "verdict": line})
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for result in results:
            print(f"{result['file']}: {result['verdict']}")
    return 1 if any(result["finding"] for result in results) else 0


def _corpus_files(paths: list[Path]) -> tuple[list[bytes], Path | None]:
    data: list[bytes] = []
    directory = None
    for path in paths:
        if path.is_dir():
            directory = directory or path
            data += [file.read_bytes() for file in sorted(path.iterdir()) if file.is_file()]
        else:
            data.append(path.read_bytes())
    return data, directory


def seed_inputs(
    target: Target, version: str | None, seed: int, corpus: list[Path]
) -> tuple[list[bytes], Path | None]:
    """What every engine starts from: qmig's seeds, then the --corpus files."""
    from qmig.fuzz.targets import starting_inputs

    inputs = starting_inputs(target, version, seed)
    extra, corpus_dir = _corpus_files(corpus)
    return inputs + extra, corpus_dir


def run_atheris(
    args: argparse.Namespace,
    inputs: list[bytes],
    corpus_dir: Path | None,
    runs: int | None,
    console: Console,
) -> int:
    """The same target, seeds and oracle on libFuzzer (see qmig.fuzz.atheris_campaign)."""
    from qmig.fuzz import atheris_campaign
    from qmig.fuzz import seeds as sd
    from qmig.fuzz.targets import TARGETS
    from qmig.wire.schema import schema_for

    target = TARGETS[args.target]
    version = args.qemu_version
    show = None
    if not args.json and sys.stderr.isatty():

        def show(report: atheris_campaign.AtherisReport) -> None:
            console.print(
                f"fuzz {report.target}: {plural(report.runs, 'run')} in "
                f"{report.seconds:.0f} s ({report.rate:.0f}/s), corpus {report.corpus}, "
                f"{plural(report.edges, 'edge')}",
                end="\r",
            )

    report = atheris_campaign.run(
        target,
        inputs,
        version=version,
        version_name=schema_for(version).profile.name,
        out=args.out,
        corpus=corpus_dir,
        jobs=args.jobs,
        seconds=args.seconds,
        runs=runs if args.seconds is None else None,
        time_limit=args.time_limit,
        seed=args.seed,
        dictionary=sd.dictionary(target.channel, version),
        progress=show,
    )
    return _finish(
        args,
        report,
        console,
        f"{report.target}: {plural(report.runs, 'input')} in {report.seconds:.1f} s "
        f"({report.rate:.0f}/s on {plural(report.jobs, 'worker')}, "
        f"{plural(report.seeds, 'seed')}, corpus {report.corpus}, "
        f"{plural(report.edges, 'edge')}), {plural(len(report.findings), 'finding')}",
    )


def _finish(args: argparse.Namespace, report: Any, console: Console, summary: str) -> int:
    """A campaign's --json document, or its ``summary`` line and one line a finding; the
    exit status says whether there were findings."""
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        console.print(summary)
        for finding in report.findings:
            console.print(f"  {finding.path}: {finding.kind}: {finding.summary}")
    return 1 if report.findings else 0


def run(args: argparse.Namespace) -> int:
    from qmig.cli.versions import default_choice

    args.qemu_version = default_choice(args.qemu_version).version
    if args.replay and args.target != "differential":
        return replay(args)
    if args.target == "differential":
        if args.engine != "builtin":
            from qmig.cli import fail

            return fail(f"--engine {args.engine}: fuzzes stream, return-path and destination")
        from qmig.fuzz.differential import run_cli

        return run_cli(args)
    from rich.console import Console

    from qmig.fuzz import seeds as sd
    from qmig.fuzz.engine import Campaign, CampaignReport
    from qmig.fuzz.targets import TARGETS

    target = TARGETS[args.target]
    version = args.qemu_version
    console = Console(stderr=True, highlight=False)
    inputs, corpus_dir = seed_inputs(target, version, args.seed, args.corpus)
    runs = args.runs if args.runs is not None or args.seconds is not None else 1000
    if args.engine == "atheris":
        return run_atheris(args, inputs, corpus_dir, runs, console)
    campaign = Campaign(
        target,
        inputs,
        version=version,
        seed=args.seed,
        dictionary=sd.dictionary(target.channel, version),
        out=args.out,
        corpus_dir=corpus_dir,
        limit=args.time_limit,
    )
    if args.json or not sys.stderr.isatty():
        report = campaign.run(runs=runs, seconds=args.seconds)
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        total = runs if runs is not None else args.seconds
        with Progress(
            TextColumn(f"fuzz {target.name}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("fuzz", total=total, status="")

            def show(report: CampaignReport) -> None:
                done = report.runs if runs is not None else report.seconds
                bar.update(
                    task,
                    completed=done,
                    status=f"{plural(report.runs, 'run')}, {report.corpus} in corpus, "
                    f"{plural(report.edges, 'edge')}, "
                    f"{plural(len(report.findings), 'finding')}",
                )

            report = campaign.run(runs=runs, seconds=args.seconds, progress=show)
    return _finish(
        args,
        report,
        console,
        f"{report.target}: {plural(report.runs, 'input')} in {report.seconds:.1f} s "
        f"({plural(report.seeds, 'seed')}, corpus {report.corpus}, "
        f"{plural(report.edges, 'edge')}, {report.accepted} accepted, "
        f"{report.rejected} rejected), {plural(len(report.findings), 'finding')}",
    )
