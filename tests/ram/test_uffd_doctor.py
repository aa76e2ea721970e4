"""``qmig doctor`` on this host, and as a user without access."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ram_uffd_harness import as_user

pytestmark = pytest.mark.uffd

NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]


def doctor(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_user(user, [sys.executable, "-m", "qmig", "doctor", *args]),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_doctor_json_runs_every_check() -> None:
    done = doctor("--json", "--page-size", "2M")
    report = json.loads(done.stdout)
    names = [check["name"] for check in report["checks"]]
    for name in ("userfaultfd", "API handshake", "range ioctls", "mlock", "transparent huge pages"):
        assert name in names
    if not report["ok"]:
        pytest.skip(f"this host cannot do postcopy: {report['errors']}")
    assert done.returncode == 0
    assert "huge pages 2 MiB" in names
    ioctls = next(check for check in report["checks"] if check["name"] == "range ioctls")
    assert {"WAKE", "COPY", "ZEROPAGE"} <= set(ioctls["data"]["ioctls"])


def test_doctor_without_access_fails_in_one_clear_line() -> None:
    done = doctor("--json", user=NOBODY)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["ok"] is False
    assert done.stderr.startswith("qmig: error: userfaultfd: not available: ")
    assert "run as root" in done.stderr and done.stderr.count("\n") == 1


def test_doctor_table_names_its_checks() -> None:
    done = doctor()
    assert "postcopy host support" in done.stdout and "transparent huge pages" in done.stdout


def test_doctor_rejects_a_page_size_that_is_no_power_of_two() -> None:
    done = doctor("--page-size", "3M")
    assert done.returncode == 1 and "power-of-two" in done.stderr
