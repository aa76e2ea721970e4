"""The command-line options of the fault knobs (:mod:`qmig.runner.misbehave`), kept apart so
that building the parser imports nothing of the protocol."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from qmig.cli.options import count, positive_count, seconds

if TYPE_CHECKING:
    from qmig.runner.misbehave import Misbehaviour
    from qmig.runner.misbehave_source import SourceMisbehaviour

# Mirrors qmig.runner.misbehave.REJECTABLE (checked by a test): the parser stays light.
REJECTABLE_NAMES = (
    "OPEN_RETURN_PATH",
    "PING",
    "POSTCOPY_ADVISE",
    "POSTCOPY_RAM_DISCARD",
    "POSTCOPY_LISTEN",
    "POSTCOPY_RUN",
    "POSTCOPY_RESUME",
    "RECV_BITMAP",
)

# Mirrors qmig.runner.misbehave_source.CORRUPTIBLE (checked by a test).
CORRUPTIBLE_NAMES = (
    "OPEN_RETURN_PATH",
    "PING",
    "POSTCOPY_ADVISE",
    "POSTCOPY_RAM_DISCARD",
    "POSTCOPY_LISTEN",
    "POSTCOPY_RUN",
    "PACKAGED",
)


def add_destination_knobs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "misbehaving on purpose", "make this destination fail as a real one can, for tests"
    )
    group.add_argument(
        "--reject",
        choices=REJECTABLE_NAMES,
        metavar="COMMAND",
        help="refuse this command where it comes, with QEMU's error for it, and close the "
        f"connection: one of {', '.join(REJECTABLE_NAMES)} (default: none)",
    )
    stall = group.add_mutually_exclusive_group()
    stall.add_argument(
        "--stall-after",
        type=count,
        metavar="BYTES",
        help="stop reading the stream after BYTES bytes (default: never)",
    )
    stall.add_argument(
        "--stall-after-pages",
        type=positive_count,
        metavar="N",
        help="stop reading the stream once N pages were received (default: never)",
    )
    group.add_argument(
        "--stall-for",
        type=seconds,
        metavar="SECONDS",
        help="how long a stall lasts, then reading goes on (default: for good)",
    )
    group.add_argument(
        "--delay-requests",
        type=count,
        default=0,
        metavar="MS",
        help="hold each postcopy page request back this many milliseconds (default: 0)",
    )
    group.add_argument(
        "--shut-status",
        type=positive_count,
        metavar="N",
        help="end a completed migration with SHUT(N), an error, instead of SHUT(0) "
        "(default: SHUT(0))",
    )


def destination_misbehaviour(args: Any) -> Misbehaviour | None:
    """The knobs the options ask for; None when none is set."""
    from qmig.runner.misbehave import Misbehaviour

    misbehaviour = Misbehaviour(
        reject=args.reject,
        stall_after=args.stall_after,
        stall_after_pages=args.stall_after_pages,
        stall_for=args.stall_for,
        delay_requests=args.delay_requests / 1000,
        shut_status=args.shut_status,
    )
    return misbehaviour if misbehaviour.active else None


def add_source_knobs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "misbehaving on purpose", "make this source fail as a real one can, for tests"
    )
    group.add_argument(
        "--stall-after",
        type=count,
        metavar="BYTES",
        help="stop sending after BYTES bytes of the stream (default: never)",
    )
    group.add_argument(
        "--stall-for",
        type=seconds,
        metavar="SECONDS",
        help="how long the stall lasts, then sending goes on (default: for good)",
    )
    group.add_argument(
        "--cut-after-pages",
        type=positive_count,
        metavar="N",
        help="close the channel once N postcopy pages were sent, with no resume (for a cut "
        "that recovers: --pause-after with --resume-to) (default: never)",
    )
    group.add_argument(
        "--corrupt",
        choices=CORRUPTIBLE_NAMES,
        metavar="COMMAND",
        help="send this command (its first one) with a length it cannot have, which QEMU "
        f"refuses: one of {', '.join(CORRUPTIBLE_NAMES)} (default: none)",
    )


def source_misbehaviour(args: Any, version: str | None) -> SourceMisbehaviour | None:
    """The knobs the options ask for; None when none is set."""
    from qmig.runner.misbehave_source import SourceMisbehaviour

    misbehaviour = SourceMisbehaviour(
        version=version,
        stall_after=args.stall_after,
        stall_for=args.stall_for,
        cut_after_pages=args.cut_after_pages,
        corrupt=args.corrupt,
    )
    return misbehaviour if misbehaviour.active else None
