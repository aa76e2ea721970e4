"""Latency figures as the summaries report them: percentiles of nanosecond samples, in µs."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


def vcpu_run_ms(workload: Sequence[dict[str, Any]]) -> list[float]:
    """Per vCPU (the workload's order), its run from the guest's start to its last touch, in
    ms, blocked time included: beside :func:`vcpu_blocktime_ms`, how far faults held it."""
    return [round(vcpu.get("elapsed_ns", 0) / 1e6, 2) for vcpu in workload]


def paired_requests(
    read: Sequence[tuple[float, str, int]], sent: Sequence[tuple[int, int, str, int]]
) -> Iterator[tuple[int, int, int]]:
    """The source's requests that the destination sent and saw answered, each paired with
    the destination's record of it: (index in ``read``, sent ns, sent → placed ns).

    ``read``: the source's requests, (``time.monotonic()`` read, block, byte offset);
    ``sent``: the destination's answered requests, (CLOCK_MONOTONIC sent, sent → placed,
    block, byte offset). They pair by block and offset; a page asked for twice pairs in
    order, first with first. A request only one end saw pairs with nothing.
    """
    queued: dict[tuple[str, int], deque[tuple[int, int]]] = {}
    for sent_ns, waited_ns, block, offset in sorted(sent):
        queued.setdefault((block, offset), deque()).append((sent_ns, waited_ns))
    for index, (_read_s, block, offset) in enumerate(read):
        waiting = queued.get((block, offset))
        if waiting:
            sent_ns, waited_ns = waiting.popleft()
            yield index, sent_ns, waited_ns


def request_legs(
    read: Sequence[tuple[float, str, int]],
    served_ns: Sequence[int],
    sent: Sequence[tuple[int, int, str, int]],
) -> tuple[list[int], list[int]]:
    """The two parts of a request's round trip that neither end sees alone, in ns: its
    REQ_PAGES sent by the destination → read by the source, and its page written into the
    source's socket → placed on the destination.

    ``read`` and ``sent`` as :func:`paired_requests` pairs them; ``served_ns``: each of
    ``read``'s read → written, in the same order. Both processes read the same clock. The
    second list leaves out pages placed before the source had written its answer.
    """
    to_read: list[int] = []
    to_placed: list[int] = []
    for index, sent_ns, waited_ns in paired_requests(read[: len(served_ns)], sent):
        read_ns = round(read[index][0] * 1e9)
        to_read.append(max(0, read_ns - sent_ns))
        placed_after = sent_ns + waited_ns - read_ns - served_ns[index]
        if placed_after > 0:
            # Otherwise the page was placed before the source's answer was written: it was
            # on its way already (the sweep sent it), and the answer took no part in it.
            to_placed.append(placed_after)
    return to_read, to_placed


def latency_by_already_sent(
    read: Sequence[tuple[float, str, int]],
    already_sent: Sequence[bool],
    sent: Sequence[tuple[int, int, str, int]],
    sent_ns: Sequence[int],
    sent_at_ns: Sequence[int],
) -> tuple[list[int], list[int]]:
    """The fault latency (fault → placed, in ns, as the destination measured it) of the
    requests the source read, split by what each found there: (its pages sent already, its
    pages sent for it).

    ``read`` and ``sent`` as :func:`paired_requests` pairs them; ``already_sent``: the
    source's verdict on each of ``read``, in order; ``sent_ns``: the destination's fault →
    sent per request, and ``sent_at_ns`` when each was sent, which ``sent`` names too. A
    request only one end saw is in neither list.
    """
    to_sent: dict[int, deque[int]] = {}
    for at, fault_to_sent in zip(sent_at_ns, sent_ns, strict=False):
        to_sent.setdefault(at, deque()).append(fault_to_sent)
    groups: tuple[list[int], list[int]] = ([], [])
    for index, at, waited_ns in paired_requests(read[: len(already_sent)], sent):
        faulted = to_sent.get(at)
        if not faulted:  # its fault → sent was not recorded
            continue
        groups[0 if already_sent[index] else 1].append(faulted.popleft() + waited_ns)
    return groups


@dataclass(frozen=True)
class RequestSplit:
    """A run's page requests, each leg of their round trip in ns, and their fault latency by
    what each found on the source (see :func:`request_split`)."""

    sent: list[int]  # fault → REQ_PAGES sent (the destination)
    read: list[int]  # sent → read by the source
    served: list[int]  # read → its page written (the source)
    delivered: list[int]  # written → placed (the destination)
    placed: list[int]  # sent → placed, as the destination alone measures it
    already_sent: list[int]  # fault → placed of the requests whose pages were sent already
    sent_for_request: list[int]  # fault → placed of those whose pages were sent for them

    def as_json(self) -> dict[str, dict[str, float]]:
        """The legs and the two groups as a summary reports them: count, p50, p99 in µs."""
        figures = {
            "request_sent_us": self.sent,
            "request_read_us": self.read,
            "request_served_us": self.served,
            "page_delivered_us": self.delivered,
            "page_already_sent": self.already_sent,
            "page_sent_for_request": self.sent_for_request,
        }
        return {name: count_p50_p99(samples) for name, samples in figures.items()}


def count_p50_p99(samples_ns: Sequence[int]) -> dict[str, float]:
    """count, p50 and p99 of ``samples_ns``, in µs."""
    ordered = sorted(samples_ns)
    return {
        "count": len(ordered),
        "p50": percentile_us(ordered, 0.5),
        "p99": percentile_us(ordered, 0.99),
    }


def request_split(
    read: Sequence[tuple[float, str, int]],
    served_ns: Sequence[int],
    already_sent: Sequence[bool],
    sent: Sequence[tuple[int, int, str, int]],
    sent_ns: Sequence[int],
    sent_at_ns: Sequence[int],
    since: float | None = None,
) -> RequestSplit:
    """The legs, and the fault latency by what each request found, of the requests made from
    ``since`` on (monotonic s; None: all of them).

    ``read``, ``served_ns`` and ``sent`` as :func:`request_legs` takes them, ``already_sent``
    as :func:`latency_by_already_sent` does (both per request of ``read``, in its order, and
    perhaps fewer); ``sent_ns``: the destination's fault → sent per request, and
    ``sent_at_ns`` when each was sent (the same order). Both processes read the same clock: a
    request counts when the destination sent it from ``since`` on, and its source side when
    read from then on.
    """
    picked: Sequence[int]
    if since is None:
        picked = range(len(read))
        picked_sent, faults, faults_at = list(sent), list(sent_ns), list(sent_at_ns)
    else:
        since_ns = round(since * 1e9)
        picked = [index for index, entry in enumerate(read) if entry[0] >= since]
        picked_sent = [entry for entry in sent if entry[0] >= since_ns]
        kept = [(ns, at) for ns, at in zip(sent_ns, sent_at_ns, strict=False) if at >= since_ns]
        faults, faults_at = [ns for ns, _ in kept], [at for _, at in kept]
    # The source's lists may end before ``read`` does (a request not yet answered): each
    # keeps the picked requests it has, which lead the picked ones in ``read``'s order.
    picked_read = [read[index] for index in picked]
    picked_served = [served_ns[index] for index in picked if index < len(served_ns)]
    picked_already = [already_sent[index] for index in picked if index < len(already_sent)]
    to_read, to_placed = request_legs(picked_read, picked_served, picked_sent)
    already, sent_for = latency_by_already_sent(
        picked_read, picked_already, picked_sent, faults, faults_at
    )
    return RequestSplit(
        sent=faults,
        read=to_read,
        served=picked_served,
        delivered=to_placed,
        placed=[waited for _, waited, _, _ in picked_sent],
        already_sent=already,
        sent_for_request=sent_for,
    )
