"""The fuzzers' resource oracle: an input that costs too much memory or time is a finding,
reported (and for memory, minimised) like a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hostile_streams import S, device_section, small_opening

from qmig.fuzz.engine import NO_BUDGETS, Budgets, execute
from qmig.fuzz.targets import TARGETS
from qmig.wire import messages as m

VERSION = "7.2"
# Device state that waits for a description that never comes: the reader holds 8 MiB of it.
WAITING = small_opening() + device_section(bytes(9 << 20))


OVER_BUDGET = """
import json, sys
sys.path.insert(0, sys.argv[1])
from hostile_streams import device_section, small_opening
from qmig.fuzz.engine import Budgets, execute
from qmig.fuzz.targets import TARGETS
waiting = small_opening() + device_section(bytes(9 << 20))
outcome = execute(TARGETS["stream"], waiting, "7.2", budgets=Budgets(memory=4 << 20))
finding = outcome.finding
print(json.dumps(None if finding is None else [finding.kind, finding.signature, finding.summary]))
"""


def test_an_input_over_the_memory_budget_is_a_finding() -> None:
    # In a process of its own, as a campaign runs: see the campaign test below.
    done = subprocess.run(
        [sys.executable, "-c", OVER_BUDGET, str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    finding = json.loads(done.stdout)
    assert finding is not None
    kind, signature, summary = finding
    assert (kind, signature) == ("memory", "memory SECTION_FULL")
    assert "over the 4 MiB budget: rejected SECTION_FULL: record larger" in summary


def test_the_same_input_within_the_budget_is_a_verdict() -> None:
    outcome = execute(TARGETS["stream"], WAITING, VERSION, budgets=Budgets(memory=256 << 20))
    assert outcome.finding is None and outcome.verdict is not None
    assert outcome.verdict.what == "SECTION_FULL"


def test_an_input_over_the_time_budget_is_a_finding() -> None:
    # Far over the 0.01 s budget, far under the 2 s of CPU time that makes a run a hang.
    flood = small_opening() + S.build_command(m.Ping(1)) * 2_000
    outcome = execute(TARGETS["destination"], flood, VERSION, budgets=Budgets(seconds=0.01))
    assert outcome.finding is not None and outcome.finding.kind == "slow"
    assert outcome.finding.summary.startswith("took ")
    assert "over the 0.01 s budget" in outcome.finding.summary
    assert execute(TARGETS["destination"], flood, VERSION, budgets=NO_BUDGETS).finding is None


CAMPAIGN = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from hostile_streams import described_device, device_section, field, small_opening
from qmig.fuzz.engine import Budgets, Campaign
from qmig.fuzz.targets import TARGETS
small = described_device([field("a", "uint8", 1)], b"\\x01")
waiting = small_opening() + device_section(bytes(5 << 20))  # and then the stream ends
campaign = Campaign(
    TARGETS["stream"], [small, waiting], version="7.2", out=Path(sys.argv[1]), guided=False,
    budgets=Budgets(memory=4 << 20, seconds=None), minimise_seconds=3,
)
report = campaign.run(runs=2)
print(json.dumps({
    "waiting": len(waiting),
    "findings": [
        {"kind": f.kind, "signature": f.signature, "path": str(f.path), "size": len(f.data)}
        for f in report.findings
    ],
}))
"""


def test_a_campaign_reports_and_writes_a_memory_finding(tmp_path: Path) -> None:
    # A campaign is a process of its own, as `qmig fuzz` runs it: the memory an input costs
    # is read from that process's high-water mark, which a test suite's earlier tests (in
    # the same process) would blur.
    done = subprocess.run(
        [sys.executable, "-c", CAMPAIGN, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    (finding,) = result["findings"]
    assert finding["kind"] == "memory" and finding["path"] != "None"
    assert finding["signature"] == "memory SECTION_FULL"
    assert finding["size"] < result["waiting"]  # minimised while it still costs that much
    line = (tmp_path / "failures.txt").read_text().strip()
    assert "\tstream\tmemory\tpeak memory grew by" in line
