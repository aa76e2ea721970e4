"""The source's deliberate cut (``--pause-after``) with the C answer thread running: the thread
is stopped before the main socket it reads (and, without preempt, writes) is closed, so it
never meets a closed descriptor, or one the process has handed to another file since. The
thread may be waiting for the wire when the cut comes due, inside a write of the loop's that
holds it: the run still recovers every time (stopping it there would never join it).

The runs are in a child process, counting the answer threads alive at each cut through the
classes that start and stop them."""

from __future__ import annotations

from typing import Any

import pytest
import simulating
from in_child import run_script

pytestmark = pytest.mark.uffd
PAUSES = 2

IN_PROCESS = """
import json, sys
from qmig.runner import answer, channels
from qmig.simulate import SimulationConfig, run_simulation

MiB = 1 << 20
alive = [0]
at_cuts = []
start, stop, cut = answer.FastAnswer.__init__, answer.FastAnswer.stop, channels.Channels.cut

def started(self, *args, **kwargs):
    start(self, *args, **kwargs)
    alive[0] += 1
    self.counted = True

def stopped(self):
    if getattr(self, "counted", False):
        self.counted = False
        alive[0] -= 1
    return stop(self)

def cutting(self):
    at_cuts.append(alive[0])
    cut(self)

answer.FastAnswer.__init__ = started
answer.FastAnswer.stop = stopped
channels.Channels.cut = cutting
config = SimulationConfig(
    blocks=[("pc.ram", 64 * MiB)], postcopy_after=0, bandwidth=20 * MiB,
    pause_after=1000, pauses=%(pauses)d, preempt=%(preempt)s, version="10.0",
)
summary = run_simulation(config)
print(json.dumps({"summary": summary, "alive_at_cuts": at_cuts}))
"""


def cut_in_process(*, preempt: bool) -> dict[str, Any]:
    script = IN_PROCESS % {"pauses": PAUSES, "preempt": preempt}
    return run_script(script, timeout=simulating.TIMEOUT)


@pytest.mark.parametrize("preempt", [False, True], ids=["main-channel", "preempt-8.0"])
def test_the_answer_thread_is_stopped_before_the_channel_is_cut(preempt: bool) -> None:
    found = cut_in_process(preempt=preempt)
    summary = found["summary"]
    assert summary["verified"] is True
    assert summary["recoveries"] == PAUSES
    # A thread answered on every leg: one started at the switchover, one per recovery.
    assert summary["fast_answer"]["started"] == PAUSES + 1
    # Every cut came with no thread left running on the channel it closed.
    assert found["alive_at_cuts"] == [0] * PAUSES
