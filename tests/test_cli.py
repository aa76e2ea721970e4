"""The ``qmig`` command line: its command table, what starting it costs, and its errors.

Only the chosen subcommand's module is imported (``qmig.cli.COMMANDS`` lists them all with
their help), so ``qmig --version`` and ``qmig inspect`` do not pay for what they do not use:
construct, rich, the capture relay, hypothesis, qemu.qmp.
"""

from __future__ import annotations

import argparse
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmig import __version__
from qmig.cli import COMMANDS, build_parser, load_command
from qmig.cli import commands as commands_package

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action.help for action in subparsers._choices_actions}


def test_the_table_names_every_command_module() -> None:
    modules = {info.name for info in pkgutil.iter_modules(commands_package.__path__)}
    assert {name.replace("-", "_") for name in COMMANDS} == modules


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_table_gives_each_command_its_own_help(name: str) -> None:
    # The full parser, registered by the module, and the placeholder agree.
    assert subcommand_help(build_parser(name))[name] == COMMANDS[name]
    assert subcommand_help(build_parser())[name] == COMMANDS[name]
    assert callable(load_command(name).register)


def imported_modules(*args: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules ``python -m qmig ARGS`` imports (from -X importtime), and its result."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qmig", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    modules = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip())
    return modules, result


HEAVY = ("construct", "rich", "hypothesis", "qemu", "qmig.capture", "cffi", "qmig.wire")


def heavy(modules: set[str], allowed: tuple[str, ...] = ()) -> set[str]:
    return {
        name
        for name in modules
        if any(name == h or name.startswith(h + ".") for h in HEAVY)
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    }


def test_version_imports_nothing_heavy() -> None:
    modules, result = imported_modules("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"qmig {__version__}"
    assert heavy(modules) == set()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_command_s_help_imports_only_what_its_parser_needs(name: str) -> None:
    modules, result = imported_modules(name, "--help")
    assert result.returncode == 0, result.stderr
    # --qemu-version lists the profiles: loading one checks its tables (profile_spec) and its
    # command and message names against the message classes, and nothing more.
    assert heavy(modules) <= {
        "qmig.wire",
        "qmig.wire.profiles",
        "qmig.wire.profile_spec",
        "qmig.wire.multifd_profile",
        "qmig.wire.messages",
    }


def test_inspect_json_of_a_stream_file_needs_no_rich_and_no_capture(tmp_path: Path) -> None:
    import lzma

    stream = tmp_path / "stream.bin"
    stream.write_bytes(lzma.decompress((FIXTURES / "precopy-file" / "stream.bin.xz").read_bytes()))
    modules, result = imported_modules("inspect", "--qemu-version", "7.2", "--json", str(stream))
    assert result.returncode == 0, result.stderr[-2000:]
    assert heavy(modules, allowed=("construct", "cffi", "qmig.wire")) == set()


def test_an_unknown_command_is_one_error_line() -> None:
    _, result = imported_modules("no-such-command")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time")]
    assert errors == [
        "qmig: error: no-such-command: no such command (commands: " + ", ".join(COMMANDS) + ")"
    ]


def test_a_truncated_stream_is_one_error_line(tmp_path: Path) -> None:
    import lzma

    data = lzma.decompress((FIXTURES / "precopy-file" / "stream.bin.xz").read_bytes())
    stream = tmp_path / "cut.bin"
    stream.write_bytes(data[:100_000])
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", "--qemu-version", "7.2", "--json", str(stream)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmig: error: ")
    assert "unexpected end of stream at byte" in lines[0]
