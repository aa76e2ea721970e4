"""``qmig receive --listen tcp:HOST:PORT``: qmig as the destination of a real QEMU source."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmig.cli import add_json, add_qemu_version
from qmig.latency import percentiles_us

if TYPE_CHECKING:
    from qmig.protocol.destination import Destination
    from qmig.runner.destination import DestinationReport

# The fault thread needs the GIL to turn a fault into a request while the main thread parses
# the stream in Python; with the default 5 ms switch interval a request could wait that long.
SWITCH_INTERVAL_S = 0.0002
# The receive buffer is left to the kernel's autotuning: bounding it (measured with 64 KiB to
# 256 KiB against QEMU 7.2 at 16 MiB/s) only moves the queue a requested page waits behind
# into QEMU's send buffer, and the request → placed latency went up from ~10 ms to 20-90 ms.


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "receive",
        help="be the destination of a real QEMU migration (postcopy or precopy)",
        description="Listen for a migration stream from a QEMU source (QEMU's URI syntax; an "
        "empty host means 127.0.0.1). qmig learns the RAM blocks from the stream, maps them "
        "with userfaultfd and runs a read-only guest workload from POSTCOPY_RUN on, so that "
        "faults become page requests to the real source. The first line on stderr is "
        "'qmig receive: listening on URI' (with the real port when 0 was asked for).",
    )
    parser.add_argument("--listen", required=True, metavar="URI", help="e.g. tcp:127.0.0.1:4444")
    parser.add_argument("--dump-ram", type=Path, metavar="DIR", help="write DIR/<idstr>.bin")
    parser.add_argument(
        "--workload",
        choices=["sequential", "random", "hotset", "none"],
        default="random",
        help="how the guest's vCPUs touch memory after RUN (default random)",
    )
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument(
        "--no-postcopy-ram",
        action="store_true",
        help="the source has postcopy-ram off but still sends POSTCOPY_ADVISE (0 bytes, as "
        "with dirty-bitmaps): accept that; a source without ADVISE needs no option",
    )
    parser.add_argument(
        "--accept-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="how long to wait for the source to connect (default 300)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="give up when the source sends nothing, or takes nothing of the return path, for "
        "this long (default 60)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        metavar="S",
        help="give up when the migration takes longer than this, from the stream header on "
        "(default: no deadline)",
    )
    parser.add_argument(
        "--min-rate",
        type=float,
        default=1024.0,
        metavar="BYTES_S",
        help="give up when the source sends fewer bytes per second than this over a whole "
        "--rate-window (default 1024; 0: no minimum)",
    )
    parser.add_argument("--rate-window", type=float, default=60.0, metavar="S")
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="close a connection that has not sent a migration stream header within this "
        "long (default 5); other connections are examined meanwhile",
    )
    add_qemu_version(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qmig.protocol.destination import Destination
    from qmig.ram.blocks import HOST_PAGE_SIZE
    from qmig.ram.support import huge_page_sizes
    from qmig.ram.workload import Pattern, Workload
    from qmig.runner.destination import DestinationRunner
    from qmig.transport import Limits, accept_migration, listen
    from qmig.wire import messages as m

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    workload = None if args.workload == "none" else Workload(Pattern[args.workload.upper()])
    sizes = (HOST_PAGE_SIZE, *huge_page_sizes())
    destination = Destination(
        args.qemu_version,
        postcopy_ram=not args.no_postcopy_ram,
        supported_page_sizes=sizes,
    )
    console = Console(stderr=True, highlight=False)
    with listen(args.listen) as listener:
        # Stable first stderr line: scripts read the real port from it when they asked for 0.
        print(f"qmig receive: listening on {listener.uri}", file=sys.stderr, flush=True)
        header = bytes(destination.reader.schema.header.build(m.StreamHeader(
            destination.profile.stream_version
        )))  # fmt: skip
        connection = accept_migration(
            listener, header, args.accept_timeout, handshake_timeout=args.handshake_timeout
        )
    connection.set_limits(
        Limits(args.idle_timeout, args.deadline, args.min_rate or None, args.rate_window,
               peer="the source")
    )  # fmt: skip
    with connection:
        runner = DestinationRunner(
            connection,
            destination,
            workload=workload,
            vcpus=args.vcpus,
            dump_dir=args.dump_ram,
            idle_timeout=args.idle_timeout,
        )
        if args.json or not console.is_terminal:
            report = runner.run()
        else:
            with console.status("receiving"):
                report = runner.run()
    summary = summarise(report, destination)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_summary(summary)
    return 0


def summarise(report: DestinationReport, destination: Destination) -> dict[str, Any]:
    faults = report.faults
    latency = faults.get("latency_ns", {})
    return {
        "completed": True,
        "mode": "postcopy" if report.postcopy else "precopy",
        "state": destination.state.name,
        "total_s": round(report.finished - report.started, 3),
        "bytes": report.bytes_received,
        "blocks": report.blocks,
        "devices": len(report.devices),
        "discarded_pages": report.discarded_pages,
        "requests": report.requests,
        "faults": faults.get("faults", 0),
        # One REQ_PAGES's life: the fault is read, the request goes out, the page is placed.
        "fault_to_request_us": percentiles_us(report.request_sent_ns),
        "request_to_placed_us": percentiles_us(report.request_placed_ns),
        "fault_to_placed_us": {
            "p50": round(latency.get("p50_ns", 0) / 1000, 1),
            "p99": round(latency.get("p99_ns", 0) / 1000, 1),
            "max": round(latency.get("max_ns", 0) / 1000, 1),
        },
        "blocktime_ms": round(faults.get("blocktime_ns", 0) / 1e6, 2),
        "pongs": destination.pongs_sent,
        "notices": report.notices,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"received a {summary['mode']} migration in {summary['total_s']} s")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("bytes", f"{summary['bytes']:,}")
    for name, size in summary["blocks"].items():
        table.add_row(f"block {name}", f"{size:,}")
    table.add_row("devices", str(summary["devices"]))
    table.add_row("discarded pages", f"{summary['discarded_pages']:,}")
    table.add_row("page requests", f"{summary['requests']:,}")
    table.add_row("faults", f"{summary['faults']:,}")
    for key, label in (
        ("fault_to_request_us", "fault → request sent"),
        ("request_to_placed_us", "request sent → page placed"),
        ("fault_to_placed_us", "fault → page placed"),
    ):
        figures = summary[key]
        table.add_row(
            f"{label} (µs)", f"p50 {figures['p50']}  p99 {figures['p99']}  max {figures['max']}"
        )
    table.add_row("blocktime", f"{summary['blocktime_ms']} ms")
    table.add_row("pongs", str(summary["pongs"]))
    for notice in summary["notices"]:
        table.add_row("notice", notice)
    Console().print(table)
