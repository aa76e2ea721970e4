"""The destination runner's report: its figures, for summaries, reports and ``--json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qmig.latency import qemu_latency_figures
from qmig.ram.faults import FaultStats
from qmig.runner.pauses import Pause
from qmig.wire import messages as m


@dataclass
class DestinationReport:
    """What happened on the destination, for summaries and --json."""

    started: float = 0.0
    running_at: float | None = None  # POSTCOPY_RUN (monotonic, comparable across processes)
    finished: float = 0.0
    postcopy: bool = False
    bytes_received: int = 0
    blocks: dict[str, int] = field(default_factory=dict)
    devices: list[m.DeviceState] = field(default_factory=list, repr=False)
    requests: int = 0
    request_sent_ns: list[int] = field(default_factory=list, repr=False)  # fault -> request sent
    request_sent_at_ns: list[int] = field(default_factory=list, repr=False)  # when, in order
    request_placed_ns: list[int] = field(default_factory=list, repr=False)  # sent -> placed
    faults: dict[str, Any] = field(default_factory=dict)
    workload: list[dict[str, Any]] = field(default_factory=list)
    discarded_pages: int = 0
    notices: list[str] = field(default_factory=list)
    # Switchover (monotonic): the first POSTCOPY_RAM_DISCARD applied, and LISTEN (whose
    # registration sweeps the blocks); running_at is RUN.
    first_discard_at: float | None = None
    listen_at: float | None = None
    # Target pages placed, and the time spent placing them, before and after RUN.
    placed_pages: dict[str, int] = field(default_factory=lambda: {"precopy": 0, "postcopy": 0})
    placing_ns: dict[str, int] = field(default_factory=lambda: {"precopy": 0, "postcopy": 0})
    # For reports: per block [pages, zero pages] placed; per answered request (sent ns,
    # sent → placed ns, block, host offset).
    block_pages: dict[str, list[int]] = field(default_factory=dict)
    request_log: list[tuple[int, int, str, int]] = field(default_factory=list, repr=False)
    recoveries: int = 0
    paused_s: float = 0.0  # the channel broke → POSTCOPY_RESUME, summed
    pauses: list[Pause] = field(default_factory=list)  # each pause and its recovery
    # The C receive thread's figures, summed over its runs (one per channel after RUN), and
    # per data page it placed, recv() → placed (ns).
    fast_path: dict[str, int] = field(default_factory=dict)
    fast_path_wait_ns: list[int] = field(default_factory=list, repr=False)
    preempt_pages: int = 0  # target pages that came on the preempt channel
    preempt_bytes: int = 0
    # Multifd: target pages (normal and zero) that came in packets, and per channel what it
    # carried, with the number of syncs (MultifdReceiver.summary).
    multifd_pages: int = 0
    multifd: dict[str, Any] = field(default_factory=dict)


def fault_figures(stats: FaultStats, latencies_ns: list[int]) -> dict[str, Any]:
    """The fault thread's figures (``DestinationReport.faults``), from its ``stats`` and
    every fault's latency."""
    return {
        "faults": stats.faults,
        "requests": stats.requests,
        "repeat_faults": stats.repeat_faults,
        "late_faults": stats.late_faults,
        "stray_faults": stats.stray_faults,
        "events": stats.events,  # userfaultfd messages that were no page fault, by kind
        "latency_ns": vars(stats.latency),
        "blocktime_ns": stats.blocktime_ns,
        "all_blocked_ns": stats.all_blocked_ns,
        "blocktime_ns_by_thread": stats.blocktime_ns_by_thread,
        # QEMU 10.1's query-migrate form: postcopy_latency_ns, postcopy_latency_dist.
        **qemu_latency_figures(latencies_ns),
    }
