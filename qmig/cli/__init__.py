"""The ``qmig`` command line: one program, one subcommand per module in ``qmig.cli.commands``.

Each subcommand module defines ``register(subparsers) -> None``, which adds its parser and sets
``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code). Errors derived
from :class:`qmig.errors.QmigError` become one line on stderr and exit status 1; nothing ends
in a traceback.

Start-up time is part of every command's cost (``qmig inspect`` on a stream is measured
against ``cat``), so only the chosen command's module is imported. :data:`COMMANDS` names
every subcommand with its one-line help, which is all ``qmig --help`` needs;
``tests/test_cli.py`` checks that the table matches the modules and their own help.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from qmig import __version__
from qmig.cli.options import EXIT_ERROR, Parser, add_json, print_error
from qmig.errors import QmigError

__all__ = ["COMMANDS", "EXIT_ERROR", "add_json", "add_qemu_version", "build_parser", "main"]

COMMANDS_PACKAGE = "qmig.cli.commands"
PROG = "qmig"
DESCRIPTION = "QEMU live-migration stream simulator"

# name -> the help line its module's register() gives (kept equal by tests/test_cli.py)
COMMANDS: dict[str, str] = {
    "capture": "relay a migration between two QEMUs and record both directions",
    "doctor": "check that this host supports postcopy (userfaultfd, huge pages, mlock, THP)",
    "export-pcap": "write a capture as pcapng for Wireshark, and the Lua dissector that decodes it",
    "fuzz": "fuzz qmig's parsers and destination, or diff its verdicts with a real QEMU's",
    "inspect": "decode a recorded migration stream (and its return path) record by record",
    "qemu-faults": "time a QEMU destination's postcopy faults from its trace log",
    "receive": "be the destination of a real QEMU migration (postcopy or precopy)",
    "replay": "replay a recorded migration into a real QEMU destination",
    "simulate": "run a full, verified postcopy migration between a qmig source and destination",
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and registers its full parser.

    Every other subcommand gets a placeholder with its help line, enough for ``--help`` and
    for argparse's "invalid choice" message. ``command=None`` leaves them all placeholders.
    """
    parser = Parser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"qmig {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_line in COMMANDS.items():
        if name == command:
            load_command(name).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_line)
    return parser


def overview() -> str:
    """What ``qmig`` alone and ``qmig --help`` print: every command, one line each."""
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: {PROG} COMMAND [OPTIONS]",
        "",
        DESCRIPTION,
        "",
        "commands:",
        *(f"  {name:<{width}}  {help_line}" for name, help_line in COMMANDS.items()),
        "",
        f"'{PROG} COMMAND --help' shows a command's options; '{PROG} --version' qmig's version.",
    ]
    return "\n".join(lines) + "\n"


def load_command(name: str) -> ModuleType:
    """The module of one subcommand (imported on demand)."""
    import importlib

    return importlib.import_module(f"{COMMANDS_PACKAGE}.{name.replace('-', '_')}")


def fail(message: str) -> int:
    return print_error(message)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if not words or words[0] in ("-h", "--help"):
        sys.stdout.write(overview())
        return 0
    first = next((word for word in words if not word.startswith("-")), None)
    if first is not None and first not in COMMANDS:
        return fail(f"{first}: no such command (commands: {', '.join(COMMANDS)})")
    parser = build_parser(chosen_command(words))
    try:
        args = parser.parse_args(words)
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except QmigError as error:
        hint = getattr(error, "hint", None)
        return fail(error.one_line() + (f"; {hint}" if hint else ""))
    except KeyboardInterrupt:
        return fail("interrupted")
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as error:
        return fail(f"{error.filename or 'I/O'}: {error.strerror or error}")
    except Exception as error:
        # A bug in qmig, not bad input: still one line and a non-zero exit, as promised to
        # scripts, with the traceback one environment variable away.
        if os.environ.get("QMIG_TRACEBACK"):
            raise
        where = _innermost_frame(error)
        return fail(
            f"internal error: {type(error).__name__}: {error} ({where}; "
            "set QMIG_TRACEBACK=1 for the traceback)"
        )


def _innermost_frame(error: BaseException) -> str:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return "unknown place"
    code = traceback.tb_frame.f_code
    return f"{os.path.basename(code.co_filename)}:{traceback.tb_lineno} in {code.co_name}"


def add_qemu_version(
    parser: argparse.ArgumentParser, auto: str | None = "detect it from the stream"
) -> None:
    """``--qemu-version``: the wire profile of every command that reads or writes the wire.

    ``auto`` says what ``auto`` (the default) means for this command; None: the default
    profile (for commands that only write).
    """
    from qmig.wire.profiles import DEFAULT_VERSION, available_versions

    known = ["auto", *available_versions()]
    auto = auto or f"the default profile, {DEFAULT_VERSION}"

    def version(text: str) -> str:
        if text not in known:
            raise argparse.ArgumentTypeError(
                f"unknown QEMU version {text!r} (known: {', '.join(known)})"
            )
        return text

    parser.add_argument(
        "--qemu-version",
        type=version,
        metavar="V",
        default="auto",
        help=f"QEMU wire profile: {', '.join(known)}; auto: {auto} (default: auto)",
    )
