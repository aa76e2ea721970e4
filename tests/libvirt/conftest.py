"""What the libvirt tests need from the host: Debian's libvirt for the real save images, the
lzop program and the zstandard package for those two formats. CI installs all of them
(scripts/setup, the dev extra): missing there, they fail; elsewhere the tests that need them
are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"


def _missing(item: pytest.Item) -> str | None:
    if item.path.name == "test_libvirt_real.py":
        for program in ("libvirtd", "virsh", "setpriv"):
            if shutil.which(program, path=SBIN) is None:
                return f"{program} is not installed (scripts/setup installs it)"
    if "[lzop]" in item.nodeid and shutil.which("lzop") is None:
        return "lzop is not installed"
    if "[zstd]" in item.nodeid and importlib.util.find_spec("zstandard") is None:
        return "the zstandard package is not installed (pip install -e '.[libvirt]')"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("CI"):
        return
    for item in items:
        if item.path.is_relative_to(HERE) and (reason := _missing(item)) is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
