"""Run a userfaultfd scenario in its own process, under a hard timeout.

userfaultfd turns mistakes into freezes, not exceptions. Running each scenario in a child
process that is killed after ``timeout`` seconds turns a freeze into a test failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCENARIOS = Path(__file__).with_name("ram_uffd_scenarios.py")
ROOT = Path(__file__).resolve().parents[2]

# With grant_device: a private mount namespace in which a node of the same device, open to
# everyone, is bind-mounted over /dev/userfaultfd. The host's node is left alone.
GRANT_DEVICE = (
    'set -e; dir=$(mktemp -d); mount -t tmpfs none "$dir"; '
    'mknod "$dir/uffd" c "$1" "$2"; chmod 666 "$dir/uffd"; '
    'mount --bind "$dir/uffd" /dev/userfaultfd; shift 2; exec "$@"'
)


class Frozen(AssertionError):
    """The scenario did not finish in time: it is stuck, probably blocked on a missing page."""


def as_user(user: int | None, command: list[str], *, grant_device: bool = False) -> list[str]:
    """``command`` run as ``user`` (uid and gid, no supplementary groups), via setpriv,
    optionally with access to /dev/userfaultfd granted (see GRANT_DEVICE)."""
    if user is None:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to run as an unprivileged user")
    probe = [setpriv, f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    runs = subprocess.run([*probe, sys.executable, "-c", "import qmig"], capture_output=True)
    if runs.returncode:
        pytest.skip(f"uid {user} cannot run {sys.executable} with qmig")
    if not grant_device:
        return [*probe, *command]
    device = Path("/dev/userfaultfd")
    if not device.exists():
        pytest.skip("this kernel has no /dev/userfaultfd (Linux 6.1 or later)")
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a mount namespace here (unshare --mount needs CAP_SYS_ADMIN)")
    rdev = device.stat().st_rdev
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", GRANT_DEVICE, "sh"]
    return [*unshare, str(os.major(rdev)), str(os.minor(rdev)), *probe, *command]


def run_scenario(
    name: str, timeout: float = 60.0, user: int | None = None, *, grant_device: bool = False
) -> dict[str, Any]:
    command = as_user(user, [sys.executable, str(SCENARIOS), name], grant_device=grant_device)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as expired:
        raise Frozen(f"scenario {name} froze for {timeout} s: {expired.stderr!r}") from None
    assert done.returncode == 0, f"scenario {name} failed:\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"scenario {name} printed nothing:\n{done.stderr}"
    found: dict[str, Any] = json.loads(lines[-1])
    if "skip" in found:
        pytest.skip(found["skip"])
    assert "error" not in found, found["error"]
    return found
