"""Words and numbers as the commands print them: correct plurals and IEC units.

The progress columns here replace rich's decimal ones (``2.1 GB``, ``35 MB/s``) so that a
progress bar and the summary under it use the same units (GiB, MiB/s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qmig.sizes import format_size


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 pass``, ``2 passes``: ``many`` when the plural is not ``word + "s"``."""
    return f"{count:,} {word if count == 1 else many or word + 's'}"


def blocktime(summary: dict[str, Any]) -> str:
    """The vCPUs' time blocked on faults, per vCPU too, beside how long each ran (blocked time
    included): ``--json``'s ``blocktime_ms``, ``postcopy_vcpu_blocktime_ms`` and
    ``vcpu_run_ms``."""
    total = f"{summary['blocktime_ms']:.1f} ms"
    if not summary["vcpu_run_ms"]:
        return total
    blocked = ", ".join(f"{ms:.1f}" for ms in summary["postcopy_vcpu_blocktime_ms"])
    runs = ", ".join(f"{ms:.1f}" for ms in summary["vcpu_run_ms"])
    return f"{total} (per vCPU {blocked} ms, of runs of {runs} ms)"


def latency_form(average_ns: int, dist: Sequence[int]) -> str:
    """Fault latency as QEMU 10.1's query-migrate gives it (``--json``'s
    ``postcopy_latency_ns`` and ``postcopy_latency_dist``), for a side-by-side read: the
    average, then each bucket that counted a fault, by its range in µs (bucket N is
    [2^N, 2^(N+1)); the first starts at 0, the last is open-ended)."""
    last = len(dist) - 1
    buckets = [
        f"[{0 if n == 0 else 1 << n:,}, {'∞' if n == last else f'{1 << (n + 1):,}'}) {count:,}"
        for n, count in enumerate(dist)
        if count
    ]
    return f"average {average_ns / 1000:.1f} µs; faults by µs: {', '.join(buckets) or 'none'}"


def transfer_columns() -> tuple[Any, Any]:
    """Rich progress columns: ``done/total`` and speed, both in IEC units."""
    from rich.progress import DownloadColumn, ProgressColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None:
                return Text("?", style="progress.data.speed")
            return Text(f"{format_size(speed)}/s", style="progress.data.speed")

    return DownloadColumn(binary_units=True), Speed()
