"""The ``qmig`` command line: one program, one subcommand per module in ``qmig.cli.commands``.

Each subcommand module defines ``register(subparsers) -> None``, which adds its parser and sets
``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code). Errors derived
from :class:`qmig.errors.QmigError` become one line on stderr and exit status 1; nothing ends
in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from qmig import __version__
from qmig.errors import QmigError

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmig", description="QEMU live-migration stream simulator"
    )
    parser.add_argument("--version", action="version", version=f"qmig {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from qmig.cli import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def fail(message: str) -> int:
    print(f"qmig: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QmigError as error:
        return fail(error.one_line())
    except KeyboardInterrupt:
        return fail("interrupted")
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as error:
        return fail(f"{error.filename or 'I/O'}: {error.strerror or error}")


def add_qemu_version(parser: argparse.ArgumentParser) -> None:
    """``--qemu-version``: the wire profile of every command that reads or writes the wire."""
    from qmig.wire.profiles import DEFAULT_VERSION, available_versions

    parser.add_argument(
        "--qemu-version",
        metavar="V",
        default=None,
        help=f"QEMU wire profile: {', '.join(available_versions())} (default {DEFAULT_VERSION})",
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead"
    )
