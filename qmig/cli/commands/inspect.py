"""``qmig inspect STREAM [--return-path RP] [--json] [--extract DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from qmig.cli import add_json, add_qemu_version
from qmig.inspect import ReturnPathInspection, StreamInspection, read_records
from qmig.wire import messages as m
from qmig.wire.reader import Record, ReturnPathReader, StreamReader
from qmig.wire.render import describe, to_json

CAPTURE_STREAM = "stream.bin"
CAPTURE_RETURN_PATH = "return-path.bin"


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


def run(args: argparse.Namespace) -> int:
    stream_path, rp_path = _inputs(args)
    console = Console(highlight=False, soft_wrap=True)
    listing = not args.json
    inspection = StreamInspection(StreamReader(args.qemu_version), args.extract)
    commands: list[dict[str, Any]] = []
    section_pages: Counter[str] = Counter()
    section_zeros: Counter[str] = Counter()
    try:
        with stream_path.open("rb") as file, _progress(stream_path) as advance:
            for record in read_records(file, inspection.reader, advance):
                inspection.add(record)
                message = record.message
                if isinstance(message, m.RamPageRun):
                    section_pages[message.block] += message.count
                    section_zeros[message.block] += message.zero_count
                    if listing and args.pages:
                        _line(
                            console,
                            record,
                            f"{message.block}: {message.count} page records "
                            f"({message.zero_count} same-byte)",
                        )
                    continue
                if isinstance(message, m.COMMANDS):
                    commands.append(
                        {
                            "offset": record.offset,
                            "depth": record.depth,
                            "name": message.NAME,
                            **to_json(message),
                        }
                    )
                if listing:
                    if isinstance(message, m.SectionFooter | m.RamEos) and section_pages:
                        pages = ", ".join(
                            f"{block} {count} ({section_zeros[block]} same-byte)"
                            for block, count in section_pages.items()
                        )
                        _line(console, record, f"page records: {pages}", name="  RAM")
                        section_pages.clear()
                        section_zeros.clear()
                    if not isinstance(message, m.RamEos):
                        _line(console, record, describe(message))
    finally:
        inspection.close()

    rp_inspection = None
    rp_records: list[dict[str, Any]] = []
    if rp_path is not None:
        rp_inspection = ReturnPathInspection()
        if listing:
            console.print(f"\n[bold]return path[/bold] {rp_path}")
        with rp_path.open("rb") as file:
            for record in read_records(file, ReturnPathReader(args.qemu_version)):
                rp_inspection.add(record)
                rp_records.append(
                    {"offset": record.offset, "name": record.name, **to_json(record.message)}
                )
                if listing:
                    _line(console, record, describe(record.message))

    report = inspection.as_json()
    report["stream"] = str(stream_path)
    report["qemu_version"] = inspection.reader.profile.name
    report["commands"] = commands
    if rp_inspection is not None:
        report["return_path"] = {**rp_inspection.as_json(), "messages": rp_records}
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _summary(console, report)
    return 0


def _line(console: Console, record: Record, detail: str, name: str | None = None) -> None:
    indent = "  " * record.depth
    label = name or record.name
    console.print(f"{record.offset:>12}  {indent}[bold]{label:<22}[/bold] {detail}".rstrip())


def _summary(console: Console, report: dict[str, Any]) -> None:
    console.print(f"\n{report['bytes']} bytes of stream")
    counts = Table(title="records", show_edge=False)
    counts.add_column("name")
    counts.add_column("count", justify="right")
    for name, count in report["counts"].items():
        counts.add_row(name, str(count))
    console.print(counts)
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
    console.print(blocks)
    if "return_path" in report:
        rp = report["return_path"]
        counts_text = ", ".join(f"{name} {count}" for name, count in rp["counts"].items())
        console.print(f"return path: {rp['bytes']} bytes: {counts_text}")


class _progress:
    """A transient rich progress bar on stderr for big inputs, a no-op otherwise."""

    def __init__(self, path: Path) -> None:
        size = path.stat().st_size
        self.enabled = sys.stderr.isatty() and size > 64 << 20
        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task(path.name, total=size) if self.enabled else None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        self.progress.start()
        return lambda n: self.progress.advance(self.task, n)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()
