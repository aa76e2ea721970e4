"""The ``chromium`` fixture: Debian's chromium, or a failure in CI (which installs it)."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (scripts/setup installs Debian's chromium)"
        if os.environ.get("CI"):  # CI installs it: missing there is a failure
            pytest.fail(message)
        pytest.skip(message)
    return found
