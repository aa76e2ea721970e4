"""QEMU's own fault latency, from its trace events, for QEMU versions that do not report it.

QEMU 10.1 reports postcopy fault latency in ``query-migrate``; older destinations do not, but
every build with the ``log`` trace backend (Debian's, 7.2 and 10.0) can log each userfault its
fault thread reads (``postcopy_ram_fault_thread_request``, with the faulting address) and
each host page it places (``postcopy_place_page`` and ``postcopy_place_page_zero``, with the
page's address), stamped to the microsecond with ``-msg timestamp=on``. A fault's latency is
then the time from its line to the first placement of its host page after it: the same
span as qmig's ``fault_latency_us`` (fault read → page placed).

A fault whose page was placed before the fault thread read it is *late*, and left out, as
qmig leaves such faults out of its own figures (the placement woke the vCPU, not an answer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

FAULT_EVENT = "postcopy_ram_fault_thread_request"
PLACE_EVENTS = ("postcopy_place_page", "postcopy_place_page_zero")

# "<tid>@<seconds>.<microseconds>:<event> <arguments>", the log backend's line with a timestamp
_LINE = re.compile(r"^\d+@(\d+)\.(\d{6}):(\w+) (.*)$")
_FAULT_ADDRESS = re.compile(r"HVA=0x([0-9a-fA-F]+)")
_FAULT_PAGE = re.compile(r"rb=(\S+) offset=0x([0-9a-fA-F]+)")  # the block and its host page
_FAULT_THREAD = re.compile(r"pid=(\d+)")  # the faulting thread (7.2 and 10.0 name it)
_PLACE_ADDRESS = re.compile(r"host=0x([0-9a-fA-F]+)")


def trace_args(log: Path, events: Iterable[str]) -> list[str]:
    """The QEMU options that log ``events`` to ``log``, each line stamped (µs, wall clock)."""
    enabled = [arg for event in events for arg in ("-trace", event)]
    return [*enabled, "-msg", "timestamp=on", "-D", str(log)]


def fault_trace_args(log: Path) -> list[str]:
    """The QEMU options that log a destination's faults and placements to ``log``."""
    return trace_args(log, (FAULT_EVENT, *PLACE_EVENTS))


@dataclass(frozen=True)
class TracedFault:
    """One fault the trace timed: fault → placed in ns, the block and byte offset of its
    host page and the faulting thread's id, as the fault line names them (None where it
    does not)."""

    latency_ns: int
    page: tuple[str, int] | None
    thread: int | None = None


@dataclass
class TracedFaults:
    """The faults of one trace: each one timed (``faults``), in the order their pages were
    placed; the faults on pages placed before the fault was read (``late``) and those whose
    page the trace never shows placed (``unplaced``)."""

    faults: list[TracedFault] = field(default_factory=list)
    late: int = 0
    unplaced: int = 0
    lines: int = 0  # lines in the log backend's stamped form, of any event

    @property
    def latencies_ns(self) -> list[int]:
        return [fault.latency_ns for fault in self.faults]

    def blocked_ns_by_thread(self) -> dict[int, int]:
        """Per faulting thread (a vCPU, or another thread touching guest RAM), the sum of its
        timed faults: the time it waited, as QEMU's per-vCPU blocktime counts it."""
        blocked: dict[int, int] = {}
        for fault in self.faults:
            if fault.thread is not None:
                blocked[fault.thread] = blocked.get(fault.thread, 0) + fault.latency_ns
        return blocked


@dataclass(frozen=True)
class _Event:
    at_ns: int
    fault: bool  # a fault, or a placement
    address: int
    page: tuple[str, int] | None = None  # a fault's block and offset
    thread: int | None = None  # a fault's thread


@dataclass(frozen=True)
class TraceLine:
    """One line of the log backend's stamped form: when (ns, wall clock), the event's name
    and its arguments as QEMU formatted them."""

    at_ns: int
    event: str
    arguments: str


def trace_lines(lines: Iterable[str]) -> Iterator[TraceLine]:
    """The lines of a QEMU trace log that are in the stamped form; others are skipped."""
    for line in lines:
        match = _LINE.match(line)
        if match is not None:
            seconds, micros, event, arguments = match.groups()
            yield TraceLine(int(seconds) * 1_000_000_000 + int(micros) * 1000, event, arguments)


def _event(line: TraceLine) -> _Event | None:
    event, arguments = line.event, line.arguments
    fault = event == FAULT_EVENT
    if not fault and event not in PLACE_EVENTS:
        return None
    address = (_FAULT_ADDRESS if fault else _PLACE_ADDRESS).search(arguments)
    if address is None:
        return None
    named = _FAULT_PAGE.search(arguments) if fault else None
    thread = _FAULT_THREAD.search(arguments) if fault else None
    return _Event(
        line.at_ns,
        fault,
        int(address.group(1), 16),
        None if named is None else (named.group(1), int(named.group(2), 16)),
        None if thread is None else int(thread.group(1)),
    )


def traced_faults(lines: Iterable[TraceLine], page_size: int) -> TracedFaults:
    """The faults of a trace's ``lines`` (:func:`trace_lines`), each matched with the first
    placement of its host page (``page_size`` bytes) at or after it. Lines are taken in time
    order: the log's threads write theirs in turn, not strictly in time order."""
    result = TracedFaults()
    events = []
    for line in lines:
        result.lines += 1
        event = _event(line)
        if event is not None:
            events.append(event)
    events.sort(key=lambda event: event.at_ns)
    placed: set[int] = set()
    waiting: dict[int, list[_Event]] = {}
    for event in events:
        page = event.address - event.address % page_size
        if event.fault:
            if page in placed:
                result.late += 1
            else:
                waiting.setdefault(page, []).append(event)
        elif page not in placed:
            placed.add(page)
            for fault in waiting.pop(page, []):
                latency = event.at_ns - fault.at_ns
                result.faults.append(TracedFault(latency, fault.page, fault.thread))
    result.unplaced = sum(len(faults) for faults in waiting.values())
    return result


def traced_fault_file(log: Path, page_size: int) -> TracedFaults:
    """:func:`traced_faults` of the log file QEMU wrote."""
    with log.open(encoding="utf-8", errors="replace") as lines:
        return traced_faults(trace_lines(lines), page_size)
