"""Fixtures of the Wireshark tests: tshark, and the dissector of each QEMU version.

CI installs tshark with ``scripts/setup``; the tshark tests run whenever it is installed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from dissecting import qmig_ok


@pytest.fixture(scope="session")
def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        if os.environ.get("CI"):  # scripts/setup installs it there: its absence is a failure
            pytest.fail("tshark is not installed: run scripts/setup")
        pytest.skip("tshark is not installed (scripts/setup installs it)")
    return path


@pytest.fixture(scope="session")
def lua_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The dissector for a QEMU version, written once by ``qmig export-pcap --lua``."""
    made: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("lua")

    def make(version: str) -> Path:
        if version not in made:
            path = folder / f"qmig-{version}.lua"
            qmig_ok("export-pcap", "--lua", str(path), "--qemu-version", version)
            made[version] = path
        return made[version]

    return make
