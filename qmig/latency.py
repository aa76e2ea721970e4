"""Latency figures as the summaries report them: percentiles of nanosecond samples, in µs."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any


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


# QEMU 10.1's `postcopy-latency-dist` (query-migrate): bucket N counts the remote faults that
# were resolved in [2^N, 2^(N+1)) µs; 0 µs counts in bucket 0 and anything past the last
# bucket counts in it. Reporting qmig's faults the same way lets a user put qmig's figures
# beside a QEMU destination's.
LATENCY_DIST_BUCKETS = 24


def latency_dist(samples_ns: Sequence[int]) -> list[int]:
    """``samples_ns`` counted into QEMU's power-of-two µs buckets."""
    buckets = [0] * LATENCY_DIST_BUCKETS
    last = LATENCY_DIST_BUCKETS - 1
    for sample in samples_ns:
        micros = max(0, sample) // 1000
        buckets[min(last, micros.bit_length() - 1) if micros else 0] += 1
    return buckets


def qemu_latency_figures(samples_ns: Sequence[int]) -> dict[str, object]:
    """The fault-latency figures in the form of QEMU's query-migrate: average in ns, buckets."""
    average = sum(samples_ns) // len(samples_ns) if samples_ns else 0
    return {"postcopy_latency_ns": average, "postcopy_latency_dist": latency_dist(samples_ns)}


def vcpu_blocktime_ms(faults: dict[str, Any], workload: Sequence[dict[str, Any]]) -> list[float]:
    """Per vCPU (in the order the workload lists its threads), the time it spent blocked on
    faults, in ms: QEMU's ``postcopy-vcpu-blocktime`` list. ``faults``: a destination
    report's fault figures, whose ``blocktime_ns_by_thread`` keys are thread ids (as text
    once they have been through JSON)."""
    by_thread = {int(tid): ns for tid, ns in (faults.get("blocktime_ns_by_thread") or {}).items()}
    return [round(by_thread.get(vcpu.get("thread_id", 0), 0) / 1e6, 2) for vcpu in workload]


def request_legs(
    read: Sequence[tuple[float, str, int]],
    served_ns: Sequence[int],
    sent: Sequence[tuple[int, int, str, int]],
) -> tuple[list[int], list[int]]:
    """The two parts of a request's round trip that neither end sees alone, in ns: its
    REQ_PAGES sent by the destination → read by the source, and its page written into the
    source's socket → placed on the destination.

    ``read``: the source's requests, (``time.monotonic()`` read, block, byte offset), and
    ``served_ns`` each one's read → written, in the same order; ``sent``: the destination's
    answered requests, (CLOCK_MONOTONIC sent, sent → placed, block, byte offset). Both
    processes read the same clock. A page asked for twice pairs in order, first with first.
    The second list leaves out pages placed before the source had written its answer.
    """
    queued: dict[tuple[str, int], deque[tuple[int, int]]] = {}
    for sent_ns, waited_ns, block, offset in sorted(sent):
        queued.setdefault((block, offset), deque()).append((sent_ns, waited_ns))
    to_read: list[int] = []
    to_placed: list[int] = []
    for (read_s, block, offset), served in zip(read, served_ns, strict=False):
        waiting = queued.get((block, offset))
        if not waiting:  # not asked by this channel's destination, or never answered
            continue
        sent_ns, waited_ns = waiting.popleft()
        read_ns = round(read_s * 1e9)
        to_read.append(max(0, read_ns - sent_ns))
        placed_after = sent_ns + waited_ns - read_ns - served
        if placed_after > 0:
            # Otherwise the page was placed before the source's answer was written: it was
            # on its way already (the sweep sent it), and the answer took no part in it.
            to_placed.append(placed_after)
    return to_read, to_placed
