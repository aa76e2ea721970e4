"""``qmig inspect STREAM [--return-path RP] [--json] [--extract DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qmig.cli import add_json, add_qemu_version

CAPTURE_STREAM = "stream.bin"
CAPTURE_RETURN_PATH = "return-path.bin"
PROGRESS_THRESHOLD = 64 << 20


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="decode a recorded migration stream (and its return path) record by record",
        description="Decode a source-to-destination migration stream, and optionally the "
        "destination-to-source return path of the same migration. STREAM may be a file or "
        "a capture directory written by 'qmig capture'.",
    )
    parser.add_argument("stream", type=Path, metavar="STREAM")
    parser.add_argument("--return-path", type=Path, metavar="RP", help="return-path bytes")
    parser.add_argument(
        "--extract",
        type=Path,
        metavar="DIR",
        help="write each RAMBlock's final contents to DIR/<idstr>.bin and device state "
        "to DIR/devices.json",
    )
    parser.add_argument(
        "--pages", action="store_true", help="list every run of page records, not only totals"
    )
    add_qemu_version(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def _inputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    stream, return_path = args.stream, args.return_path
    if stream.is_dir():
        if return_path is None and (stream / CAPTURE_RETURN_PATH).exists():
            return_path = stream / CAPTURE_RETURN_PATH
        stream = stream / CAPTURE_STREAM
    return stream, return_path


class Listing:
    """The human-readable listing: one line per record, page records summed per section."""

    def __init__(self, show_runs: bool) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.show_runs = show_runs
        self.pages: Counter[str] = Counter()
        self.zeros: Counter[str] = Counter()

    def record(self, record: Any) -> None:
        from qmig.wire import messages as m
        from qmig.wire.render import describe

        message = record.message
        if isinstance(message, m.RamPageRun):
            self.pages[message.block] += message.count
            self.zeros[message.block] += message.zero_count
            if self.show_runs:
                detail = f"{message.block}: {message.count} ({message.zero_count} same-byte)"
                self.line(record, detail)
            return
        if isinstance(message, m.RamEos):
            if self.pages:
                totals = ", ".join(
                    f"{block} {count} ({self.zeros[block]} same-byte)"
                    for block, count in self.pages.items()
                )
                self.line(record, f"page records: {totals}", name="  RAM")
                self.pages.clear()
                self.zeros.clear()
            return
        self.line(record, describe(message))

    def line(self, record: Any, detail: str, name: str | None = None) -> None:
        indent = "  " * record.depth
        label = name or record.name
        self.console.print(
            f"{record.offset:>12}  {indent}[bold]{label:<22}[/bold] {detail}".rstrip()
        )

    def heading(self, text: str) -> None:
        self.console.print(f"\n[bold]{text}[/bold]")

    def summary(self, report: dict[str, Any]) -> None:
        from rich.table import Table

        self.console.print(f"\n{report['bytes']} bytes of stream")
        counts = Table(title="records", show_edge=False)
        counts.add_column("name")
        counts.add_column("count", justify="right")
        for name, count in report["counts"].items():
            counts.add_row(name, str(count))
        self.console.print(counts)
        blocks = Table(title="RAM blocks", show_edge=False)
        for column in ("block", "used length", "page records", "distinct pages", "zero pages"):
            blocks.add_column(column, justify="left" if column == "block" else "right")
        for idstr, figures in report["ram_blocks"].items():
            used = figures["used_length"]
            blocks.add_row(
                idstr,
                "?" if used is None else f"{used:#x}",
                str(figures["page_records"]),
                str(figures["distinct_pages"]),
                str(figures["zero_pages"]),
            )
        self.console.print(blocks)
        if "return_path" in report:
            rp = report["return_path"]
            counts_text = ", ".join(f"{name} {count}" for name, count in rp["counts"].items())
            self.console.print(f"return path: {rp['bytes']} bytes: {counts_text}")


@contextmanager
def _progress(path: Path) -> Iterator[Callable[[int], None] | None]:
    """A transient rich progress bar on stderr for big inputs on a terminal."""
    size = path.stat().st_size
    if not sys.stderr.isatty() or size < PROGRESS_THRESHOLD:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(path.name, total=size)
        yield lambda count: progress.advance(task, count)


def run(args: argparse.Namespace) -> int:
    from qmig.inspect import ReturnPathInspection, StreamInspection, read_records
    from qmig.wire import messages as m
    from qmig.wire.reader import ReturnPathReader, StreamReader
    from qmig.wire.render import to_json

    stream_path, rp_path = _inputs(args)
    listing = None if args.json else Listing(args.pages)
    inspection = StreamInspection(StreamReader(args.qemu_version), args.extract)
    commands: list[dict[str, Any]] = []
    try:
        with stream_path.open("rb") as file, _progress(stream_path) as advance:
            for record in read_records(file, inspection.reader, advance):
                inspection.add(record)
                if isinstance(record.message, m.COMMANDS):
                    commands.append(
                        {
                            "offset": record.offset,
                            "depth": record.depth,
                            "name": record.name,
                            **to_json(record.message),
                        }
                    )
                if listing is not None:
                    listing.record(record)
    finally:
        inspection.close()

    report = inspection.as_json()
    report["stream"] = str(stream_path)
    report["qemu_version"] = inspection.reader.profile.name
    report["commands"] = commands
    if rp_path is not None:
        rp_inspection = ReturnPathInspection()
        messages = []
        if listing is not None:
            listing.heading(f"return path {rp_path}")
        with rp_path.open("rb") as file:
            for record in read_records(file, ReturnPathReader(args.qemu_version)):
                rp_inspection.add(record)
                messages.append(
                    {"offset": record.offset, "name": record.name, **to_json(record.message)}
                )
                if listing is not None:
                    listing.record(record)
        report["return_path"] = {**rp_inspection.as_json(), "messages": messages}
    if listing is not None:
        listing.summary(report)
    else:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0
