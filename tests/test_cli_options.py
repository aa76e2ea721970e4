"""One vocabulary for the command line: names, help, error lines, units and plurals.

Every option of every command has help text that ends with its default; the old spellings
of renamed options still parse; bad values and argparse's own usage errors are one line,
``qmig: error: WHAT: detail``, with exit status 1; ``qmig`` alone lists every command.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import processes
import pytest

from qmig.cli import COMMANDS, build_parser, main
from qmig.cli.options import HelpFormatter
from qmig.cli.text import plural
from qmig.sizes import format_size, parse_size

ROOT = Path(__file__).resolve().parents[1]


def command_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = subparsers.choices[name]
    return sub


def qmig(*args: str) -> subprocess.CompletedProcess[str]:
    return processes.run(*args, timeout=60, cwd=ROOT)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qmig: error: ")
    return lines[0]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    parser = command_parser(name)
    formatter = HelpFormatter(parser.prog)
    visible = {a.dest for a in parser._actions if a.help is not argparse.SUPPRESS}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.help is argparse.SUPPRESS:
            # Hidden options are old spellings: a visible option sets the same value.
            assert action.dest in visible, f"{name} {action.option_strings}: hidden, no alias"
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        takes_value = action.nargs != 0
        required = action.required or action in getattr(parser, "aliased_required", [])
        if action.option_strings and takes_value and not required:
            shown = formatter._get_help_string(action) or ""
            assert "default" in shown, f"{name} {action.option_strings}: default not shown"


def test_one_option_name_for_one_thing_across_commands() -> None:
    spellings: dict[str, set[str]] = {}
    for name in COMMANDS:
        for action in command_parser(name)._actions:
            if action.help is argparse.SUPPRESS or not action.option_strings:
                continue
            spellings.setdefault(action.option_strings[0], set()).add(str(action.metavar))
    # The same option takes the same placeholder wherever it appears.
    assert {flag: metavars for flag, metavars in spellings.items() if len(metavars) > 1} == {}
    assert "--to" not in spellings and "--extract" not in spellings
    assert {"--connect", "--dump-ram", "--qemu-version", "--json"} <= set(spellings)
    for name in ("capture", "fuzz", "inspect", "receive", "replay", "simulate"):
        flags = {flag for a in command_parser(name)._actions for flag in a.option_strings}
        assert "--qemu-version" in flags, name


def test_old_spellings_still_parse() -> None:
    replay = command_parser("replay").parse_args(["CAP", "--to", "tcp:127.0.0.1:1"])
    assert replay.connect == "tcp:127.0.0.1:1"
    inspect = command_parser("inspect").parse_args(["S", "--extract", "out"])
    assert inspect.dump_ram == Path("out")
    help_text = command_parser("replay").format_help()
    assert "--to" not in help_text and "--connect URI" in help_text
    # Still required (under either spelling) and still shown so in the usage line.
    assert command_parser("replay").format_usage().split("[-h] ")[1].startswith("--connect URI")


def test_an_old_spelling_runs_the_command(tmp_path: Path) -> None:
    result = qmig("replay", str(tmp_path / "nothing"), "--to", "tcp:127.0.0.1:1")
    assert one_error_line(result) == f"qmig: error: {tmp_path / 'nothing'}: no such file or folder"


def test_a_required_option_missing_under_both_spellings_is_one_line() -> None:
    line = one_error_line(qmig("replay", "CAP"))
    assert line == "qmig: error: replay: the following arguments are required: --connect"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["simulate", "--ram", "2X"], "--ram: not a size: '2X' (e.g. 4096, 64K, 2M, 1.5G)"),
        (["simulate", "--ram", "0"], "--ram: must be positive, not 0"),
        (["simulate", "--ram", "1.3"], "--ram: not a whole number of bytes: '1.3'"),
        (["simulate", "--vcpus", "two"], "--vcpus: not a whole number: 'two'"),
        (["simulate", "--dirty-rate", "-1"], "--dirty-rate: must be 0 or more, not -1"),
        (["simulate", "--workload", "x"], "--workload: invalid choice: 'x'"),
        (["receive", "--listen", "tcp::0", "--idle-timeout", "-1"], "--idle-timeout: must be"),
        (["doctor", "--page-size", "3M"], "--page-size: '3M' is not a power-of-two page size"),
        (["fuzz", "stream", "--time-limit", "soon"], "--time-limit: not a number of seconds"),
        (["inspect", "--qemu-version", "9.9", "S"], "--qemu-version: unknown QEMU version '9.9'"),
        (["inspect"], "inspect: the following arguments are required: STREAM"),
        (["inspect", "S", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["simulate", "--precopy-only", "--postcopy-after", "1"], "--postcopy-after: not allowed"),
    ],
)
def test_bad_values_are_one_line_and_exit_1(args: list[str], expected: str) -> None:
    line = one_error_line(qmig(*args))
    assert line.startswith(f"qmig: error: {expected}"), line
    assert "parse_size" not in line and "argument " not in line


def test_qmig_alone_lists_every_command_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    listed = [line.split(maxsplit=1) for line in out.splitlines() if line.startswith("  ")]
    assert {name: text for name, text in listed} == COMMANDS
    assert main(["--help"]) == 0
    assert capsys.readouterr().out == out


def test_doctor_help_is_plain_text() -> None:
    result = qmig("doctor", "--help")
    assert result.returncode == 0
    assert "``" not in result.stdout and ":func:" not in result.stdout
    assert "postcopy destination" in result.stdout


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("4k", 4096),
        ("64K", 64 << 10),
        ("2M", 2 << 20),
        ("2MiB", 2 << 20),
        ("2mb", 2 << 20),
        ("1G", 1 << 30),
        ("1.5G", 3 << 29),
        ("1T", 1 << 40),
        ("7B", 7),
    ],
)
def test_one_size_parser(text: str, size: int) -> None:
    from qmig.ram.support import parse_size as support_parse_size

    assert parse_size(text) == size
    assert support_parse_size is parse_size


@pytest.mark.parametrize("text", ["2X", "two megs", "", "-1", "2iB", "1.3", "2KK"])
def test_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="not a"):
        parse_size(text)


def test_iec_units_and_plurals() -> None:
    assert format_size(2 << 30) == "2 GiB"
    assert format_size(3 << 29) == "1.5 GiB"
    assert format_size(2048 << 20) == "2 GiB"
    assert format_size(512) == "512 B"
    assert plural(1, "pass", "passes") == "1 pass"
    assert plural(2, "pass", "passes") == "2 passes"
    assert plural(0, "page") == "0 pages"
    assert plural(1234, "byte") == "1,234 bytes"


def test_progress_columns_use_iec_units() -> None:
    from rich.progress import Progress

    from qmig.cli.text import transfer_columns

    done, speed = transfer_columns()
    with Progress(done, speed, disable=True) as progress:
        task_id = progress.add_task("x", total=2 << 30, completed=1 << 30)
        task = progress.tasks[task_id]
        assert "GiB" in str(done.render(task)) and "GB" not in str(done.render(task))
