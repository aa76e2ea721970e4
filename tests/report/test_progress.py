"""Progress lines on stderr: shown on a terminal, quiet with --json or when stderr is not one.

stderr is a real pseudo-terminal here, as a user's shell gives it, and what qmig wrote to it
is read back from the terminal's other end.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys

import pytest

pytestmark = pytest.mark.uffd
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def simulate_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """``qmig simulate ARGS`` with stderr on a terminal: (exit status, stdout, stderr text)."""
    return on_a_terminal("-m", "qmig", "simulate", "--ram", "64M", *args)


def on_a_terminal(*args: str) -> tuple[int, str, str]:
    """``python ARGS`` with stderr on a terminal: (exit status, stdout, stderr text)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("CI", None)  # rich turns animations off on CI
    process = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    seen = bytearray()
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            process.kill()
            pytest.fail(f"{args} did not finish")
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        seen += data
    os.close(leader)
    assert process.stdout is not None
    stdout = process.stdout.read().decode()
    return process.wait(timeout=60), stdout, ANSI.sub("", seen.decode(errors="replace"))


def test_a_terminal_sees_the_phase_and_the_bytes() -> None:
    code, stdout, stderr = simulate_on_a_terminal("--bandwidth", "256")
    assert code == 0
    assert "precopy" in stderr and "MiB" in stderr
    assert "MiB/s" in stderr
    assert "verified" in stdout


def test_json_keeps_a_terminal_quiet() -> None:
    code, stdout, stderr = simulate_on_a_terminal("--json")
    assert code == 0 and stdout.startswith("{")
    assert stderr.strip() == ""


def test_a_pipe_gets_no_progress() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qmig", "simulate", "--ram", "64M", "--bandwidth", "256"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


# Work that does not report its own progress (receive's runner, capture's relay) is polled:
# each phase's bytes so far, every 0.2 s, drawn as one line per phase.
POLLED = """
import sys, time
from qmig.cli.progress import PhaseProgress
done = {"stream": 0, "return path": 0}
def poll():
    return dict(done)
with PhaseProgress(quiet=sys.argv[1] == "quiet").shown(poll):
    for step in range(8):
        done["stream"] += 3 << 20
        done["return path"] += 512
        time.sleep(0.1)
"""


def test_polled_progress_shows_each_phase_on_a_terminal() -> None:
    code, _, stderr = on_a_terminal("-c", POLLED, "show")
    assert code == 0
    assert "stream" in stderr and "return path" in stderr and "MiB" in stderr
    code, _, stderr = on_a_terminal("-c", POLLED, "quiet")
    assert code == 0 and stderr.strip() == ""
