"""The source runner's report: its figures, for summaries, reports and ``--json``."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmig.runner.pauses import Pause


@dataclass
class SourceReport:
    started: float = 0.0
    stopped: float | None = None  # the guest stopped (switchover or precopy completion)
    finished: float = 0.0
    passes: int = 0
    requests: list[tuple[float, str, int]] = field(default_factory=list)
    # Per request: read from the return path → its pages written into the socket.
    served_ns: list[int] = field(default_factory=list)
    # Per request, in the same order: were its pages all sent already when it was read
    # (nothing went out for it)? QEMU 7.2's get_queued_page_not_dirty, against get_queued_page.
    already_sent: list[bool] = field(default_factory=list)
    pongs: list[int] = field(default_factory=list)
    pass_ends: list[float] = field(default_factory=list)  # each precopy pass's end
    recoveries: int = 0
    paused_s: float = 0.0  # the channel broke → RESUME_ACK, summed over the recoveries
    channels: int = 1  # main channels opened: the first, and one per resume attempt
    preempt_pages: int = 0  # target pages sent on the preempt channel
    preempt_bytes: int = 0
    pauses: list[Pause] = field(default_factory=list)  # each pause and its recovery
    multifd_bytes: list[int] = field(default_factory=list)  # per multifd channel
    # The C answer thread (8.0 preempt, or the main channel without preempt): target pages
    # it wrote, well-formed requests it left to Python, and how often it was started.
    fast_answer: dict[str, int] = field(default_factory=dict)
