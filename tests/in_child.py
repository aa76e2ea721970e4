"""A Python script run in a child process (its own address space, threads and userfaultfd
descriptors), which prints one JSON document as its last line of output."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_script(script: str, *args: str, timeout: float) -> dict[str, Any]:
    """Run ``script`` with ``args``; it must exit 0. The JSON document it printed last."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found
