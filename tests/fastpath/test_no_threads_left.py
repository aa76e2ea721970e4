"""A destination run that keeps its RAM for the caller keeps it only after a migration that
ended well: one whose preempt channel fails at its very end (its main stream complete) stops
its fault thread like any other failed run, rather than leaving it running in the caller's
process."""

from __future__ import annotations

from preempt_harness import run_preempt
from test_preempt_agreement import page, stream_for
from thread_names import left, named

from qmig.protocol.preempt import PreemptVariant


def test_a_preempt_channel_cut_short_at_the_end_leaves_no_fault_thread() -> None:
    variant = PreemptVariant.PRE_7_2
    earlier = named("qmig-faults", timeout=0)
    outcome = run_preempt(variant, stream_for(variant), page(variant, 3)[:100], fast_path=True)
    assert outcome.error is not None and "preempt channel" in outcome.error
    assert not left("qmig-faults", named("qmig-faults", timeout=0, besides=earlier))
