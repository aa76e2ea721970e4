"""``qmig simulate``: a verified postcopy migration between a qmig source and destination."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from qmig.cli import add_json, add_qemu_version
from qmig.cli.multifd_source_options import add_multifd_source
from qmig.cli.options import (
    add_bandwidth,
    add_fast_answer,
    buffer_size,
    count,
    integer,
    positive_count,
    rate_or_zero,
    size,
)
from qmig.cli.preempt_options import add_preempt
from qmig.cli.text import blocktime, latency_form, plural
from qmig.errors import QmigError
from qmig.report.cli import add_report, check_report
from qmig.runner.pauses import pause_rows
from qmig.sizes import format_size, parse_size

if TYPE_CHECKING:
    from rich.console import Console

    from qmig.simulate import SimulationConfig

MiB = 1 << 20


def _blocks(text: str) -> list[tuple[str, int]]:
    blocks = []
    for item in text.split(","):
        name, _, text = item.partition(":")
        if not name or not text:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME:SIZE, e.g. pc.ram:224M")
        try:
            blocks.append((name, parse_size(text)))
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{name}: {error}") from None
    return blocks


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run a full, verified postcopy migration between a qmig source and destination",
        description="Run a qmig source and a qmig destination in two processes over TCP on "
        "127.0.0.1. The destination's RAM is served by userfaultfd and touched by a read-only "
        "guest workload; at the end every page is compared with the source's final copy.",
    )
    parser.add_argument(
        "--ram",
        type=size,
        metavar="SIZE",
        help="total guest RAM, split 7:1 between pc.ram and vga.vram (default: 256M)",
    )
    parser.add_argument(
        "--blocks",
        type=_blocks,
        metavar="NAME:SIZE,...",
        help="the RAM blocks, e.g. pc.ram:224M,vga.vram:32M; overrides --ram (default: --ram)",
    )
    parser.add_argument(
        "--workload",
        choices=["sequential", "random", "hotset"],
        default="random",
        help="how the destination's vCPUs touch memory (read-only)",
    )
    parser.add_argument(
        "--vcpus",
        type=positive_count,
        default=2,
        metavar="N",
        help="guest workload threads touching memory after RUN",
    )
    parser.add_argument(
        "--touches",
        type=positive_count,
        metavar="N",
        help="page touches per vCPU (default: one per page of its share)",
    )
    parser.add_argument(
        "--dirty-rate",
        type=rate_or_zero,
        default=20000.0,
        metavar="PAGES/S",
        help="pages the source guest dirties per second until switchover (0: a quiet guest)",
    )
    parser.add_argument(
        "--working-set",
        type=size,
        metavar="SIZE",
        help="the source guest dirties only the first SIZE of its RAM (default: all of it)",
    )
    parser.add_argument(
        "--dirty-pattern",
        choices=["random", "sequential"],
        default="random",
        help="the source guest dirties pages at random, or one after another through its "
        "working set, over and over",
    )
    switch = parser.add_mutually_exclusive_group()
    switch.add_argument(
        "--postcopy-after",
        type=count,
        # None, not 1: argparse only sees a clash with --precopy-only when the value given
        # is not the default object itself, and a parsed 1 is the cached int 1.
        default=None,
        metavar="N",
        help="precopy passes before switching to postcopy; 0 switches before any (default: 1)",
    )
    switch.add_argument("--precopy-only", action="store_true", help="never switch to postcopy")
    parser.add_argument(
        "--no-fast-path",
        action="store_true",
        help="place postcopy pages, and send page requests for faults, from Python instead of "
        "the C threads that read the channel and the faults once the guest runs (default: "
        "the C threads)",
    )
    add_fast_answer(parser)
    add_bandwidth(parser)
    buffers = parser.add_argument_group(
        "socket buffers",
        "what a page asked for on the main channel may wait behind: small buffers shorten "
        "that wait, and slow the stream that brings the pages not yet asked for",
    )
    buffers.add_argument(
        "--send-buffer",
        type=buffer_size,
        default=argparse.SUPPRESS,  # SimulationConfig's
        metavar="SIZE|auto",
        help="the source's SO_SNDBUF from the switch to postcopy on (the kernel doubles it); "
        "auto: the kernel's autotuning (default: 32K)",
    )
    buffers.add_argument(
        "--receive-buffer",
        type=buffer_size,
        default=argparse.SUPPRESS,
        metavar="SIZE|auto",
        help="the destination's SO_RCVBUF, from the start (the kernel doubles it); auto: the "
        "kernel's autotuning (default: 128K)",
    )
    recovery = parser.add_argument_group("postcopy recovery")
    recovery.add_argument(
        "--pause-after",
        type=positive_count,
        metavar="PAGES",
        help="cut the link (both directions, abruptly) after the source has sent PAGES "
        "postcopy pages; both ends pause and recover on a new connection (default: never)",
    )
    recovery.add_argument(
        "--pauses",
        type=positive_count,
        default=1,
        metavar="K",
        help="cut it K times, every PAGES postcopy pages (default: 1)",
    )
    recovery.add_argument(
        "--pause-during-recovery",
        action="store_true",
        help="also cut the first recovery's new connection during its handshake (default: off)",
    )
    add_preempt(parser, machine_type=True)
    add_multifd_source(parser, uuid=False)
    parser.add_argument(
        "--seed", type=integer, default=1, metavar="N", help="seed of RAM contents and dirtying"
    )
    add_report(parser)
    add_qemu_version(parser, auto=None)
    add_json(parser)
    parser.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> SimulationConfig:
    from qmig.cli.versions import default_choice
    from qmig.simulate import SimulationConfig

    config = SimulationConfig(
        pattern=args.workload,
        vcpus=args.vcpus,
        touches=args.touches,
        dirty_rate=args.dirty_rate,
        working_set=args.working_set,
        dirty_pattern=args.dirty_pattern,
        postcopy_after=None
        if args.precopy_only
        else (1 if args.postcopy_after is None else args.postcopy_after),
        bandwidth=None if args.bandwidth is None else args.bandwidth * MiB,
        version=default_choice(args.qemu_version).version,
        seed=args.seed,
        pause_after=args.pause_after,
        pauses=args.pauses,
        pause_during_recovery=args.pause_during_recovery,
        preempt=args.preempt,
        preempt_variant=args.preempt_variant,
        machine_type=args.machine_type,
        multifd=args.multifd,
        zero_page_detection=args.zero_page_detection,
        fast_path=not args.no_fast_path,
        fast_answer=not args.no_fast_answer,
        fast_sweep=not args.no_fast_sweep,
    )
    # Given or not: the defaults are SimulationConfig's.
    for name in ("send_buffer", "receive_buffer"):
        if name in vars(args):
            setattr(config, name, getattr(args, name))
    if args.blocks:
        config.blocks = args.blocks
    elif args.ram is not None:
        from qmig.sizes import format_size
        from qmig.wire.profiles import target_page_size

        page = target_page_size(config.version)
        if args.ram < 2 * page or args.ram % page:
            raise QmigError(
                "--ram",
                f"{plural(args.ram, 'byte')}: need a multiple of {format_size(page)}, "
                f"at least {format_size(2 * page)}",
            )
        main = args.ram // 8 * 7 // page * page
        config.blocks = [("pc.ram", main), ("vga.vram", args.ram - main)]
    return config


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from qmig.cli.text import transfer_columns
    from qmig.simulate import environment_check, run_simulation

    config = config_from(args)
    config.check()
    check_report(args)
    environment_check()
    total = sum(size for _, size in config.blocks)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(),
        *transfer_columns(),
        console=console,
        transient=True,
        disable=args.json or not console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def advance(phase: str, size: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total if phase == "precopy" else None)
        progress.advance(tasks[phase], size)

    recorder = None
    if args.report is not None:
        from qmig.report.recorder import Recorder

        recorder = Recorder()
    with progress:
        summary = run_simulation(config, advance, recorder)
    if recorder is not None:
        _write_report(args, summary, recorder)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_summary(Console(highlight=False), summary)
    return 0


def _write_report(args: argparse.Namespace, summary: dict[str, Any], recorder: Any) -> None:
    from qmig.report import builders
    from qmig.report.cli import write
    from qmig.report.document import printed

    text = printed(lambda console: print_summary(console, summary))
    runs = recorder.runs
    write(args, builders.simulation(summary, recorder, runs["source"], runs["destination"], text))


def print_summary(console: Console, s: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(show_header=False, show_edge=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    latency = s["fault_latency_us"]
    rows = [
        (
            "result",
            "[green]verified[/green]: every page equals the source's final copy"
            if s["verified"]
            else f"[red]{s['mismatched_pages']} pages differ[/red]",
        ),
        (
            "mode",
            f"{s['mode']} (QEMU {s['qemu_version']} wire), {format_size(s['ram_bytes'])} "
            f"in {', '.join(s['blocks'])}",
        ),
        ("total time", f"{s['total_s']:.2f} s"),
        (
            "downtime",
            "-"
            if s["downtime_ms"] is None
            else f"{s['downtime_ms']:.1f} ms (source stop → destination RUN)",
        ),
        (
            "precopy",
            f"{plural(s['precopy_passes'], 'pass', 'passes')}, "
            f"{plural(s['precopy']['pages'], 'page')} ({s['precopy']['zero_pages']:,} zero), "
            f"{format_size(s['precopy']['bytes'])}",
        ),
        (
            "discards",
            f"{plural(s['discard_commands'], 'command')}, {plural(s['discarded_pages'], 'page')}",
        ),
        (
            "postcopy",
            f"{plural(s['postcopy']['pages'], 'page')} ({s['postcopy']['zero_pages']:,} zero), "
            f"{format_size(s['postcopy']['bytes'])}, "
            f"{s['postcopy']['requested_pages']:,} on request",
        ),
        (
            "requests",
            f"{s['postcopy_requests']:,} REQ_PAGES sent for {plural(s['faults'], 'fault')}",
        ),
        (
            "fault latency",
            f"p50 {latency['p50']} µs, p99 {latency['p99']} µs, max {latency['max']} µs",
        ),
        (
            "  QEMU's form",
            latency_form(s["postcopy_latency_ns"], s["postcopy_latency_dist"]),
        ),
        (
            "request path",
            f"fault → REQ_PAGES sent p50 {s['request_sent_us']['p50']} µs; "
            f"REQ_PAGES read → pages sent p50 {s['request_served_us']['p50']} µs, "
            f"p99 {s['request_served_us']['p99']} µs",
        ),
        ("requests by page", _found(s)),
        ("blocktime", blocktime(s)),
        (
            "recovery",
            f"{plural(s['recoveries'], 'recovery', 'recoveries')}, paused "
            f"{s['paused_ms']:.1f} ms, {plural(s['resent_pages'], 'page')} missing at resume",
        ),
        *pause_rows(s["pauses"], "sent"),
        *_after_recovery_row(s),
        *_preempt_row(s),
        *_multifd_rows(s),
        ("placement", _placement(s["placement_mib_s"])),
        ("switchover", _switchover(s["switchover_ms"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def _after_recovery_row(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The request legs (p50) of the requests sent after the last recovery, if there was one."""
    after = s.get("after_last_recovery")
    if after is None:
        return []
    return [
        (
            "after recovery",
            f"{plural(after['requests'], 'request')} sent from {after['since_s']:.2f} s: "
            f"fault → sent p50 {after['request_sent_us']['p50']} µs, → read by the source "
            f"{after['request_read_us']['p50']} µs, → page sent "
            f"{after['request_served_us']['p50']} µs, → placed "
            f"{after['page_delivered_us']['p50']} µs",
        ),
        ("  by page", _found(after)),
    ]


def _found(figures: dict[str, Any]) -> str:
    """The requests' count and fault latency by what each found on the source, named as in
    ``--json`` (``page_already_sent``, ``page_sent_for_request``)."""
    return "; ".join(
        f"{words} {group['count']:,}: p50 {group['p50']} µs, p99 {group['p99']} µs"
        for words, group in (
            ("page already sent", figures["page_already_sent"]),
            ("page sent for request", figures["page_sent_for_request"]),
        )
    )


def _preempt_row(s: dict[str, Any]) -> list[tuple[str, str]]:
    if s.get("preempt") is None:
        return []
    pages = s["preempt_pages"]
    return [
        (
            "preempt",
            f"{s['preempt']['variant']} variant ({s['preempt']['machine_type']}): "
            f"{plural(pages['sent']['preempt'], 'page')} sent on the preempt channel, "
            f"{pages['received']['preempt']:,} received there",
        )
    ]


def _multifd_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    if s.get("multifd") is None:
        return []
    sent, pages = s["multifd"]["sent"], s["multifd_pages"]
    per_channel = ", ".join(
        f"{name} {pages['sent'][name]:,}/{pages['received'].get(name, 0):,}"
        for name in pages["sent"]
    )
    return [
        (
            "multifd",
            f"{plural(sent['channels'], 'channel')}, {plural(sent['packets'], 'packet')}, "
            f"syncs {s['multifd_syncs']['sent']} sent/{s['multifd_syncs']['received']} "
            f"waited at; zero pages {sent['zero_page_detection']}",
        ),
        ("pages sent/received", per_channel),
    ]


def _placement(rates: dict[str, float | None]) -> str:
    return ", ".join(
        f"{phase} {'-' if speed is None else f'{speed:.0f} MiB/s'}"
        for phase, speed in rates.items()
    )


def _switchover(times: dict[str, float | None]) -> str:
    if times["first_discard_to_run"] is None:
        if times["listen_to_run"] is None:
            return "-"
        return f"no discards; LISTEN → RUN {times['listen_to_run']:.1f} ms"
    return (
        f"first discard → RUN {times['first_discard_to_run']:.1f} ms "
        f"(discards → LISTEN {times['discards_to_listen']:.1f} ms, "
        f"LISTEN → RUN {times['listen_to_run']:.1f} ms); "
        f"source stop → first discard {times['stop_to_first_discard']:.1f} ms"
    )
