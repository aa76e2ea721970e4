"""``qmig receive --listen tcp:HOST:PORT``: qmig as the destination of a real QEMU source."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmig.cli import add_json, add_qemu_version

if TYPE_CHECKING:
    from qmig.protocol.destination import Destination
    from qmig.runner.destination import DestinationReport


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "receive",
        help="be the destination of a real QEMU migration (postcopy or precopy)",
        description="Listen for a migration stream from a QEMU source (QEMU's URI syntax; an "
        "empty host means 127.0.0.1). qmig learns the RAM blocks from the stream, maps them "
        "with userfaultfd and runs a read-only guest workload from POSTCOPY_RUN on, so that "
        "faults become page requests to the real source.",
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
        help="the source runs without postcopy-ram (accept 0-byte ADVISE)",
    )
    parser.add_argument(
        "--accept-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="how long to wait for the source to connect",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="give up when the source sends nothing for this long",
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
    from qmig.transport import listen

    workload = None if args.workload == "none" else Workload(Pattern[args.workload.upper()])
    sizes = (HOST_PAGE_SIZE, *huge_page_sizes())
    destination = Destination(
        args.qemu_version,
        postcopy_ram=not args.no_postcopy_ram,
        supported_page_sizes=sizes,
    )
    console = Console(stderr=True, highlight=False)
    with listen(args.listen) as listener:
        if not args.json:
            console.print(f"listening on {listener.uri}")
        connection = listener.accept(timeout=args.accept_timeout)
    with connection:
        runner = DestinationRunner(
            connection,
            destination,
            workload=workload,
            vcpus=args.vcpus,
            dump_dir=args.dump_ram,
            idle_timeout=args.idle_timeout,
        )
        report = runner.run()
    summary = summarise(report, destination)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for key, value in summary.items():
            console.print(f"[bold]{key}[/bold]: {value}")
    return 0


def summarise(report: DestinationReport, destination: Destination) -> dict[str, Any]:
    faults = report.faults
    latency = faults.get("latency_ns", {})
    sent = sorted(report.request_sent_ns)

    def pick(fraction: float) -> float:
        return round(sent[min(len(sent) - 1, int(len(sent) * fraction))] / 1000, 1) if sent else 0

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
        "fault_to_request_us": {"p50": pick(0.5), "p99": pick(0.99)},
        "fault_to_placed_us": {
            "p50": round(latency.get("p50_ns", 0) / 1000, 1),
            "p99": round(latency.get("p99_ns", 0) / 1000, 1),
            "max": round(latency.get("max_ns", 0) / 1000, 1),
        },
        "blocktime_ms": round(faults.get("blocktime_ns", 0) / 1e6, 2),
        "pongs": destination.pongs_sent,
        "notices": report.notices,
    }
