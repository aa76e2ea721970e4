"""``qmig replay CAPTURE --connect tcp:HOST:PORT``: a recorded migration, into a real QEMU."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmig.cli import add_json, add_qemu_version
from qmig.cli.multifd_source_options import add_multifd_source
from qmig.cli.options import (
    add_alias,
    add_bandwidth,
    add_fast_answer,
    count,
    positive_count,
    seconds,
)
from qmig.cli.preempt_options import add_preempt
from qmig.cli.text import plural
from qmig.report.cli import add_report, check_report
from qmig.runner.misbehave_options import add_source_knobs, source_misbehaviour
from qmig.runner.pauses import pause_rows
from qmig.sizes import format_size

if TYPE_CHECKING:
    from rich.console import Console

    from qmig.cli.versions import Choice

MIB = 1 << 20
PROGRESS_SECONDS = 0.2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="replay a recorded migration into a real QEMU destination",
        description="Rebuild the guest RAM as at switchover and the device state from CAPTURE "
        "(a folder written by 'qmig capture', a raw source-to-destination stream file, or a "
        "libvirt save image), "
        "then migrate them into a QEMU started with -incoming and the same machine type and "
        "memory size, serving its page requests in postcopy.",
    )
    parser.add_argument(
        "capture",
        type=Path,
        metavar="CAPTURE",
        help="a capture folder, a stream file or a libvirt save image",
    )
    peer = parser.add_argument(
        "--connect",
        required=True,
        metavar="URI",
        help="the destination QEMU's -incoming URI, e.g. tcp:127.0.0.1:4445",
    )
    add_alias(parser, "--to", peer)
    parser.add_argument(
        "--postcopy-after",
        type=count,
        metavar="N",
        help="precopy passes before switching to postcopy (0: right after setup); default: "
        "where the captured source switched, and a precopy capture stays precopy",
    )
    add_bandwidth(parser)
    add_preempt(parser)
    add_fast_answer(parser)
    add_multifd_source(parser)
    recovery = parser.add_argument_group("postcopy recovery")
    recovery.add_argument(
        "--pause-after",
        type=positive_count,
        metavar="PAGES",
        help="cut the channel after PAGES postcopy pages; the destination pauses "
        "(postcopy-paused) and the replay resumes on --resume-to (default: never)",
    )
    recovery.add_argument(
        "--resume-to",
        metavar="URI",
        help="where the paused destination listens once told 'migrate-recover URI'; the "
        "replay connects there, with retries, and resumes (default: none, a cut fails)",
    )
    recovery.add_argument(
        "--resume-timeout",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long to keep trying to resume",
    )
    recovery.add_argument(
        "--pause-during-recovery",
        action="store_true",
        help="also cut the first recovery's new channel during its handshake (default: off)",
    )
    add_source_knobs(parser)
    add_qemu_version(parser, auto="detect it from the capture's stream")
    add_report(parser, "the replay")
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qmig.capture.recording import open_capture_file
    from qmig.cli.versions import add_hint, hint_from_file
    from qmig.errors import QmigError
    from qmig.libvirt.detect import is_save_image
    from qmig.libvirt.image import read_image
    from qmig.libvirt.streams import relocate
    from qmig.replay import ReplayPlan, load_recording, replay
    from qmig.replay.recording import stream_path

    check_report(args)
    if args.pause_after is not None and args.resume_to is None:
        raise QmigError("--pause-after", "needs --resume-to (where the destination recovers)")
    if args.pause_during_recovery and args.pause_after is None:
        raise QmigError("--pause-during-recovery", "needs --pause-after")
    choice = recorded_version(args)
    try:
        recording = load_recording(args.capture, choice.version)
    except QmigError as error:
        path = stream_path(args.capture)
        if is_save_image(path):
            raise relocate(error, read_image(path)) from None
        raise add_hint(
            error, hint_from_file(error, choice.version, lambda: open_capture_file(path))
        ) from None
    try:
        plan = ReplayPlan(
            postcopy_after=args.postcopy_after,
            bandwidth=None if args.bandwidth is None else args.bandwidth * MIB,
            version=choice.version,
            pause_after=args.pause_after,
            resume_to=args.resume_to,
            resume_timeout=args.resume_timeout,
            pause_during_recovery=args.pause_during_recovery,
            preempt=args.preempt,
            preempt_variant=args.preempt_variant,
            multifd=args.multifd,
            zero_page_detection=args.zero_page_detection,
            uuid=args.uuid,
            fast_answer=not args.no_fast_answer,
            fast_sweep=not args.no_fast_sweep,
        )
        misbehaviour = source_misbehaviour(args, choice.version)
        progress = None if args.json else _Progress()
        recorder = None
        if args.report is not None:
            from qmig.report.recorder import Recorder

            recorder = Recorder()
        try:
            result = replay(
                recording,
                args.connect,
                plan,
                on_progress=None if progress is None else progress.update,
                recorder=recorder,
                misbehave=None if misbehaviour is None else misbehaviour.wrap,
            )
        finally:
            if progress is not None:
                progress.close()
        summary = {
            **result.summary(),
            "qemu_version": choice.version,
            "qemu_version_evidence": choice.evidence,
        }
        if is_save_image(recording.path):
            summary["libvirt"] = read_image(recording.path).as_json()
    finally:
        recording.close()
    if recorder is not None:
        _write_report(args, summary, recorder, result.report)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_summary(summary)
    return 0


def _write_report(
    args: argparse.Namespace, summary: dict[str, Any], recorder: Any, report: Any
) -> None:
    from qmig.report import builders
    from qmig.report.cli import write
    from qmig.report.document import printed

    summary = {**summary, "to": args.connect}
    text = printed(lambda console: _print_summary(summary, console))
    write(args, builders.replay(summary, recorder, report, text))


def recorded_version(args: argparse.Namespace) -> Choice:
    """The profile the capture is read and replayed with: as given, or its stream's."""
    from qmig.capture.recording import open_capture_file
    from qmig.cli.versions import choose, read_prefix
    from qmig.replay.recording import stream_path

    def prefix() -> tuple[bytes, bool]:
        from qmig.libvirt.detect import is_save_image
        from qmig.libvirt.streams import open_save_image
        from qmig.wire.detect import PREFIX_BYTES

        path = stream_path(args.capture)
        opened = open_save_image(path) if is_save_image(path) else open_capture_file(path)
        with opened as file:
            data = read_prefix(file)
        return data, len(data) < PREFIX_BYTES

    return choose(args.qemu_version, prefix)


class _Progress:
    """Bytes sent per phase on stderr, while the replay runs (only on a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.sent: dict[str, int] = {}
        self.shown = 0.0
        self.status = self.console.status("connecting") if self.console.is_terminal else None
        if self.status is not None:
            self.status.start()

    def update(self, phase: str, count: int) -> None:
        self.sent[phase] = self.sent.get(phase, 0) + count
        now = time.monotonic()
        if self.status is None or now - self.shown < PROGRESS_SECONDS:
            return
        self.shown = now
        parts = ", ".join(f"{name} {format_size(value)}" for name, value in self.sent.items())
        self.status.update(f"replaying ({phase}): {parts}")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


def _print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"replayed a {summary['mode']} migration ({summary['machine_type']}, "
        f"{summary['ram_mib']:g} MiB) in {summary['total_s']} s"
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("QEMU wire", f"{summary['qemu_version']} ({summary['qemu_version_evidence']})")
    table.add_row("devices", str(summary["devices"]))
    table.add_row("precopy passes", str(summary["passes"]))
    for phase in ("precopy", "postcopy"):
        table.add_row(
            phase,
            f"{plural(summary[f'{phase}_pages'], 'page')}, "
            f"{format_size(summary[f'{phase}_bytes'])}",
        )
    table.add_row(
        "discards",
        f"{plural(summary['discarded_pages'], 'page')} in "
        f"{plural(summary['discard_commands'], 'command')}",
    )
    table.add_row("page requests", f"{summary['requests']:,}")
    latency = summary["request_to_sent_us"]
    table.add_row(
        "request → page sent (µs)",
        f"p50 {latency['p50']}  p99 {latency['p99']}  max {latency['max']}",
    )
    for name, value in pause_rows(summary.get("pauses") or [], "sent"):
        table.add_row(name, value)
    if summary.get("preempt") is not None:
        pages = summary["preempt_pages"]
        table.add_row(
            "preempt", f"{summary['preempt']} variant: pages main {pages['main']:,}, "
            f"preempt {pages['preempt']:,}"
        )  # fmt: skip
    multifd = summary.get("multifd")
    if multifd is not None:
        table.add_row(
            "multifd",
            f"{multifd['channels']} channels, {multifd['packets']:,} packets, "
            f"{multifd['syncs']:,} syncs; zero pages {multifd['zero_page_detection']}",
        )
        pages = ", ".join(f"{count:,}" for count in multifd["pages_per_channel"])
        table.add_row("pages per channel", pages)
    out = console or Console()
    out.print(table)
    if "libvirt" in summary and summary["mode"] == "precopy":
        # libvirt stops the vCPUs before it saves: the stream's run state is paused, and its
        # restore resumes the guest only afterwards, when the header's was_running says so.
        # (A postcopy destination runs from POSTCOPY_RUN on, whatever the saved state.)
        ran = "was" if summary["libvirt"]["was_running"] else "was not"
        out.print(
            f"libvirt save image: the guest {ran} running when saved; the destination stays "
            "paused until 'cont', as libvirt's restore does"
        )
