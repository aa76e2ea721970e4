"""Verification finds the pages where the destination's RAM is not the source's final copy.

The comparison reads the destination process's memory directly (``Peer.compare``), or has
the destination send it down its stdout where the host refuses that. Here the source changes
pages once the migration is over, so its final copy differs from what it sent, and exactly
those pages must be reported, first one named, the run failing, either way.
"""

from __future__ import annotations

import pytest

from qmig.errors import VerificationError
from qmig.runner.peer import Peer
from qmig.runner.source import SourceRunner
from qmig.simulate import SimulationConfig, run_simulation

pytestmark = pytest.mark.uffd
PAGE = 4096


@pytest.mark.parametrize("direct", [True, False], ids=["read-directly", "sent-down-stdout"])
def test_pages_changed_after_they_were_sent_are_reported(
    monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    compare = Peer.compare
    monkeypatch.setattr(
        Peer, "compare", lambda self, blocks, report: compare(self, blocks, report, direct=direct)
    )
    run = SourceRunner.run
    changed = [5, 77, 1000]

    def run_then_change(self: SourceRunner) -> object:
        report = run(self)
        memory = self.source.blocks[0].ram
        for page in changed:
            memory[page * PAGE + 100] ^= 0xFF
        return report

    monkeypatch.setattr(SourceRunner, "run", run_then_change)
    config = SimulationConfig(blocks=[("pc.ram", 8 << 20)], vcpus=1, dirty_rate=0.0)
    with pytest.raises(VerificationError) as caught:
        run_simulation(config)
    assert caught.value.detail == (
        f"{len(changed)} pages differ between source and destination; "
        f"first: pc.ram page {changed[0] * PAGE:#x}"
    )


def test_ram_sent_down_stdout_verifies_when_nothing_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compare = Peer.compare
    monkeypatch.setattr(
        Peer, "compare", lambda self, blocks, report: compare(self, blocks, report, direct=False)
    )
    config = SimulationConfig(blocks=[("pc.ram", 8 << 20), ("vga.vram", 1 << 20)], vcpus=1)
    assert run_simulation(config)["mismatched_pages"] == 0
