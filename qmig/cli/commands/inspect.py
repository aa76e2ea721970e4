"""``qmig inspect STREAM [--return-path RP] [--json] [--dump-ram DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from qmig.cli import add_json, add_qemu_version
from qmig.cli.options import add_alias, seconds
from qmig.cli.text import plural
from qmig.errors import QmigError
from qmig.report.cli import add_report, check_report

if TYPE_CHECKING:
    from qmig.capture.recording import Direction
    from qmig.inspect import Timeline
    from qmig.wire.reader import Record

CAPTURE_STREAM = "stream.bin"
CAPTURE_RETURN_PATH = "return-path.bin"
CAPTURE_INDEX = "index.tsv"
ANSWER_INDENT = " " * 48  # under a listing line's name column
PROGRESS_THRESHOLD = 64 << 20


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="decode a recorded migration stream (and its return path) record by record",
        description="Decode a source-to-destination migration stream, and optionally the "
        "destination-to-source return path of the same migration. STREAM may be a file or "
        "a capture directory written by 'qmig capture'.",
    )
    parser.add_argument(
        "stream",
        type=Path,
        metavar="STREAM",
        help="a stream file (.xz too), a libvirt save image (virsh save, managedsave), a "
        "capture folder, a FIFO or a character device",
    )
    parser.add_argument(
        "--return-path",
        type=Path,
        metavar="FILE",
        help="the same migration's return-path bytes (default: a capture folder's own)",
    )
    dump = parser.add_argument(
        "--dump-ram",
        type=Path,
        metavar="DIR",
        help="write each RAMBlock's final contents to DIR/<idstr>.bin and device state "
        "to DIR/devices.json (default: none)",
    )
    add_alias(parser, "--extract", dump)
    parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="for a FIFO or character device: the longest wait for its first byte and "
        "between reads (default: 30; a regular file needs none)",
    )
    parser.add_argument(
        "--pages", action="store_true", help="list every run of page records, not only totals"
    )
    add_report(parser, "a capture folder's migration")
    add_qemu_version(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def _inputs(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None]:
    """(stream, return path, capture index): a capture directory names all three, each
    possibly xz-compressed (as the shipped fixtures are)."""
    stream, return_path = args.stream, args.return_path
    index = None
    if stream.is_dir():
        from qmig.capture.recording import capture_file

        folder = stream
        found = capture_file(folder, CAPTURE_STREAM)
        if found is None:
            raise QmigError(str(folder), f"not a capture folder: no {CAPTURE_STREAM}")
        stream = found
        if return_path is None:
            return_path = capture_file(folder, CAPTURE_RETURN_PATH)
        index_file = capture_file(folder, CAPTURE_INDEX)
        if index_file is not None and return_path is not None and return_path.parent == folder:
            index = index_file
    return stream, return_path, index


class Listing:
    """The human-readable listing: one line per record, page records summed per section."""

    def __init__(self, show_runs: bool, timed: Timed | None = None) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.show_runs = show_runs
        self.timed = timed
        self.pages: Counter[str] = Counter()
        self.zeros: Counter[str] = Counter()

    def record(self, record: Any) -> None:
        from qmig.wire import messages as m
        from qmig.wire.render import describe

        message = record.message
        if self.timed is not None:
            # Return-path messages that reached the relay before this record go first.
            self.timed.before(self, record)
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

    def line(
        self, record: Any, detail: str, name: str | None = None, where: str | None = None
    ) -> None:
        indent = "  " * record.depth
        label = name or record.name
        prefix = ""
        if self.timed is not None:
            where = where or "stream"
            t_ns = self.timed.stream.arrival(record.offset, record.size)
            if where == "preempt" and self.timed.preempt is not None:
                t_ns = self.timed.preempt.arrival(record.offset, record.size)
            elif where != "stream":
                t_ns = self.timed.return_path.arrival(record.offset, record.size)
            prefix = f"{t_ns / 1e6:>11.3f} ms  {where:<11} "
        self.console.print(
            f"{prefix}{record.offset:>12}  {indent}[bold]{label:<22}[/bold] {detail}".rstrip()
        )

    def heading(self, text: str) -> None:
        self.console.print(f"\n[bold]{text}[/bold]")

    def summary(self, report: dict[str, Any]) -> None:
        from rich.table import Table

        self.console.print(f"\n{plural(report['bytes'], 'byte')} of stream")
        self.console.print(
            f"QEMU {report['qemu_version']} wire ({report['qemu_version_evidence']})"
        )
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
            self.console.print(f"return path: {plural(rp['bytes'], 'byte')}: {counts_text}")
        if "request_latency_us" in report:
            figures = report["request_latency_us"]
            self.console.print(
                f"page requests: {figures['count']}: answered {figures['answered']}, "
                f"already in flight {figures['in_flight']}, unanswered "
                f"{figures['unanswered']}; latency at the relay p50 {figures['p50']} µs, "
                f"p99 {figures['p99']} µs, max {figures['max']} µs"
            )


class Timed:
    """The return path merged into a capture's listing by time, requests with their answers."""

    def __init__(
        self, stream: Timeline, return_path: Timeline, records: list[Record], answers: Any
    ) -> None:
        self.stream = stream
        self.return_path = return_path
        self.records = records
        self.answers = answers  # return-path offset -> PageRequest
        self._next = 0
        # Postcopy-preempt's channel, merged in by time as the return path is.
        self.preempt: Timeline | None = None
        self.preempt_records: list[Record] = []
        self._next_preempt = 0

    def before(self, listing: Listing, record: Record | None) -> None:
        """List the return-path (and preempt) records that arrived before ``record`` (None:
        all the rest), in the order they reached the relay."""
        limit = None if record is None else self.stream.arrival(record.offset, record.size)
        while True:
            rp_t = pre_t = None
            if self._next < len(self.records):
                pending = self.records[self._next]
                rp_t = self.return_path.arrival(pending.offset, pending.size)
            if self.preempt is not None and self._next_preempt < len(self.preempt_records):
                early = self.preempt_records[self._next_preempt]
                pre_t = self.preempt.arrival(early.offset, early.size)
            if pre_t is not None and (rp_t is None or pre_t < rp_t):
                if limit is not None and pre_t > limit:
                    return
                self._next_preempt += 1
                self._show_preempt(listing, self.preempt_records[self._next_preempt - 1])
                continue
            if rp_t is None or (limit is not None and rp_t > limit):
                return
            self._next += 1
            self._show(listing, self.records[self._next - 1])

    def _show_preempt(self, listing: Listing, record: Record) -> None:
        from qmig.wire import messages as m
        from qmig.wire.render import describe

        message = record.message
        if isinstance(message, m.RamPageRun):
            detail = f"{message.block}: {message.count} ({message.zero_count} same-byte)"
        else:
            detail = describe(message)
        listing.line(record, detail, where="preempt")

    def _show(self, listing: Listing, record: Record) -> None:
        from qmig.wire.render import describe

        listing.line(record, describe(record.message), where="return-path")
        request = self.answers.get(record.offset)
        if request is None:
            return
        channel = request.answered_on
        if request.answered_at_byte is None:
            detail = "not answered in the stream"
        elif request.in_flight:
            detail = (
                f"answered by the RAM record at stream byte {request.answered_at_byte}, "
                f"already in flight {-request.latency_us} µs before"
            )
        else:
            detail = (
                f"answered by the RAM record at {channel} byte {request.answered_at_byte}, "
                f"{request.latency_us} µs later"
            )
        listing.console.print(f"{ANSWER_INDENT}-> {detail}")


@contextmanager
def _progress(path: Path, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A transient rich progress bar on stderr for big inputs on a terminal, unless
    ``quiet`` (--json). An xz file's bar has no end: its bytes are counted decompressed."""
    size = path.stat().st_size
    if quiet or not sys.stderr.isatty() or size < PROGRESS_THRESHOLD:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress

    from qmig.cli.text import transfer_columns

    columns = ("{task.description}", BarColumn(), *transfer_columns())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(path.name, total=None if path.suffix == ".xz" else size)
        yield lambda count: progress.advance(task, count)


class StreamSource:
    """The stream, opened once per pass; its first bytes read once, to detect its version.

    A FIFO or character device can be read only once: its detected prefix is handed back
    in front of the rest (:class:`qmig.cli.versions.Prefixed`), and a command that needs
    two passes first copies it to a temporary file (:meth:`keep`).
    """

    def __init__(self, path: Path, timeout: float | None) -> None:
        self.path = path
        self.timeout = timeout
        self.version: str | None = None  # the profile it is read with
        self.rereadable = path.is_file()
        self._prefix: bytes | None = None
        self._pending: BinaryIO | None = None  # a live stream, its prefix already read
        self._kept: Any = None  # a live stream's bytes, copied for more passes

    def prefix(self) -> tuple[bytes, bool]:
        """The first bytes, and whether they are the whole stream."""
        from qmig.cli.versions import read_prefix
        from qmig.wire.detect import PREFIX_BYTES

        if self._prefix is None:
            file = _open(self.path, self.timeout)
            self._prefix = read_prefix(file)
            if self.rereadable:
                file.close()
            else:
                self._pending = file
        return self._prefix, len(self._prefix) < PREFIX_BYTES

    def open(self) -> BinaryIO:
        if self._kept is not None:
            # A fresh description of the same file: each pass has its own offset.
            return open(f"/proc/self/fd/{self._kept.fileno()}", "rb")
        if self.rereadable:
            return _open(self.path, self.timeout)
        if self._prefix is None:
            self.prefix()  # kept: a parse error's hint reads it again
        if self._pending is not None:
            from qmig.cli.versions import Prefixed

            file, self._pending = self._pending, None
            return cast(BinaryIO, Prefixed(self._prefix or b"", file))
        raise QmigError(str(self.path), "a FIFO or device can be read only once")

    def keep(self) -> None:
        """Copy a live stream to a temporary file, so that it can be read more than once."""
        import shutil
        import tempfile

        if self.rereadable:
            return
        kept = tempfile.TemporaryFile()  # noqa: SIM115 (kept open for the later passes)
        with self.open() as file:
            shutil.copyfileobj(file, kept, 1 << 20)
        kept.flush()
        self._kept = kept
        self.rereadable = True

    def hinted(self, records: Iterator[Record]) -> Iterator[Record]:
        """``records``, where a parse error gains the profile that would read on."""
        from qmig.cli.versions import add_hint, hint_from_file, hint_from_prefix

        try:
            yield from records
        except QmigError as error:
            if self.rereadable:
                hint = hint_from_file(error, self.version, self.open)
            else:
                hint = hint_from_prefix(error, self.version, self._prefix or b"")
            raise add_hint(error, hint) from None


def _open(path: Path, timeout: float | None = None) -> BinaryIO:
    """A recording: a file, a FIFO or device (read with ``timeout`` as the limit), each
    possibly xz-compressed (as the fixtures are shipped)."""
    if path.suffix != ".xz" and path.is_file():
        from qmig.libvirt.detect import is_save_image

        if is_save_image(path):  # the QEMU stream inside it, after libvirt's header
            from qmig.libvirt.streams import open_save_image

            return open_save_image(path)
        return path.open("rb")  # the common case needs none of the capture machinery
    from qmig.capture.live import DEFAULT_TIMEOUT_S
    from qmig.capture.recording import open_capture_file

    return open_capture_file(path, DEFAULT_TIMEOUT_S if timeout is None else timeout)


def _connections(index_path: Path | None) -> tuple[list[int], list[int]]:
    if index_path is None:
        return [], []
    from qmig.capture.connections import return_path_boundaries, stream_boundaries

    folder = index_path.parent
    return stream_boundaries(folder), return_path_boundaries(folder)


def run(args: argparse.Namespace) -> int:
    from qmig.libvirt.detect import is_save_image

    if args.stream.is_dir() or not is_save_image(args.stream):
        return _run(args, None)
    from qmig.libvirt.cli import run_save_image

    return run_save_image(args, _run)


def _run(args: argparse.Namespace, libvirt: dict[str, Any] | None) -> int:
    from qmig.cli.versions import choose
    from qmig.inspect import ReturnPathInspection, StreamInspection, read_records
    from qmig.wire import messages as m
    from qmig.wire.reader import ReturnPathReader, StreamReader
    from qmig.wire.render import to_json

    stream_path, rp_path, index_path = _inputs(args)
    check_report(args)
    if args.report is not None and index_path is None:
        raise QmigError("--report", "needs a capture folder: its index.tsv times the chunks")
    from qmig.mapped_ram.inspect import other_form, run_other_form

    if rp_path is None and (form := other_form(stream_path, args.qemu_version)) is not None:
        return run_other_form(args, stream_path, form)  # a mapped-ram file or multifd channel
    source = StreamSource(stream_path, args.timeout)
    choice = choose(args.qemu_version, source.prefix)
    args.qemu_version = source.version = choice.version
    rp_records: list[Record] = []
    rp_size = 0
    # A recovered migration's capture: where each resumed connection starts.
    stream_boundaries, rp_boundaries = _connections(index_path)
    if rp_path is not None:
        with _open(rp_path, args.timeout) as file:
            rp_reader = ReturnPathReader(args.qemu_version)
            rp_records = list(read_records(file, rp_reader, boundaries=rp_boundaries))
            rp_size = rp_reader.offset  # read to its end: every byte of it
    capture = None if index_path is None else _capture(index_path, rp_path, rp_records)
    multifd = None
    if capture is not None and index_path is not None:
        from qmig.inspect_multifd import multifd_inspection

        multifd = multifd_inspection(index_path, args.qemu_version)
    if capture is not None:
        capture.check_covers(return_path=rp_size)
        if not args.json:
            source.keep()  # the listing below reads the stream a second time

    def read_stream(
        listing: Listing | None, matcher: Any, extract: Path | None
    ) -> tuple[StreamInspection, list[Any]]:
        inspection = StreamInspection(StreamReader(args.qemu_version), extract)
        commands: list[dict[str, Any]] = []
        try:
            with source.open() as file, _progress(stream_path, args.json) as advance:
                records = read_records(file, inspection.reader, advance, stream_boundaries)
                starts = list(stream_boundaries)  # resumed connections, shown where they begin
                for record in source.hinted(records):
                    while starts and record.offset >= starts[0] and listing is not None:
                        if listing.timed is not None:  # what came back before it, first
                            listing.timed.before(listing, record)
                        listing.heading(f"resumed connection from stream byte {starts.pop(0)}")
                    inspection.add(record)
                    message = record.message
                    if multifd is not None and matcher is not None and capture is not None:
                        multifd.main_record(record, capture.stream)
                    if matcher is not None:
                        if isinstance(message, m.RamPageRun):
                            matcher.add(message)
                        elif isinstance(message, m.Packaged):
                            matcher.postcopy_started()
                    if isinstance(message, m.COMMANDS):
                        commands.append(
                            {
                                "offset": record.offset,
                                "depth": record.depth,
                                "name": record.name,
                                **to_json(message),
                            }
                        )
                    if listing is not None:
                        listing.record(record)
        finally:
            inspection.close()
        return inspection, commands

    report_extra: dict[str, Any] = {}
    if capture is None:
        listing = None if args.json else Listing(args.pages)
        inspection, commands = read_stream(listing, None, args.dump_ram)
    else:
        # The requests' answers are found in a first pass, so that the listing can show each
        # request beside its answer although the answer comes later in the stream.
        matcher = capture.matcher(inspection_schema(args))
        inspection, commands = read_stream(None, matcher, args.dump_ram)
        # The stream was read to its end: the index must account for every byte of it (known
        # now without reading a compressed capture once more just to count them).
        capture.check_covers(stream=inspection.reader.offset)
        matcher.finish()
        preempt_report = _preempt(args, index_path, capture, inspection.reader)
        if preempt_report is not None:
            report_extra["preempt"] = preempt_report
        if multifd is not None:
            multifd.read()
            report_extra["multifd"] = multifd.as_json()
        listing = None
        if not args.json:
            listing = Listing(args.pages, capture.timed())
            read_stream(listing, None, None)

    report = inspection.as_json()
    report["stream"] = str(stream_path)
    if libvirt is not None:
        report["libvirt"] = libvirt
    report["qemu_version"] = inspection.reader.profile.name
    report["qemu_version_evidence"] = choice.evidence
    report["commands"] = commands
    report.update(report_extra)
    if rp_path is not None:
        rp_inspection = ReturnPathInspection()
        messages = []
        if listing is not None and capture is None:
            listing.heading(f"return path {rp_path}")
        for record in rp_records:
            rp_inspection.add(record)
            messages.append(
                {"offset": record.offset, "name": record.name, **to_json(record.message)}
            )
            if listing is not None and capture is None:
                listing.record(record)
        report["return_path"] = {**rp_inspection.as_json(), "messages": messages}
    if capture is not None:
        from qmig.inspect import latency_summary

        if listing is not None and listing.timed is not None:
            listing.timed.before(listing, None)
        if listing is not None and multifd is not None:
            listing.heading("multifd channels and the stream's sync points, on the relay's clock")
            for line in multifd.lines():
                listing.console.print(line, markup=False, highlight=False)
            _multifd_summary(listing, report["multifd"])
        report["requests"] = [request.as_json() for request in capture.requests]
        report["request_latency_us"] = latency_summary(capture.requests)
    if args.report is not None:
        _write_report(args, report, capture, multifd)
    if listing is not None:
        listing.summary(report)
    else:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


def _multifd_summary(listing: Listing, multifd: dict[str, Any]) -> None:
    channels = ", ".join(
        f"{c['direction']} (id {c['id']}): {c['bytes']:,} bytes, {c['packets']} packets, "
        f"{c['pages']:,} pages, {c['zero_pages']:,} zero, {c['syncs']} SYNC"
        for c in multifd["channels"]
    )
    pages = ", ".join(f"{name} {count:,}" for name, count in multifd["pages"].items())
    match = "match" if multifd["syncs_match"] else "DO NOT match"
    listing.console.print(
        f"multifd: {channels}\npages: {pages}; {len(multifd['sync_points'])} sync points on "
        f"the stream, which the channels' SYNC packets {match}",
        markup=False,
        highlight=False,
    )


def _preempt(
    args: argparse.Namespace, index_path: Path | None, capture: _Capture, main: Any
) -> dict[str, Any] | None:
    """A capture's preempt channel: read, its answers matched; its figures for the report."""
    from qmig.capture.recording import PREEMPT_NAME, capture_file
    from qmig.inspect_preempt import match_preempt, preempt_records
    from qmig.wire import messages as m

    if index_path is None or capture.preempt is None:
        return None
    path = capture_file(index_path.parent, PREEMPT_NAME)
    if path is None:
        raise QmigError(
            str(index_path.parent), f"the index has preempt chunks but no {PREEMPT_NAME}"
        )
    records = preempt_records(path, main)
    capture.preempt_records = records
    match_preempt(
        capture.requests, records, capture.preempt, inspection_schema(args).target_page_size
    )
    runs = [r.message for r in records if isinstance(r.message, m.RamPageRun)]
    return {
        "file": str(path),
        "bytes": sum(record.size for record in records),
        "pages": sum(run.count for run in runs),
        "zero_pages": sum(run.zero_count for run in runs),
        "ended_with_eos": any(isinstance(r.message, m.RamEos) for r in records),
        "answered_requests": sum(r.answered_on == "preempt" for r in capture.requests),
    }


def _write_report(
    args: argparse.Namespace, report: dict[str, Any], capture: Any, multifd: Any
) -> None:
    from qmig.report import builders
    from qmig.report.cli import write
    from qmig.report.document import printed

    def draw(console: Any) -> None:
        listing = Listing(False)
        listing.console = console
        listing.summary(report)

    write(args, builders.inspection(report, capture, capture.requests, printed(draw), multifd))


def inspection_schema(args: argparse.Namespace) -> Any:
    from qmig.wire.schema import schema_for

    return schema_for(args.qemu_version)


class _Capture:
    """A capture directory's timelines and page requests (layout: formats/capture.md)."""

    def __init__(
        self,
        stream: Timeline,
        return_path: Timeline,
        rp_records: list[Record],
        covered: dict[Direction, int],
    ) -> None:
        from qmig.inspect import page_requests

        self.stream = stream
        self.return_path = return_path
        self.rp_records = rp_records
        self.covered = covered  # per direction, the bytes the index accounts for
        self.requests = page_requests(rp_records, return_path)
        self.preempt: Timeline | None = None  # postcopy-preempt's channel, when recorded
        self.preempt_records: list[Record] = []

    def check_covers(self, *, stream: int | None = None, return_path: int | None = None) -> None:
        """The index must account for exactly the bytes each file was found to hold."""
        from qmig.capture.recording import Direction
        from qmig.errors import MalformedError

        for direction, size in ((Direction.STREAM, stream), (Direction.RETURN_PATH, return_path)):
            if size is not None and self.covered[direction] != size:
                raise MalformedError(
                    CAPTURE_INDEX,
                    f"{direction.value} chunks sum to {self.covered[direction]}, "
                    f"the file has {size} bytes",
                )

    def matcher(self, schema: Any) -> Any:
        from qmig.inspect import RequestMatcher

        flags = schema.profile.ram_flags
        return RequestMatcher(
            self.requests, self.stream, schema.target_page_size, flags["CONTINUE"]
        )

    def timed(self) -> Timed:
        answers = {request.offset: request for request in self.requests}
        timed = Timed(self.stream, self.return_path, self.rp_records, answers)
        timed.preempt = self.preempt
        timed.preempt_records = self.preempt_records
        return timed


def _capture(index_path: Path, rp_path: Path | None, rp_records: list[Record]) -> _Capture:
    from qmig.capture.recording import Direction, read_index
    from qmig.errors import MalformedError
    from qmig.inspect import Timeline

    chunks = read_index(index_path)
    timelines = {}
    covered: dict[Direction, int] = {}
    for direction in (Direction.STREAM, Direction.RETURN_PATH):
        mine = [(c.offset, c.length, c.t_ns) for c in chunks if c.direction is direction]
        if direction is Direction.RETURN_PATH and rp_path is None:
            mine = []
        total = 0
        for offset, length, _ in mine:
            if offset != total:
                raise MalformedError(
                    CAPTURE_INDEX,
                    f"{direction.value} chunk at {offset}, expected {total}",
                )
            total += length
        covered[direction] = total
        timelines[direction] = Timeline(mine)
    capture = _Capture(
        timelines[Direction.STREAM], timelines[Direction.RETURN_PATH], rp_records, covered
    )
    preempt = [(c.offset, c.length, c.t_ns) for c in chunks if c.direction is Direction.PREEMPT]
    if preempt:
        capture.preempt = Timeline(preempt)
    return capture
