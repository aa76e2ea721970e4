"""The destination fails with its fault thread's error, in one line, when that thread met one.

qmig's descriptors ask for page faults only, so here the runner asks for
UFFD_FEATURE_EVENT_REMOVE as well (``uffd_events``), as a descriptor handed over may have it.
Once the guest runs here, madvise(MADV_DONTNEED) on its registered RAM makes the kernel send
a UFFD_EVENT_REMOVE (madvise returns once the fault thread has read it): the fault thread
keeps it as its error, and the migration, which goes on to complete, ends in that error
instead of a success; and where a vCPU is left blocked as well (its page never comes), in
that error rather than the workload's timeout. For the fault thread that sends page requests
from C (the fast path) and for the Python one. Each run is a child process with a timeout: a
loop that never reads the event leaves madvise blocked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from in_child import run_script

pytestmark = pytest.mark.uffd
PAGE = 4096
HARNESS = Path(__file__).resolve().parents[1] / "fastpath"

SCRIPT = """
import json, socket, sys, threading, time
sys.path.insert(0, sys.argv[2])
from fastpath_harness import after_run
from qmig.errors import QmigError
from qmig.protocol.destination import Destination
from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.ram._uffd import lib
from qmig.ram.uffd import FEATURE_EVENT_REMOVE, probe
from qmig.ram.workload import Workload
from qmig.runner.destination import DestinationRunner
from qmig.runner.source_ram import GuestRam
from qmig.simulate import default_devices
from qmig.transport import Connection

if not probe().features & FEATURE_EVENT_REMOVE:
    print(json.dumps({"skip": "the kernel offers no UFFD_FEATURE_EVENT_REMOVE"}))
    sys.exit(0)


class Runner(DestinationRunner):
    uffd_events = FEATURE_EVENT_REMOVE


path, event, blocked = sys.argv[1], sys.argv[3] == "event", sys.argv[4] == "blocked"
# qmig's source, switched to postcopy at once: the whole stream, every page in the sweep but,
# with a blocked vCPU, the first, which it asks for and never gets (nobody answers).
ram = GuestRam.generate([("pc.ram", 4 << 20)], seed=1)
source = Source(ram.blocks, version="7.2", devices=default_devices(1))
source.start()
source.start_postcopy()
if blocked:
    source.by_name["pc.ram"].dirty[0] = 0
stream = source.data_to_send(0)
while source.state is SourceState.POSTCOPY:
    stream += source.data_to_send(1 << 20)
run_end = after_run(stream, "7.2")

ours, theirs = socket.socketpair()
runner = (Runner if event else DestinationRunner)(
    Connection("stream", ours),
    Destination("7.2"),
    fast_path=path == "fast",
    workload=Workload(touches=1) if blocked else None,  # the first page
    idle_timeout=3.0 if blocked else 30.0,
)
outcome = {}

def run():
    try:
        runner.run()
        outcome["error"] = None
    except QmigError as error:
        outcome["error"] = [type(error).__name__, str(error), error.one_line()]

def drain():
    while theirs.recv(1 << 16):
        pass

threading.Thread(target=drain, daemon=True).start()
destination = threading.Thread(target=run, daemon=True)
destination.start()
theirs.sendall(stream[:run_end])
deadline = time.monotonic() + 30
while runner.report.running_at is None and time.monotonic() < deadline:
    time.sleep(0.002)
start = runner.session.block("pc.ram").host_address + 16 * 4096
returned = lib.qmig_madvise(start, 8 * 4096, lib.MADV_DONTNEED) if event else None
theirs.sendall(stream[run_end:])
theirs.shutdown(socket.SHUT_WR)
destination.join(60)
print(json.dumps({
    "madvise": returned,
    "start": start,
    "ended": not destination.is_alive(),
    "running": runner.report.running_at is not None,
    "placed": runner.report.placed_pages,
    "error": outcome.get("error"),
}))
"""


def run_destination(path: str, *, event: bool, blocked: bool) -> dict[str, Any]:
    scene = ["event" if event else "none", "blocked" if blocked else "complete"]
    found = run_script(SCRIPT, path, str(HARNESS), *scene, timeout=120)
    if "skip" in found:
        if os.environ.get("CI"):
            pytest.fail(found["skip"])
        pytest.skip(found["skip"])
    assert found["running"] and found["ended"]
    # The stream went in whole: pages placed after RUN as well.
    assert found["placed"]["postcopy"] > 0
    return found


def removed(found: dict[str, Any]) -> str:
    """The fault thread's error for the range madvise removed, as one line."""
    assert found["madvise"] == 0
    start, end = found["start"], found["start"] + 8 * PAGE
    return (
        f"userfaultfd: UFFD_EVENT_REMOVE of 0x{start:x}-0x{end:x} in block pc.ram: registered "
        "guest RAM changed under the fault thread (only page faults are served)"
    )


PATHS = pytest.mark.parametrize("path", ["fast", "python"])


@PATHS
def test_a_fault_thread_error_is_the_migrations_error(path: str) -> None:
    found = run_destination(path, event=True, blocked=False)
    line = removed(found)
    assert found["error"] == ["UffdEventError", line, line]
    assert "\n" not in line


@PATHS
def test_it_comes_before_the_workloads_timeout(path: str) -> None:
    # A vCPU waits for a page that never comes: without the event, the workload's timeout
    # names it; with it, the fault thread's error is the likelier cause, and the one shown.
    found = run_destination(path, event=False, blocked=True)
    kind, line, _ = found["error"]
    assert kind == "TransportError" and line.startswith("guest workload: ")
    assert "pc.ram" in line and "\n" not in line
    found = run_destination(path, event=True, blocked=True)
    line = removed(found)
    assert found["error"] == ["UffdEventError", line, line]
