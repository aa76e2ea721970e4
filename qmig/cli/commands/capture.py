"""``qmig capture``: relay one migration between two real QEMUs and record both directions."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmig.cli import add_json, add_qemu_version
from qmig.cli.options import positive_count, seconds

if TYPE_CHECKING:
    from qmig.capture import CaptureSummary, Relay

PROGRESS_SECONDS = 0.25


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "capture",
        help="relay a migration between two QEMUs and record both directions",
        description=(
            "Listen for a migration source, connect to the destination, forward both "
            "directions unchanged and record them in OUT (layout: formats/capture.md). "
            "Point the source's 'migrate' at the --listen address."
        ),
    )
    parser.add_argument(
        "--listen",
        required=True,
        metavar="URI",
        help="where the source connects, e.g. "
        "tcp:127.0.0.1:4444 (port 0: any free port, named on the first stderr line)",
    )
    parser.add_argument(
        "--connect",
        required=True,
        metavar="URI",
        help="the destination's URI, e.g. tcp:127.0.0.1:4445",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="the capture folder to write"
    )
    parser.add_argument(
        "--preempt",
        action="store_true",
        help="postcopy-preempt: the source's next connection after the main one is its "
        "preempt channel; relay it too, and record it in preempt.bin (default: off)",
    )
    parser.add_argument(
        "--pcap",
        type=Path,
        metavar="FILE.pcapng",
        help="once the relay is done, also write the capture as pcapng for Wireshark, as "
        "'qmig export-pcap OUT FILE' does (default: none)",
    )
    parser.add_argument(
        "--multifd",
        type=positive_count,
        default=0,
        metavar="N",
        help="multifd with multifd-channels N: the source's next N connections after the main "
        "one are its multifd channels; relay each, recorded in multifd-<K>.bin (default: none)",
    )
    recovery = parser.add_argument_group("postcopy recovery")
    recovery.add_argument(
        "--recover-connect",
        metavar="URI",
        help="record a resumed migration too: when a connection ends without the "
        "destination's SHUT(0), wait for the source to connect again (migrate resume=true "
        "to --listen) and relay it to URI, where the destination listens once told "
        "migrate-recover URI; every connection goes to the same folder (default: off)",
    )
    recovery.add_argument(
        "--recover-timeout",
        type=seconds,
        metavar="SECONDS",
        help="how long to wait for the resumed connections (default: 600 with "
        "--recover-connect, else no recovery)",
    )
    add_qemu_version(parser, auto="detect it from the recorded stream (kept in meta.json)")
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at module level: the relay and rich are capture's alone.
    from qmig.capture import Relay
    from qmig.errors import TransportError

    recover_timeout = args.recover_timeout
    if recover_timeout is None:
        recover_timeout = 600.0 if args.recover_connect else 0.0
    relay = Relay(
        args.connect,
        args.out,
        listen_uri=args.listen,
        qemu_version=args.qemu_version,
        recover_connect=args.recover_connect,
        recover_timeout=recover_timeout,
        preempt=args.preempt,
        multifd=args.multifd,
    )
    # The first stderr line is stable: scripts read the real port from it when they asked for 0.
    print(f"qmig capture: listening on {relay.listen_uri}", file=sys.stderr, flush=True)
    try:
        relay.start()
        _wait_showing_progress(relay, quiet=args.json)
        summary = relay.join()
    except KeyboardInterrupt:
        relay.stop()
        raise
    document = summary.as_dict()
    if args.pcap is not None:  # unclean too: a broken migration is what one looks at
        from qmig.pcap import write_pcapng

        document["pcapng"] = write_pcapng(args.out, args.pcap).as_json()
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_summary(summary)
        if args.pcap is not None:
            print(f"pcapng: {args.pcap}: {document['pcapng']['packets']} packets")
    if not summary.clean:
        raise TransportError(
            "capture",
            f"migration did not end cleanly (stream: {summary.stream.end}, "
            f"return path: {summary.return_path.end}"
            + "".join(f", multifd-{k}: {r.end}" for k, r in enumerate(summary.multifd))
            + ")",
        )
    return 0


def _wait_showing_progress(relay: Relay, *, quiet: bool) -> None:
    """Until the source connects, a status line; then each direction's bytes and rate."""
    from rich.console import Console

    from qmig.cli.progress import PhaseProgress

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return
    with console.status("waiting for the source to connect"):
        while relay.running and relay.progress() is None:
            time.sleep(PROGRESS_SECONDS)

    def directions() -> dict[str, int]:
        stream, return_path = relay.progress() or (0, 0)
        return {"stream": stream, "return path": return_path}

    with PhaseProgress(quiet=False).shown(directions):
        while relay.running:
            time.sleep(PROGRESS_SECONDS)


def _print_summary(summary: CaptureSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    version = f", QEMU {summary.qemu_version} wire" if summary.qemu_version else ""
    table = Table(title=f"capture in {summary.out_dir} ({summary.duration_s:.2f} s{version})")
    table.add_column("direction")
    table.add_column("bytes", justify="right")
    table.add_column("chunks", justify="right")
    table.add_column("ended")
    rows = [("stream", summary.stream), ("return path", summary.return_path)]
    if summary.preempt is not None:
        rows.append(("preempt", summary.preempt))
    rows += [(f"multifd-{k}", result) for k, result in enumerate(summary.multifd)]
    for name, result in rows:
        table.add_row(name, f"{result.bytes:,}", str(result.chunks), result.end)
    if len(summary.connections) > 1:
        table.caption = f"{len(summary.connections)} connections (postcopy recovery)"
    Console().print(table)
