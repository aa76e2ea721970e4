"""``qmig receive --listen tcp:HOST:PORT``: qmig as the destination of a real QEMU source."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmig.cli import add_json, add_qemu_version
from qmig.cli.multifd_recv_options import add_multifd, multifd_openings, multifd_options
from qmig.cli.options import positive_count, rate_or_zero, seconds, size
from qmig.cli.preempt_options import add_preempt
from qmig.cli.text import blocktime, latency_form
from qmig.errors import QmigError
from qmig.host import HOST_PAGE_SIZE
from qmig.latency import percentiles_us, vcpu_blocktime_ms, vcpu_run_ms
from qmig.report.cli import add_report, check_report
from qmig.report.recorder import PREEMPT as PREEMPT_SERIES
from qmig.report.recorder import PREEMPT_BACK, counted, counted_multifd
from qmig.runner.misbehave_options import add_destination_knobs, destination_misbehaviour
from qmig.runner.pauses import pause_rows, pauses_json

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from qmig.protocol.destination import Destination
    from qmig.protocol.preempt import PreemptVariant
    from qmig.protocol.ram_config import RamConfig
    from qmig.ram.workload import Workload
    from qmig.runner.channels import Channels, CutPlan
    from qmig.runner.destination import DestinationReport
    from qmig.runner.misbehave import Misbehaviour

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
    parser.add_argument(
        "--listen",
        required=True,
        metavar="URI",
        help="where the source connects, e.g. "
        "tcp:127.0.0.1:4444 (port 0: any free port, named on the first stderr line)",
    )
    parser.add_argument(
        "--dump-ram",
        type=Path,
        metavar="DIR",
        help="write each RAMBlock's final contents to DIR/<idstr>.bin (default: none)",
    )
    parser.add_argument(
        "--workload",
        choices=["sequential", "random", "hotset", "none"],
        default="random",
        help="how the guest's vCPUs touch memory after RUN",
    )
    parser.add_argument(
        "--vcpus",
        type=positive_count,
        default=1,
        metavar="N",
        help="guest workload threads touching memory after RUN",
    )
    parser.add_argument(
        "--no-fast-path",
        action="store_true",
        help="place postcopy pages, and send page requests for faults, from Python instead of "
        "the C threads that read the channel and the faults once the guest runs (default: "
        "the C threads)",
    )
    parser.add_argument(
        "--no-postcopy-ram",
        action="store_true",
        help="the source has postcopy-ram off but still sends POSTCOPY_ADVISE (0 bytes, as "
        "with dirty-bitmaps): accept that; a source without ADVISE needs no option "
        "(default: postcopy-ram on)",
    )
    parser.add_argument(
        "--ram-page-size",
        type=size,
        default=HOST_PAGE_SIZE,
        metavar="SIZE",
        help="what this destination's guest RAM is backed with: the host's page size, "
        "ordinary RAM (default), "
        "or a huge page size such as 2M (hugetlbfs); POSTCOPY_ADVISE's page-size summary must "
        "match it, as in QEMU",
    )
    parser.add_argument(
        "--blocks",
        type=_blocks,
        metavar="NAME:SIZE,...",
        help="this destination's RAM blocks (NAME:SIZE/MAX for a resizeable one); MEM_SIZE "
        "must then name only these, with their sizes, as in QEMU (default: take MEM_SIZE's)",
    )
    parser.add_argument(
        "--max-ram",
        type=size,
        metavar="SIZE",
        help="refuse a MEM_SIZE claiming more RAM than this, before mapping anything "
        "(default: the host's memory, MemTotal in /proc/meminfo)",
    )
    parser.add_argument(
        "--accept-timeout",
        type=seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the source to connect",
    )
    parser.add_argument(
        "--idle-timeout",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="give up when the source sends nothing, or takes nothing of the return path, for "
        "this long",
    )
    parser.add_argument(
        "--deadline",
        type=seconds,
        metavar="SECONDS",
        help="give up when the migration takes longer than this, from the stream header on "
        "(default: no deadline)",
    )
    parser.add_argument(
        "--min-rate",
        type=rate_or_zero,
        default=1024.0,
        metavar="BYTES/S",
        help="give up when the source sends fewer bytes per second than this over a whole "
        "--rate-window (0: no minimum)",
    )
    parser.add_argument(
        "--rate-window",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="the window --min-rate is measured over",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=seconds,
        default=5.0,
        metavar="SECONDS",
        help="close a connection that has not sent a migration stream header within this "
        "long; other connections are examined meanwhile",
    )
    add_report(parser)
    add_preempt(parser)
    add_multifd(parser)
    recovery = parser.add_argument_group("postcopy recovery")
    recovery.add_argument(
        "--recover-listen",
        metavar="URI",
        help="when the channel breaks after POSTCOPY_RUN, keep RAM and the vCPUs blocked and "
        "wait for the source's resumed channel here (QEMU's migrate-recover; the source "
        "resumes with migrate resume=true to this URI) (default: the --listen URI)",
    )
    recovery.add_argument(
        "--recover-timeout",
        type=rate_or_zero,  # seconds, 0 or more
        default=600.0,
        metavar="SECONDS",
        help="how long to wait, paused, for the resumed channel; 0: never pause, fail",
    )
    recovery.add_argument(
        "--pause-after",
        type=positive_count,
        metavar="PAGES",
        help="close the channel (a reset) after PAGES postcopy pages were placed, to make the "
        "source pause (default: never)",
    )
    recovery.add_argument(
        "--pause-during-recovery",
        action="store_true",
        help="with --pause-after: also close the first resumed channel during its handshake, "
        "after answering a RECV_BITMAP (default: off)",
    )
    add_destination_knobs(parser)
    add_qemu_version(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def _blocks(text: str) -> Any:
    from qmig.errors import QmigError
    from qmig.protocol.ram_config import parse_blocks

    try:
        return parse_blocks(text)
    except QmigError as error:
        raise argparse.ArgumentTypeError(error.detail) from None


def stream_headers(version: str) -> list[bytes]:
    """The stream headers a source may open with: the given version's, or with ``auto`` those
    of every profile (the connection is chosen before its bytes choose the profile)."""
    from qmig.cli.versions import AUTO
    from qmig.wire import messages as m
    from qmig.wire.profiles import available_versions, load_profile
    from qmig.wire.schema import schema_for

    versions = available_versions() if version == AUTO else [version]
    return [
        bytes(schema_for(v).header.build(m.StreamHeader(load_profile(v).stream_version)))
        for v in versions
    ]


def run(args: argparse.Namespace) -> int:
    from qmig.protocol.ram_config import RamConfig
    from qmig.ram.workload import Pattern, Workload
    from qmig.runner.channels import PREEMPT, Channels, CutPlan
    from qmig.runner.destination import host_memory
    from qmig.transport import (
        Acceptor,
        Connection,
        Limits,
        Listener,
        accept_channels,
        accept_migration,
        accept_multifd,
        listen,
    )

    check_report(args)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    workload = None if args.workload == "none" else Workload(Pattern[args.workload.upper()])
    ram = RamConfig(
        page_size=args.ram_page_size,
        blocks=args.blocks,
        max_ram=args.max_ram if args.max_ram is not None else host_memory(),
    )
    misbehaviour = destination_misbehaviour(args)
    recorder = None
    if args.report is not None:
        from qmig.report.recorder import Recorder

        recorder = Recorder()
    recovers = args.recover_timeout > 0
    listener = listen(args.listen)
    # The listener stays open for a resume to the same URI (QEMU's listens again on
    # migrate-recover): where the source reconnects, it finds it.
    recovery_listener: Listener | None = None
    resumed_elsewhere = False  # the main channel now comes from --recover-listen's listener
    acceptor: Acceptor | None = None
    openers: dict[str, Callable[[float], Connection]] = {}
    try:
        # Stable first stderr line: scripts read the real port from it when they asked for 0.
        print(f"qmig receive: listening on {listener.uri}", file=sys.stderr, flush=True)
        if args.multifd:
            if args.preempt:
                raise QmigError("--multifd", "not together with --preempt")
            connection, acceptor = accept_multifd(
                listener,
                stream_headers(args.qemu_version),
                multifd_openings(args.qemu_version),
                args.accept_timeout,
                handshake_timeout=args.handshake_timeout,
            )
            take = acceptor.wait
            multifd = {
                f"multifd-{index}": lambda timeout: take("multifd", timeout)
                for index in range(args.multifd)
            }
            openers.update(counted_multifd(recorder, multifd, sending=False))
        elif args.preempt and listener.socket is not None:
            # The preempt channel is the next connection to this listener after the main one.
            connection, acceptor = accept_channels(
                listener,
                stream_headers(args.qemu_version),
                args.accept_timeout,
                handshake_timeout=args.handshake_timeout,
            )
            take_next = acceptor.take_next

            def take_preempt(timeout: float) -> Connection:
                # The next connection where the current main channel came from: after a
                # resume on --recover-listen, that listener (QEMU's destination takes the
                # new preempt channel on the one migrate-recover gave it).
                resumed_on = recovery_listener
                taken = (
                    resumed_on.accept(timeout=timeout)
                    if resumed_elsewhere and resumed_on is not None
                    else take_next(timeout)
                )
                return counted(recorder, taken, sends=PREEMPT_BACK, receives=PREEMPT_SERIES)

            openers[PREEMPT] = take_preempt
        else:
            connection = accept_migration(
                listener,
                stream_headers(args.qemu_version),
                args.accept_timeout,
                handshake_timeout=args.handshake_timeout,
            )
        recover_uri = args.recover_listen or listener.uri
        if recovers and recover_uri == listener.uri:
            recovery_listener = listener
        elif acceptor is None:
            listener.close()
    except BaseException:
        listener.close()
        raise

    def limited(connection: Connection) -> Connection:
        connection.set_limits(
            Limits(args.idle_timeout, args.deadline, args.min_rate or None, args.rate_window,
                   peer="the source")
        )  # fmt: skip
        if misbehaviour is not None:
            connection = misbehaviour.wrap(connection)
        if recorder is None:
            return connection
        from qmig.report.recorder import RETURN_PATH, STREAM

        return recorder.wrap(connection, sends=RETURN_PATH, receives=STREAM)

    def reopen(timeout: float) -> Connection:
        nonlocal recovery_listener, resumed_elsewhere
        if recovery_listener is None:
            recovery_listener = listen(recover_uri)
        resumed_elsewhere = recovery_listener is not listener
        # A stable line, as the first one: a script resumes the source once it reads it.
        print(
            f"qmig receive: postcopy paused; waiting for the resumed source on "
            f"{recovery_listener.uri}",
            file=sys.stderr,
            flush=True,
        )
        # The resumed channel opens with no header: it starts with RECV_BITMAP commands.
        return limited(recovery_listener.accept(timeout=timeout))

    cuts = None
    if args.pause_after:
        cuts = CutPlan(args.pause_after, during_recovery=args.pause_during_recovery)
    channels = Channels(limited(connection), reopen if recovers else None, openers, adopt=limited)
    try:
        return _receive(args, channels, ram, workload, cuts, recorder, misbehaviour)
    finally:
        channels.close_all()
        if acceptor is not None:
            acceptor.close()
            if recovery_listener is not listener:
                listener.close()
        if recovery_listener is not None:
            recovery_listener.close()


def _receive(
    args: argparse.Namespace,
    channels: Channels,
    ram: RamConfig,
    workload: Workload | None,
    cuts: CutPlan | None,
    recorder: Any,
    misbehaviour: Misbehaviour | None = None,
) -> int:
    """Receive one migration on ``channels`` (and its replacements, when it recovers)."""
    from qmig.cli.progress import PhaseProgress, quiet
    from qmig.cli.versions import add_hint, choose, hint_from_prefix, peek_connection
    from qmig.errors import RemoteProtocolError
    from qmig.protocol.destination import Destination
    from qmig.runner.destination import DestinationRunner

    connection = channels.main
    # auto: the profile the source's first bytes (peeked, left in the socket) call for.
    prefix = peek_connection(connection, args.idle_timeout)
    choice = choose(args.qemu_version, lambda: (prefix, False))
    make = Destination if misbehaviour is None else misbehaviour.destination
    destination = make(
        choice.version,
        postcopy_ram=not args.no_postcopy_ram,
        ram=ram,
        preempt=_preempt(args, choice.version),
        preempt_from_machine=args.preempt_variant is None,
    )
    runner = DestinationRunner(
        channels,
        destination,
        workload=workload,
        vcpus=args.vcpus,
        dump_dir=args.dump_ram,
        idle_timeout=args.idle_timeout,
        recover_timeout=args.recover_timeout,
        cuts=cuts,
        multifd_channels=args.multifd,
        multifd=multifd_options(args),
        fast_path=not args.no_fast_path,
    )
    try:
        with PhaseProgress(quiet(args)).shown(_bytes_per_phase(runner, destination)):
            report = runner.run()
    except RemoteProtocolError as error:
        raise add_hint(error, hint_from_prefix(error, choice.version, prefix)) from None
    summary = summarise(report, destination)
    summary["qemu_version"] = destination.profile.name
    summary["qemu_version_evidence"] = choice.evidence
    if recorder is not None:
        _write_report(args, summary, recorder, runner)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_summary(summary)
    return 0


def _preempt(args: argparse.Namespace, version: str | None) -> PreemptVariant | None:
    """--preempt's variant until the CONFIGURATION names the machine type (which then
    decides it, unless --preempt-variant did)."""
    from qmig.protocol.preempt import preempt_variant
    from qmig.wire.profiles import load_profile

    if args.preempt_variant is not None and not args.preempt:
        raise QmigError("--preempt-variant", "needs --preempt")
    if not args.preempt:
        return None
    if args.no_postcopy_ram:
        raise QmigError("--preempt", "postcopy-preempt requires postcopy-ram")
    return preempt_variant(load_profile(version), None, args.preempt_variant)


def _bytes_per_phase(runner: Any, destination: Destination) -> Callable[[], dict[str, int]]:
    """For the progress lines: the bytes received so far, split by where the migration was
    when they arrived (as seen every 0.2 s)."""
    phases: dict[str, int] = {}
    counted = 0

    def poll() -> dict[str, int]:
        nonlocal counted
        received = runner.report.bytes_received
        phase = "precopy" if destination.phase_name == "precopy" else "postcopy"
        phases[phase] = phases.get(phase, 0) + received - counted
        counted = received
        return phases

    return poll


def _write_report(
    args: argparse.Namespace, summary: dict[str, Any], recorder: Any, runner: Any
) -> None:
    from qmig.report import builders
    from qmig.report.cli import write
    from qmig.report.document import printed
    from qmig.runner.peer import report_json

    text = printed(lambda console: _print_summary(summary, console))
    write(args, builders.receive(summary, recorder, report_json(runner), text))


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
        # Read after their page was placed (the placement woke the vCPU): not in the latency.
        "late_faults": faults.get("late_faults", 0),
        # One REQ_PAGES's life: the fault is read, the request goes out, the page is placed.
        "fault_to_request_us": percentiles_us(report.request_sent_ns),
        "request_to_placed_us": percentiles_us(report.request_placed_ns),
        "fault_to_placed_us": {
            "p50": round(latency.get("p50_ns", 0) / 1000, 1),
            "p99": round(latency.get("p99_ns", 0) / 1000, 1),
            "max": round(latency.get("max_ns", 0) / 1000, 1),
        },
        "blocktime_ms": round(faults.get("blocktime_ns", 0) / 1e6, 2),
        # QEMU 10.1's query-migrate figures: the fault latency's mean and power-of-two
        # distribution, and each vCPU's blocktime.
        "postcopy_latency_ns": faults.get("postcopy_latency_ns", 0),
        "postcopy_latency_dist": faults.get("postcopy_latency_dist", []),
        "postcopy_vcpu_blocktime_ms": vcpu_blocktime_ms(faults, report.workload),
        "vcpu_run_ms": vcpu_run_ms(report.workload),
        "pongs": destination.pongs_sent,
        "recoveries": report.recoveries,
        "paused_ms": round(report.paused_s * 1000, 2),
        # Each pause: when (s from the start), why, stream bytes and postcopy pages placed by
        # then, and how long until POSTCOPY_RESUME.
        "pauses": pauses_json(report.pauses, report.started),
        "preempt": None if destination.preempt is None else destination.preempt.value,
        # Target pages received on each channel.
        "preempt_pages": {
            "main": sum(report.placed_pages.values()) - report.preempt_pages - report.multifd_pages,
            "preempt": report.preempt_pages,
        },
        **multifd_summary(report),
        "notices": report.notices,
    }


def multifd_summary(report: DestinationReport) -> dict[str, Any]:
    """Target pages (normal and zero) on the main channel and on each multifd channel (by
    its handshake id), and the syncs the main stream waited at; None without multifd."""
    multifd = report.multifd
    if not multifd:
        return {"multifd": None, "multifd_pages": None, "multifd_syncs": 0}
    pages = {"main": sum(report.placed_pages.values()) - report.preempt_pages}
    pages["main"] -= report.multifd_pages
    for channel in multifd["per_channel"]:
        pages[f"multifd-{channel['id']}"] = channel["pages"] + channel["zero_pages"]
    return {"multifd": multifd, "multifd_pages": pages, "multifd_syncs": multifd["syncs"]}


def _print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"received a {summary['mode']} migration in {summary['total_s']} s")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("QEMU wire", f"{summary['qemu_version']} ({summary['qemu_version_evidence']})")
    table.add_row("bytes", f"{summary['bytes']:,}")
    for name, length in summary["blocks"].items():
        table.add_row(f"block {name}", f"{length:,}")
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
    table.add_row(
        "  QEMU's form",
        latency_form(summary["postcopy_latency_ns"], summary["postcopy_latency_dist"]),
    )
    table.add_row("blocktime", blocktime(summary))
    table.add_row("pongs", str(summary["pongs"]))
    table.add_row("recoveries", f"{summary['recoveries']} (paused {summary['paused_ms']} ms)")
    for name, value in pause_rows(summary["pauses"], "placed"):
        table.add_row(name, value)
    if summary["preempt"] is not None:
        pages = summary["preempt_pages"]
        table.add_row(
            "preempt", f"{summary['preempt']} variant: pages main {pages['main']:,}, "
            f"preempt {pages['preempt']:,}"
        )  # fmt: skip
    if summary["multifd_pages"] is not None:
        table.add_row(
            "multifd",
            ", ".join(f"{name} {count:,}" for name, count in summary["multifd_pages"].items())
            + f" pages; {summary['multifd_syncs']} syncs",
        )
    for notice in summary["notices"]:
        table.add_row("notice", notice)
    (console or Console()).print(table)
