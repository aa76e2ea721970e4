"""``qmig qemu-faults``: a QEMU destination's postcopy fault latency, from its trace log.

QEMU before 10.1 reports no per-fault latency. Started with the options ``--qemu-args LOG``
prints (three trace events, microsecond stamps, into LOG), a destination logs every fault its
fault thread reads and every page it places; this command times each fault to its page's
placement (:mod:`qmig.qemu.trace`) and prints the figures in qmig's vocabulary, as
``simulate`` and ``receive`` print theirs: ``fault_latency_us``, and QEMU 10.1's own form
(``postcopy_latency_ns``, ``postcopy_latency_dist``), so that qmig and QEMU sit side by side.
"""

from __future__ import annotations

import argparse
import json
import mmap
import shlex
from pathlib import Path
from typing import Any

from qmig.cli import add_json
from qmig.cli.options import size
from qmig.cli.text import latency_form
from qmig.errors import QmigError

DESCRIPTION = (
    "Time a QEMU destination's postcopy faults from its trace log: each fault its fault thread "
    "read, to the placement of its page. Start the destination with the options that "
    "'--qemu-args LOG' prints; a fault read after its page was placed is counted apart, as "
    "qmig counts its own."
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "qemu-faults",
        help="time a QEMU destination's postcopy faults from its trace log",
        description=DESCRIPTION,
    )
    parser.add_argument("log", metavar="LOG", help="the trace log QEMU wrote (its -D file)")
    parser.add_argument(
        "--qemu-args",
        action="store_true",
        help="print the QEMU options that write LOG, and exit",
    )
    parser.add_argument(
        "--page-size",
        type=size,
        default=mmap.PAGESIZE,
        metavar="SIZE",
        help="the RAM's host page size, e.g. 2M for huge pages (default: this host's, "
        f"{mmap.PAGESIZE})",
    )
    add_json(parser)
    parser.set_defaults(func=run)


def figures(log: Path, page_size: int) -> dict[str, Any]:
    """The trace's faults in the vocabulary of ``simulate --json`` and ``receive --json``."""
    from qmig.latency import percentiles_us, qemu_latency_figures
    from qmig.qemu.trace import traced_fault_file

    if not log.is_file():
        raise QmigError(str(log), "no such trace log")
    faults = traced_fault_file(log, page_size)
    if not faults.lines:
        raise QmigError(
            str(log), "not a QEMU trace log: no line in its stamped form (TID@SECONDS:EVENT ...)"
        )
    latencies = faults.latencies_ns
    timed = percentiles_us(latencies)
    return {
        # As simulate and receive count theirs: every fault read, timed or not.
        "faults": timed.pop("count") + faults.late + faults.unplaced,
        "late_faults": faults.late,
        "unplaced_faults": faults.unplaced,
        "fault_latency_us": timed,
        **qemu_latency_figures(latencies),
        "blocktime_ms_by_thread": {
            str(thread): round(ns / 1e6, 2)
            for thread, ns in sorted(faults.blocked_ns_by_thread().items())
        },
    }


def run(args: argparse.Namespace) -> int:
    log = Path(args.log)
    if args.qemu_args:
        from qmig.qemu.trace import fault_trace_args

        print(shlex.join(fault_trace_args(log)))
        return 0
    result = figures(log, args.page_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    latency = result["fault_latency_us"]
    timed = result["faults"] - result["late_faults"] - result["unplaced_faults"]
    print(
        f"{result['faults']} faults, {timed} timed: fault → placed p50 {latency['p50']} µs, "
        f"p99 {latency['p99']} µs, max {latency['max']} µs"
    )
    qemu_form = latency_form(result["postcopy_latency_ns"], result["postcopy_latency_dist"])
    print(f"in QEMU's form: {qemu_form}")
    print(
        f"{result['late_faults']} read after their page was placed (not timed), "
        f"{result['unplaced_faults']} whose page the log never shows placed"
    )
    for thread, blocked in result["blocktime_ms_by_thread"].items():
        print(f"thread {thread}: blocked {blocked} ms")
    if not result["faults"]:
        print(f"no postcopy fault in {log}: was QEMU started with the options of --qemu-args?")
    return 0
