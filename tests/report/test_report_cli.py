"""``--report`` as a user meets it when it cannot be written: one line, non-zero, no file."""

from __future__ import annotations

import lzma
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "postcopy-tcp"


def run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


QMIG = "import sys; from qmig.cli import main; sys.exit(main(sys.argv[1:]))"
# As on a machine without the optional extra: importing plotly fails.
WITHOUT_PLOTLY = "import sys; sys.modules['plotly'] = None; " + QMIG


def test_without_plotly_the_report_names_the_extra(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    for command in (
        ["inspect", str(FIXTURE), "--qemu-version", "7.2"],
        ["simulate", "--ram", "32M"],
    ):
        done = run(WITHOUT_PLOTLY, *command, "--report", str(page))
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            "qmig: error: --report: needs plotly: pip install 'qmig[report]' "
            "(or pip install plotly)"
        ]
        assert not page.exists()


def test_inspect_report_needs_a_capture_folder(tmp_path: Path) -> None:
    stream = tmp_path / "stream.bin"
    stream.write_bytes(lzma.decompress((FIXTURE / "stream.bin.xz").read_bytes())[:4096])
    page = tmp_path / "report.html"
    done = run(QMIG, "inspect", str(stream), "--report", str(page))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "qmig: error: --report: needs a capture folder: its index.tsv times the chunks"
    )
    assert not page.exists()


def test_an_unwritable_report_is_one_line(tmp_path: Path) -> None:
    page = tmp_path / "missing" / "report.html"
    done = run(QMIG, "inspect", str(FIXTURE), "--qemu-version", "7.2", "--json", "--report",
               str(page))  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"qmig: error: {page}: cannot write the report:")
