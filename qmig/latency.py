"""Latency figures as the summaries report them: percentiles of nanosecond samples, in µs."""

from __future__ import annotations

from collections.abc import Sequence


def percentile_us(ordered_ns: Sequence[int], fraction: float) -> float:
    """The sample at ``fraction`` of sorted ``ordered_ns``, in µs to 0.1 (0.0 when empty)."""
    if not ordered_ns:
        return 0.0
    return round(ordered_ns[min(len(ordered_ns) - 1, int(len(ordered_ns) * fraction))] / 1000, 1)


def percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """count, p50, p99 and max of ``samples_ns``, in µs."""
    ordered = sorted(samples_ns)
    return {
        "count": len(ordered),
        "p50": percentile_us(ordered, 0.5),
        "p99": percentile_us(ordered, 0.99),
        "max": percentile_us(ordered, 1.0),
    }
