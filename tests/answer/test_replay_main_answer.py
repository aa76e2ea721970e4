"""``qmig replay`` into real QEMU 7.2 and 10.0 destinations in postcopy without preempt, the
requested pages written on the main channel by the source's C answer thread, the background
pages by the C sweep beside it (and, for the comparison, by the Python loop with
``--no-fast-sweep``, and everything by it with ``--no-fast-answer``): the migration
completes, the destination's guest runs on and the counter oracle accepts its memory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from processes import qmig
from qemu_helpers import POSTCOPY, TIMEOUT, MachineFactory, check_guest_runs_on
from qemu_recovery import replay_destination

VERSIONS = [pytest.param(None, "7.2", id="7.2"), pytest.param("10.0", "10.0", id="10.0")]


@pytest.mark.qemu
@pytest.mark.parametrize(("version", "wire"), VERSIONS)
@pytest.mark.parametrize("paths", ["c-sweep", "c-thread", "python-loop"])
def test_requested_pages_on_the_main_channel_into_real_qemu(
    machines: MachineFactory, tmp_path: Path, version: str | None, wire: str, paths: str
) -> None:
    capture, _, spec = POSTCOPY
    dest, uri = replay_destination(machines, version)
    # Capped, so that the destination's guest outruns the stream and asks for pages.
    args = ["--json", "--bandwidth", "32", "--postcopy-after", "0"]
    args += {"c-sweep": [], "c-thread": ["--no-fast-sweep"], "python-loop": ["--no-fast-answer"]}[
        paths
    ]
    done = subprocess.run(
        qmig("replay", str(capture), "--to", uri, "--qemu-version", wire, *args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    info = check_guest_runs_on(dest, spec, tmp_path)
    assert info["status"] == "completed"
    assert summary["mode"] == "postcopy" and summary["preempt"] is None
    assert summary["requests"] > 0, "the destination's guest asked for pages"
    assert summary["request_to_sent_us"]["count"] == summary["requests"]
    answered = summary["fast_answer"]
    if paths == "c-sweep":
        # The sweep spends each window's quota at once: the thread answers what comes while
        # it runs, the rest waits for the next window, and is the loop's (QEMU checks the
        # rate before its RAM loop runs).
        assert 0 < answered["swept_pages"] <= summary["postcopy_pages"]
        assert answered["pages"] <= summary["requested_pages"]
    elif paths == "c-thread":
        assert "swept_pages" not in answered
        assert 0 < answered["pages"] <= summary["requested_pages"]
    else:
        assert answered == {}
