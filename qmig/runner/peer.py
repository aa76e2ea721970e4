"""The destination half of ``qmig simulate``, run in its own process.

It accepts one connection on a listening socket inherited from the parent, runs a
destination onto userfaultfd RAM with a guest workload, dumps RAM for verification, and
prints its report as one JSON document on stdout. Errors print one line on stderr.

Before accepting it prints ``ready`` on a line of its own: the parent starts the source only
then, as a QEMU source is started against a destination already waiting with ``-incoming``,
so that the migration's time does not include this process starting up.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import subprocess
import sys
from pathlib import Path

from qmig.errors import QmigError
from qmig.protocol.destination import Destination
from qmig.ram.blocks import HOST_PAGE_SIZE
from qmig.ram.workload import Pattern, Workload
from qmig.runner.destination import IDLE_TIMEOUT, DestinationRunner
from qmig.transport import Connection

READY = "ready"


def wait_until_ready(peer: subprocess.Popen[str], timeout: float) -> None:
    """In the parent: wait for the destination's ``ready`` line (it is about to accept)."""
    assert peer.stdout is not None
    readable, _, _ = select.select([peer.stdout], [], [], timeout)
    line = peer.stdout.readline().strip() if readable else ""
    if line != READY:
        # It failed to start (its error is on stderr) or said something else: either way the
        # source has nothing to connect to.
        said = f" (it said {line!r})" if line else ""
        raise QmigError("simulate", f"the destination did not start{said}")


def report_json(runner: DestinationRunner) -> dict[str, object]:
    report = runner.report
    return {
        "started": report.started,
        "running_at": report.running_at,
        "finished": report.finished,
        "postcopy": report.postcopy,
        "bytes_received": report.bytes_received,
        "blocks": report.blocks,
        "devices": len(report.devices),
        "requests": report.requests,
        "request_sent_ns": report.request_sent_ns,
        "faults": report.faults,
        "workload": report.workload,
        "discarded_pages": report.discarded_pages,
        "first_discard_at": report.first_discard_at,
        "listen_at": report.listen_at,
        "placed_pages": report.placed_pages,
        "placing_ns": report.placing_ns,
        "notices": report.notices,
        "pongs": runner.dest.pongs_sent,
        "state": runner.dest.state.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qmig-simulation-destination")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--qemu-version")
    parser.add_argument("--pattern", default="random", choices=[p.name.lower() for p in Pattern])
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--touches", type=int)
    parser.add_argument("--dump-dir", type=Path)
    parser.add_argument("--precopy-only", action="store_true")
    parser.add_argument("--accept-timeout", type=float, default=30.0)
    parser.add_argument(
        "--idle-timeout", type=float, default=IDLE_TIMEOUT, help="fail when the source stalls"
    )
    args = parser.parse_args(argv)
    listener = socket.socket(fileno=args.fd)
    print(READY, flush=True)
    try:
        listener.settimeout(args.accept_timeout)
        sock, _ = listener.accept()
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.close()
        destination = Destination(
            args.qemu_version,
            postcopy_ram=not args.precopy_only,
            supported_page_sizes=(HOST_PAGE_SIZE,),
        )
        workload = Workload(Pattern[args.pattern.upper()], touches=args.touches)
        with Connection("simulation source", sock=sock) as connection:
            runner = DestinationRunner(
                connection,
                destination,
                workload=workload,
                vcpus=args.vcpus,
                dump_dir=args.dump_dir,
                idle_timeout=args.idle_timeout,
            )
            runner.run()
    except QmigError as error:
        print(f"qmig: error: {error.one_line()}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"qmig: error: destination: {error.strerror or error}", file=sys.stderr)
        return 1
    json.dump(report_json(runner), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
