#!/usr/bin/env python3
"""Requests answered after a postcopy recovery with preempt: the source's C answer thread
against the Python loop.

Run as root (userfaultfd) from the repository::

    .venv/bin/python bench/answer_recovery_bench.py            # 5 seeds each, a minute
    .venv/bin/python bench/answer_recovery_bench.py --json

Each run is ``qmig simulate --preempt --pause-after 300 --pauses 2`` (QEMU 10.0, the 8.0
variant, 256 MiB), once with the C answer thread and once with ``--no-fast-answer``, per
seed. Figures per run: the summary's request legs (p50, µs: REQ_PAGES sent → read by the
source, read → its page written, written → placed on the destination) and fault latency,
and for the requests the destination sent after the last recovery alone
(:func:`qmig.simulate.after_last_recovery`): the source's read → written, and the
destination's request sent → page placed (p50/p99).

Nothing is asserted: the figures are printed. On a shared host they are noisy.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from qmig.latency import percentile_us as percentile_of_sorted
from qmig.report.recorder import Recorder
from qmig.simulate import SimulationConfig, after_last_recovery, run_simulation


def percentile_us(values: Sequence[int], fraction: float) -> float | None:
    return percentile_of_sorted(sorted(values), fraction) if values else None


def one_run(seed: int, *, fast: bool) -> dict[str, Any]:
    recorder = Recorder()
    config = SimulationConfig(
        preempt=True, pause_after=300, pauses=2, version="10.0", seed=seed, fast_answer=fast
    )
    summary = run_simulation(config, recorder=recorder)
    after = after_last_recovery(recorder.runs["source"], recorder.runs["destination"])
    served, waited = (after.served, after.placed) if after is not None else ([], [])

    def p50(name: str) -> float | None:
        figures = summary.get(name) or {}
        return figures.get("p50")

    return {
        "seed": seed,
        "fast_answer": summary["fast_answer"],
        "recoveries": summary["recoveries"],
        "total_s": summary["total_s"],
        "fault_latency_p50_us": p50("fault_latency_us"),
        "request_read_p50_us": p50("request_read_us"),
        "request_served_p50_us": p50("request_served_us"),
        "page_delivered_p50_us": p50("page_delivered_us"),
        "after_recovery": {
            "requests": len(served),
            "served_p50_us": percentile_us(served, 0.5),
            "served_p99_us": percentile_us(served, 0.99),
            "request_to_placed_p50_us": percentile_us(waited, 0.5),
            "request_to_placed_p99_us": percentile_us(waited, 0.99),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="seeds per side (default: 5)")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"c_thread": [], "python_loop": []}
    for seed in range(1, args.runs + 1):
        for side, fast in (("c_thread", True), ("python_loop", False)):
            run = one_run(seed, fast=fast)
            results[side].append(run)
            if not args.json:
                print(side, json.dumps(run), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
