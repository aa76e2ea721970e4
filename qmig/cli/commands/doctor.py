"""``qmig doctor``: can this host be a postcopy destination?

Runs the host-support check (:func:`qmig.ram.support.check_host`) and prints one table row per
check, or with ``--json`` one JSON document. Exits 1, naming the first problem, if postcopy
would fail here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qmig.cli import add_json
from qmig.cli.options import size

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
DESCRIPTION = (
    "Check that this host can be a postcopy destination: userfaultfd (the syscall or "
    "/dev/userfaultfd, and the features qmig uses), huge pages of each --page-size, locked "
    "memory and transparent huge pages. Prints one row per check; exits 1 naming the first "
    "problem if postcopy would fail here."
)


def _page_size(text: str) -> int:
    value = size(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a power-of-two page size")
    return int(value)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check that this host supports postcopy (userfaultfd, huge pages, mlock, THP)",
        description=DESCRIPTION,
    )
    parser.add_argument(
        "--page-size",
        type=_page_size,
        action="append",
        default=[],
        metavar="SIZE",
        help="a RAM block page size to check, e.g. 2M; repeatable (default: host pages only)",
    )
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the check runs, not when the parser is built: `qmig doctor --help` and
    # argument errors should not pay for rich and the cffi userfaultfd module.
    from rich.console import Console
    from rich.table import Table

    from qmig.ram.support import check_host

    report = check_host(args.page_size)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        table = Table(title="postcopy host support", title_justify="left")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        for check in report.checks:
            style = STATUS_STYLE[check.status]
            table.add_row(check.name, f"[{style}]{check.status}[/{style}]", check.detail)
        Console(soft_wrap=False).print(table)
    if report.errors:
        raise report.errors[0]
    return 0
