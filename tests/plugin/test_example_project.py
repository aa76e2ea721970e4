"""The plugin as an outside project uses it: the example project's tests, which know nothing
of qmig's own test suite, run in a separate pytest through the ``pytest11`` entry point
against real QEMU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
EXAMPLE = HERE / "example_project"
CAPTURE = HERE.parents[1] / "fixtures" / "postcopy-tcp"


def run_example(tmp_path: Path, *select: str) -> subprocess.CompletedProcess[str]:
    """pytest on a copy of the example project, outside this repository (no conftest, no
    pyproject of ours: only the installed plugin gives it fixtures)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_migrations.py").write_text((EXAMPLE / "test_migrations.py").read_text())
    environment = {**os.environ, "QMIG_EXAMPLE_CAPTURE": str(CAPTURE)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *select],
        cwd=project, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.qemu
def test_the_example_project_migrates_real_qemu_through_misbehaving_peers(
    tmp_path: Path,
) -> None:
    result = run_example(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout, result.stdout[-4000:]
