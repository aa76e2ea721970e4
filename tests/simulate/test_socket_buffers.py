"""``qmig simulate --send-buffer / --receive-buffer``: sizes or the kernel's autotuning."""

from __future__ import annotations

import subprocess
import sys

import pytest
from simulating import verified

from qmig.cli import build_parser
from qmig.cli.commands.simulate import config_from
from qmig.simulate import SimulationConfig
from qmig.sizes import parse_size


def config(*words: str) -> SimulationConfig:
    return config_from(build_parser("simulate").parse_args(["simulate", *words]))


def test_unset_they_are_the_simulation_s_defaults() -> None:
    defaults = SimulationConfig()
    chosen = config()
    assert (chosen.send_buffer, chosen.receive_buffer) == (
        defaults.send_buffer,
        defaults.receive_buffer,
    )
    assert defaults.send_buffer is not None and defaults.receive_buffer is not None


def test_a_size_or_auto() -> None:
    chosen = config("--send-buffer", "auto", "--receive-buffer", "1M")
    assert (chosen.send_buffer, chosen.receive_buffer) == (None, 1 << 20)


@pytest.mark.parametrize("value", ["0", "-4K", "lots"])
def test_a_bad_size_is_one_error_line(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qmig", "simulate", "--receive-buffer", value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stderr.startswith("qmig: error: --receive-buffer: ")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.uffd
def test_autotuned_buffers_migrate_every_page() -> None:
    result = verified("--ram", "32M", "--send-buffer", "auto", "--receive-buffer", "auto")
    assert result["mode"] == "postcopy"
    assert result["postcopy"]["pages"] == result["discarded_pages"]


def test_the_help_names_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """--help states them without importing the simulation: it must say what it uses."""
    with pytest.raises(SystemExit):
        build_parser("simulate").parse_args(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = SimulationConfig()
    for option, value in (
        ("--send-buffer", defaults.send_buffer),
        ("--receive-buffer", defaults.receive_buffer),
    ):
        help_text = text[text.rindex(f"{option} SIZE|auto") :]  # its entry, not the usage
        stated = help_text[help_text.index("(default: ") + len("(default: ") :].split(")")[0]
        assert parse_size(stated) == value, option
