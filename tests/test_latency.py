"""The latency figures every summary reports (receive, replay, simulate)."""

from __future__ import annotations

from qmig.latency import percentile_us, percentiles_us


def test_percentiles_of_nanosecond_samples_in_microseconds() -> None:
    samples = [(k + 1) * 1000 for k in range(100)][::-1]  # 1..100 µs, unsorted
    assert percentiles_us(samples) == {"count": 100, "p50": 51.0, "p99": 100.0, "max": 100.0}
    assert percentile_us(sorted(samples), 0.0) == 1.0
    assert percentile_us([1234], 0.5) == 1.2


def test_no_samples_give_zeros() -> None:
    assert percentiles_us([]) == {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
