"""Running Debian's tshark on pcapng files written by ``qmig export-pcap``, with qmig's dissector,
and `qmig` itself, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
# Every shipped recording: the capture folders, and the bare stream of the vmstate tests.
CAPTURES = ["postcopy-tcp", "postcopy-sparse", "precopy-file", "precopy-known"]
RECORDINGS = [*CAPTURES, "vmstate/precopy-16M.mig.xz"]
FIXTURE_QEMU = "7.2"  # the QEMU that made them
# Records the dissector shows that `qmig inspect`'s counts leave out.
UNCOUNTED = {"EOS", "HOOK", "MULTIFD_FLUSH"}


def qmig(*args: str) -> subprocess.CompletedProcess[str]:
    """The qmig command line, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "qmig", *args], capture_output=True, text=True, timeout=600
    )


def qmig_ok(*args: str) -> str:
    result = qmig(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def export(recording: Path, out: Path, *options: str) -> Path:
    qmig_ok("export-pcap", str(recording), str(out), *options)
    return out


def run_tshark(
    tshark: str, lua: Path, pcapng: Path, fields: list[str], *options: str
) -> list[list[list[str]]]:
    """Per packet, per field, every occurrence of it (``-T fields``)."""
    result = subprocess.run(
        [
            tshark,
            "-n",
            "-X",
            f"lua_script:{lua}",
            "-r",
            str(pcapng),
            *options,
            "-T",
            "fields",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=\x1f",
            *(arg for field in fields for arg in ("-e", field)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "Lua" not in result.stderr, result.stderr  # a script error is only a warning line
    rows = []
    for line in result.stdout.splitlines():
        cells = line.split("\t")
        rows.append([[v for v in cell.split("\x1f") if v] for cell in cells])
    return rows


def column(rows: list[list[list[str]]], index: int) -> list[str]:
    return [value for row in rows for value in (row[index] if index < len(row) else [])]


def dissected_counts(
    tshark: str, lua: Path, pcapng: Path, *options: str
) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """(stream counts as `qmig inspect` counts them, return-path counts, undecoded bytes)."""
    rows = run_tshark(
        tshark,
        lua,
        pcapng,
        ["qmig.record", "qmig.cmd", "qmig.rp.message", "qmig.undecoded"],
        *options,
    )
    stream = Counter(name for name in column(rows, 0) if name not in UNCOUNTED)
    commands = len(column(rows, 1))
    if commands:
        stream["COMMAND"] = commands
    return_path = Counter(column(rows, 2))
    return dict(stream), dict(return_path), column(rows, 3)


def inspect_json(recording: Path, version: str = FIXTURE_QEMU) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        qmig_ok("inspect", str(recording), "--qemu-version", version, "--json")
    )
    return document
