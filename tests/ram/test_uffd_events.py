"""A userfaultfd message that is no page fault reaches the fault thread as the event it is.

qmig asks the kernel for page faults only, but a descriptor may come with more features (one
handed over by another process). Here the descriptor asks for UFFD_FEATURE_EVENT_REMOVE, and
madvise(MADV_DONTNEED) on a registered block makes the kernel send a UFFD_EVENT_REMOVE for the
range (madvise returns once the fault thread has read it). Each of the three fault loops (the
Python one, the C loop serving an in-process source, the C loop sending page requests) must
report it as a REMOVE of that range, count it as no fault, put nothing on the return path,
and name it in the thread's error, in one line. Each run is a child process with a timeout:
a loop that never reads the event leaves madvise blocked.
"""

from __future__ import annotations

from typing import Any

import pytest
from in_child import run_script

pytestmark = pytest.mark.uffd
PAGE = 4096

SCRIPT = """
import json, socket, sys, time
from qmig.ram._uffd import lib
from qmig.ram.blocks import BlockSpec, RamBlocks
from qmig.ram.fault_requests import FaultRequests
from qmig.ram.faults import FaultThread
from qmig.ram.uffd import FEATURE_EVENT_REMOVE, FEATURE_THREAD_ID, Userfaultfd, probe
from qmig.wire.page_requests import PageRequests
from qmig.wire.schema import schema_for

loop = sys.argv[1]
if not probe().features & FEATURE_EVENT_REMOVE:
    print(json.dumps({"skip": "the kernel offers no UFFD_FEATURE_EVENT_REMOVE"}))
    sys.exit(0)
size = 1 << 20
uffd = Userfaultfd(want_features=FEATURE_THREAD_ID, need_features=FEATURE_EVENT_REMOVE)
blocks = RamBlocks([BlockSpec("pc.ram", size)])
blocks.attach(uffd)
options = {}
ours, theirs = socket.socketpair()
theirs.setblocking(False)
if loop == "served":
    options["sources"] = {"pc.ram": bytearray(size)}
elif loop == "requests":
    options["requests"] = FaultRequests(list(blocks), PageRequests(schema_for("10.0")))
reported = []
faults = FaultThread(uffd, blocks, on_stray=reported.append, **options).start()
if loop == "requests":
    options["requests"].enable(ours.fileno(), None)
start = blocks["pc.ram"].host_address + 16 * 4096
returned = lib.qmig_madvise(start, 8 * 4096, lib.MADV_DONTNEED)
deadline = time.monotonic() + 20
while not reported and time.monotonic() < deadline:
    time.sleep(0.002)
faults.stop()
stats = faults.stats()
try:
    wire = theirs.recv(1)
except BlockingIOError:
    wire = b""
print(json.dumps({
    "madvise": returned,
    "start": start,
    "reported": [[s.kind, s.address, s.end, s.is_fault, s.describe()] for s in reported],
    "faults": stats.faults,
    "strays": stats.stray_faults,
    "requests": stats.requests,
    "events": stats.events,
    "error": None if faults.error is None else str(faults.error),
    "wire": wire.hex(),
}))
blocks.detach()
uffd.close()
"""


def run_loop(loop: str) -> dict[str, Any]:
    found = run_script(SCRIPT, loop, timeout=60)
    if "skip" in found:
        pytest.skip(found["skip"])
    return found


@pytest.mark.parametrize("loop", ["python", "served", "requests"])
def test_an_event_that_is_no_page_fault_is_reported_as_what_it_is(loop: str) -> None:
    found = run_loop(loop)
    assert found["madvise"] == 0
    start, end = found["start"], found["start"] + 8 * PAGE
    described = f"UFFD_EVENT_REMOVE of 0x{start:x}-0x{end:x}"
    assert found["reported"] == [["REMOVE", start, end, False, described]]
    # No fault, no stray fault, no request: one event of its kind.
    assert (found["faults"], found["strays"], found["requests"]) == (0, 0, 0)
    assert found["events"] == {"REMOVE": 1}
    assert found["wire"] == ""
    assert found["error"] == (
        f"userfaultfd: {described} in block pc.ram: registered guest RAM changed under the "
        "fault thread (only page faults are served)"
    )
