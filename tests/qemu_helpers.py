"""Small helpers the QEMU recovery and preempt tests share: the qmig command line, a free
port for a recovery URI, and a QEMU version that must be there (a failure under CI, where
scripts/setup installs it; a skip elsewhere)."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from qmig.qemu.machine import qemu_install
from qmig.qemu.qmp import QemuError


def qmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmig", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(version: str | None) -> None:
    """QEMU ``version`` (None: the system's 7.2) is installed, or the test ends here."""
    if version is None:
        return
    try:
        qemu_install(version)
    except QemuError as error:
        if os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))
