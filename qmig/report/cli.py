"""The ``--report FILE.html`` option, as every command that takes it spells it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_report(parser: argparse.ArgumentParser, what: str = "the migration") -> None:
    parser.add_argument(
        "--report",
        type=Path,
        metavar="FILE.html",
        help=f"write a self-contained HTML report of {what} (timeline, fault-latency "
        "distribution, per-block and per-vCPU tables, summary); needs qmig[report] "
        "(default: none)",
    )


def check_report(args: argparse.Namespace) -> None:
    """Before the work starts: plotly must be there, so a long run does not end in vain."""
    if getattr(args, "report", None) is not None:
        from qmig.report.html import require_plotly

        require_plotly()


def write(args: argparse.Namespace, document: Any) -> None:
    from qmig.report.html import write_report

    write_report(args.report, document.as_json())
